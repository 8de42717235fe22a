"""What the pretraining and fine-tuning docks share: the run form, Start/Cancel and Pause, the live status.

`TrainingDock` owns the part of a training dock that does not depend on what is trained: the "Run" widgets
(device, runs folder, run name, resume from, child process) and the values it remembers, the collapsible form
sections, the Start/Cancel and Pause/Resume buttons, the training-loss curve (with a resumed run's whole
history, read from its metrics.jsonl), the stages of a run's start (importing, reading, preparing, first step,
with a clock), the events every training job yields (steps, log lines, checkpoints, the final `FinishedEvent`)
and the notification at the end (the events, stages and curves are drawn by `TrainingProgress`, in
`progress.py`). A dock adds its own form, config and job and answers the hooks below. No science here: the jobs are
`core` generators.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from magicgui.widgets import CheckBox, FileEdit, LineEdit
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QBoxLayout, QHBoxLayout, QPushButton, QWidget

from napari_dagman._widgets.common import (
    DeviceComboBox,
    JobDock,
    checked_run,
    notify_error,
    notify_warning,
    path_text,
)
from napari_dagman._widgets.common.forms import ConfigForm, Section, add_sections
from napari_dagman._widgets.common.plots import LossPlot
from napari_dagman._widgets.training.progress import TrainingProgress
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.events import FinishedEvent, StepEvent

DEFAULT_RUNS_FOLDER = str(Path.home() / "napari-dagman-runs")

#: (button text, callback) pairs of a notification.
Actions = list[tuple[str, Callable[..., Any]]]


class TrainingDock(TrainingProgress, JobDock):
    """Base of the training docks: run widgets, Start/Cancel/Pause, loss curve, job events, the end report.

    A subclass builds its form (calling `_make_run_widgets`, `_add_sections` and `_add_run_controls`) and
    defines `build_job`, `_job`, `_starting_text`, `_step_text` and `_finish_report`; `_prepare_run`,
    `_on_job_event`, `_on_history_record` and `_remember` are there to extend. The job's events, the start's
    stages and the curves are `TrainingProgress`'s (before `JobDock` in the bases: it overrides its handlers).
    """

    #: The dock's kind of run, as in "a pretraining run is already running".
    run_kind: ClassVar[str] = "training run"
    cancelling_text: ClassVar[str] = "cancelling: finishing the current step and saving a checkpoint..."
    #: The command recorded in the run's run.json.
    command: ClassVar[str] = "napari-dagman"
    #: The kind of run the dock makes (a run folder's config.json "job"): a resumed folder must be one.
    job: ClassVar[str] = ""
    #: Fields of the dock's config form (``form``) remembered between sessions, stored when a run starts.
    remembered_fields: ClassVar[tuple[str, ...]] = ()

    # widgets made by the helpers below, for type checkers
    device: DeviceComboBox
    runs_folder: FileEdit
    run_name: LineEdit
    resume_from: FileEdit
    in_process: CheckBox
    start_button: QPushButton
    pause_button: QPushButton
    loss_plot: LossPlot
    form: ConfigForm

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, settings_group: str, description: str) -> None:
        super().__init__(napari_viewer, settings_group=settings_group, description=description)
        self._checkpoints: dict[str, str] = {}  # kind ("last", "best", ...) -> path, named if the run fails
        self.last_finished: FinishedEvent | None = None
        #: The log lines of the current run, in order.
        self.messages: list[str] = []
        #: (stage, seconds since Start) of the current run's start; "first step" is the last one.
        self.stages: list[tuple[str, float]] = []
        self._stage_count = ""  # "(3 of 100)" while the files are prepared
        #: Seconds from Start to the first finished step of the current run (None until then).
        self.first_step_s: float | None = None
        self._started_at = 0.0
        self._run_first_step = 0
        self._start_line = ""  # what the run is (the job's first info line), shown above the stage
        self._history: tuple[str, bool] | None = None  # (run folder, resumed?) until the first step is drawn
        self._clock = QTimer(self)
        self._clock.setInterval(1000)
        self._clock.timeout.connect(self._show_stage)

    # --- form pieces ------------------------------------------------------------------------------------------
    def _make_run_widgets(self, *, run_name_tip: str, resume_tip: str, in_process_tip: str) -> None:
        """The device, runs folder, run name, resume-from and separate-process widgets, with remembered values."""
        s = self._settings
        self.device = DeviceComboBox(value=s.get("device", "auto"))
        self.runs_folder = FileEdit(
            label="runs folder",
            mode="d",
            value=s.get("runs_folder", DEFAULT_RUNS_FOLDER),
            tooltip="where new run folders are created (remembered)",
        )
        self.run_name = LineEdit(label="run name", value="", tooltip=run_name_tip)
        self.resume_from = FileEdit(label="resume from", mode="d", tooltip=resume_tip)
        self.in_process = CheckBox(
            label="separate process",
            value=str(s.get("in_process", "true")).lower() != "false",
            tooltip=in_process_tip,
        )
        # device and runs folder are remembered as soon as they change (the rest when a run starts)
        self.device.changed.connect(lambda value: self._settings.set("device", str(value)))
        self.runs_folder.changed.connect(
            lambda *_: self._settings.set("runs_folder", path_text(self.runs_folder))
        )

    def _add_sections(self, layout: QBoxLayout, sections: list[Section]) -> None:
        """One collapsible box per section (shown widgets, then "more" folded), disabled while a run goes."""
        self._forms.extend(add_sections(layout, sections, self))

    def _add_run_controls(self, layout: QBoxLayout, *, start_tip: str, loss_label: str) -> None:
        """Start/Cancel and Pause/Resume, the status line and the training-loss curve."""
        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip(start_tip)
        self.pause_button = QPushButton("Pause")
        self.pause_button.setEnabled(False)
        self.pause_button.setToolTip("hold the run after the current step; Resume continues")
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.pause_button)
        layout.addLayout(buttons)
        self._toggle = (self.start_button, "Start")
        layout.addWidget(self.status)
        self.loss_plot = LossPlot("training loss", loss_label, log_y=True, primary="loss")
        layout.addWidget(self.loss_plot)
        self.start_button.clicked.connect(self.start_or_cancel)
        self.pause_button.clicked.connect(self.toggle_pause)

    # --- hooks ------------------------------------------------------------------------------------------------
    def build_job(self) -> tuple[Any, Any, bool]:
        """(config, in-memory data, resume?) that Start would run; raises `DagmanError` on bad input."""
        raise NotImplementedError

    def _job(self) -> Callable[..., Generator[Any, None, Any]]:
        """The module-level job generator (a child process must be able to import it)."""
        raise NotImplementedError

    def _ready(self, config: Any, data: Any, resume: bool) -> bool:
        """Last checks before a run starts (raise `DagmanError`, or say why and return False)."""
        return True

    def _prepare_run(self, data: Any) -> None:
        """Reset what the dock draws of a run, just before one starts."""

    def _starting_text(self, config: Any) -> str:
        """The status line once a run has started."""
        raise NotImplementedError

    def _step_text(self, event: StepEvent) -> str:
        """The status line for a training step."""
        raise NotImplementedError

    def _on_job_event(self, event: Any) -> None:
        """An event the shared handler does not draw (previews, validation)."""

    def _finish_report(self, finished: FinishedEvent) -> tuple[str, Actions]:
        """The end-of-run text and the notification's actions; enables what the finished run offers."""
        raise NotImplementedError

    def _remember(self) -> None:
        """Store the form values kept between sessions (when a run starts)."""
        s = self._settings
        s.set("device", str(self.device.value))
        s.set("runs_folder", path_text(self.runs_folder))
        s.set("in_process", "true" if self.in_process.value else "false")
        if self.remembered_fields:
            s.set("form", json.dumps({name: self.form.value(name) for name in self.remembered_fields}))

    def _restore_form(self) -> None:
        """Fill the remembered fields of ``form`` from the last session (values no longer valid are skipped)."""
        try:
            saved = json.loads(str(self._settings.get("form", "") or "{}"))
        except ValueError:
            return
        if not isinstance(saved, dict):
            return
        for name in self.remembered_fields:
            if name in saved:
                with contextlib.suppress(DagmanError):
                    self.form.set_values({name: saved[name]})

    # --- building the job -------------------------------------------------------------------------------------
    def _run_folder(self, prefix: str) -> tuple[str, bool]:
        """(run folder, resume?): the resume-from folder, else a new folder "<prefix>-<date>" (or the run name).

        What the training loop would refuse after the job's slow start (a folder that is no run of this kind,
        nothing to resume, a new run over an old one, a folder that cannot be written) is refused here, at Start.
        """
        from napari_dagman.core.io import check_output_folder

        resume = path_text(self.resume_from)
        if resume:
            checked_run(resume, self.job or None)
            from napari_dagman.core.checkpoint import RESUME_FILE

            if not (Path(resume) / RESUME_FILE).is_file():
                raise DagmanInputError(f"nothing to resume in {resume}: it holds no resumable checkpoint")
            return resume, True
        parent = path_text(self.runs_folder)
        if not parent:
            raise DagmanInputError("choose a runs folder for the new run")
        name = self.run_name.value.strip() or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(parent).expanduser() / name
        check_output_folder(out, "run folder")
        if out.is_dir():
            from napari_dagman.core.checkpoint import RunFolder

            if RunFolder(out).has_checkpoint():
                raise DagmanInputError(
                    f"{out} already holds a run: choose another run name, or continue it with 'resume from'"
                )
        return str(out), False

    # --- start / cancel / pause ---------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start a run from the form; bad input gives a notification. True when a run started."""
        if self._busy():
            return False
        try:
            config, data, resume = self.build_job()
            if not self._ready(config, data, resume):
                return False
        except DagmanError as err:
            return self.refuse(err)
        self._remember()
        self._checkpoints.clear()
        self.last_finished = None
        self.messages.clear()
        self.loss_plot.clear()
        self._prepare_run(data)
        self._start_line = self._starting_text(config)
        self.stages = [("starting the background process" if self.in_process.value else "starting", 0.0)]
        self._stage_count = ""
        self.first_step_s = None
        self._history = (str(config.out), bool(resume))
        self._started_at = time.monotonic()
        self._launch(
            self._job(),
            config,
            data,
            in_process=bool(self.in_process.value),
            status=self._start_line,
            resume=resume,
            command=self.command,
            **self._job_options(config),
        )
        self._show_stage()
        self._clock.start()
        return True

    def _job_options(self, config: Any) -> dict[str, Any]:
        """More keyword arguments of the job (e.g. the method a run needs registered in a child process)."""
        return {}

    def toggle_pause(self) -> None:
        if not self._runner.running:
            return
        if self._runner.paused:
            self._runner.resume()
            self.pause_button.setText("Pause")
            self.status.setText("resumed")
        else:
            self._runner.pause()
            self.pause_button.setText("Resume")
            self.status.setText("paused after the current step (nothing is lost; Resume continues)")

    def cancel(self, _value: Any = None) -> None:
        """Stop at the end of the current step; the run saves a resumable checkpoint first."""
        super().cancel()
        self.pause_button.setEnabled(False)

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        self.pause_button.setEnabled(running)
        self.pause_button.setText("Pause")
        if not running:
            self._clock.stop()

    # --- after the run ------------------------------------------------------------------------------------------
    def _finished_run(self, run_dir: str | None) -> str | None:
        """``run_dir``, else the folder of the run that finished last (None, with a warning, when there is none)."""
        if run_dir:
            return run_dir
        if self.last_finished is not None:
            return self.last_finished.run_dir
        notify_warning("no finished run yet")
        return None

    def _open_with_run(
        self, widget_name: str, what: str, run_dir: str | None, **choices: Any
    ) -> QWidget | None:
        """Dock (or show) this plugin's widget ``widget_name`` with a run chosen in it: ``run_dir``, else the run
        that finished last (``choices`` go to its ``set_run``); returns it, or None with a notification."""
        run_dir = self._finished_run(run_dir)
        if run_dir is None:
            return None
        try:
            _, widget = self._viewer.window.add_plugin_dock_widget("napari-dagman", widget_name)
        except (KeyError, LookupError, ValueError) as err:
            notify_error(f"cannot open the {what}: {err}")
            return None
        from napari_dagman._widgets.common.loading import DeferredDock

        if isinstance(widget, DeferredDock):  # built now (this dock's libraries are loaded) or when they are
            widget.call_when_built(lambda dock: dock.set_run(run_dir, **choices))
            return widget.dock
        widget.set_run(run_dir, **choices)
        return widget
