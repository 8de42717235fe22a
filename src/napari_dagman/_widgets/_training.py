"""What the pretraining and fine-tuning docks share: the run form, Start/Cancel and Pause, the live status.

`TrainingDock` owns the part of a training dock that does not depend on what is trained: the "Run" widgets
(device, runs folder, run name, resume from, child process) and the values it remembers, the collapsible form
sections, the Start/Cancel and Pause/Resume buttons, the training-loss curve, the events every training job
yields (steps, log lines, checkpoints, the final `FinishedEvent`) and the notification at the end. A dock adds its
own form, config and job and answers the hooks below. No science here: the jobs are `core` generators.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from magicgui.widgets import CheckBox, FileEdit, LineEdit
from qtpy.QtWidgets import QBoxLayout, QHBoxLayout, QPushButton, QWidget

from napari_dagman._widgets._common import (
    DeviceComboBox,
    JobDock,
    notify_error,
    notify_info,
    notify_warning,
    path_text,
)
from napari_dagman._widgets._forms import ConfigForm, Section, add_sections
from napari_dagman._widgets._plots import LossPlot
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.events import FinishedEvent, StepEvent

DEFAULT_RUNS_FOLDER = str(Path.home() / "napari-dagman-runs")

#: (button text, callback) pairs of a notification.
Actions = list[tuple[str, Callable[..., Any]]]


class TrainingDock(JobDock):
    """Base of the training docks: run widgets, Start/Cancel/Pause, loss curve, job events, the end report.

    A subclass builds its form (calling `_make_run_widgets`, `_add_sections` and `_add_run_controls`) and
    defines `build_job`, `_job`, `_starting_text`, `_step_text` and `_finish_report`; `_prepare_run`,
    `_on_job_event` and `_remember` are there to extend.
    """

    #: The dock's kind of run, as in "a pretraining run is already running".
    run_kind: ClassVar[str] = "training run"
    cancelling_text: ClassVar[str] = "cancelling: finishing the current step and saving a checkpoint..."
    #: The command recorded in the run's run.json.
    command: ClassVar[str] = "napari-dagman"
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
        self.loss_plot = LossPlot("training loss", loss_label, log_y=True)
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
        """(run folder, resume?): the resume-from folder, else a new folder "<prefix>-<date>" (or the run name)."""
        resume = path_text(self.resume_from)
        if resume:
            return resume, True
        parent = path_text(self.runs_folder)
        if not parent:
            raise DagmanInputError("choose a runs folder for the new run")
        name = self.run_name.value.strip() or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        return str(Path(parent).expanduser() / name), False

    # --- start / cancel / pause ---------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start a run from the form; bad input gives a notification. True when a run started."""
        if self._busy():
            return False
        try:
            config, data, resume = self.build_job()
        except DagmanError as err:
            notify_error(err)
            return False
        self._remember()
        self._checkpoints.clear()
        self.last_finished = None
        self.messages.clear()
        self.loss_plot.clear()
        self._prepare_run(data)
        self._launch(
            self._job(),
            config,
            data,
            in_process=bool(self.in_process.value),
            status=self._starting_text(config),
            resume=resume,
            command=self.command,
            **self._job_options(config),
        )
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

    # --- events from the job (main thread) -----------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import CheckpointEvent, LogEvent, StepEvent

        if isinstance(event, StepEvent):
            self._on_step(event)
        elif isinstance(event, CheckpointEvent):
            self._checkpoints[event.kind] = event.path
        elif isinstance(event, LogEvent):
            self.messages.append(event.message)
            if event.level == "warning":
                notify_warning(event.message)
            elif self._cancel_requested_at is None:
                self.status.setText(event.message)
        else:
            self._on_job_event(event)

    def _on_step(self, event: StepEvent) -> None:
        self.loss_plot.add_point("loss", event.step, event.loss)
        for name, value in event.terms.items():
            self.loss_plot.add_point(name, event.step, value)
        text = self._step_text(event)
        if self._cancel_requested_at is None:
            self.status.setText(text)

    def _on_done(self, finished: Any) -> None:
        from napari_dagman.core.events import FinishedEvent

        if not isinstance(finished, FinishedEvent):
            return
        self.last_finished = finished
        text, actions = self._finish_report(finished)
        self.status.setText(text)
        notify_info(text, actions=actions)

    def _on_error(self, err: BaseException) -> None:
        # the notification is already out (JobRunner); the dock keeps the reason and goes back to idle
        last = self._checkpoints.get("last")
        self.status.setText(f"failed: {err}" + (f"\nlast good checkpoint: {last}" if last else ""))

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
        widget.set_run(run_dir, **choices)
        return widget
