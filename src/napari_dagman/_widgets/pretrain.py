"""Pretraining dock: gather a `PretrainConfig`, run `core.engine.run_pretraining` in the background, draw its events.

The run happens in a child process by default (see `_subprocess` for why); a thread is available for
debugging. The dock shows the loss terms live, puts the teacher's attention and the chosen mask of the current
crop on the viewer every N steps (one layer each, updated in place), and on finish offers the run folder to
the attention explorer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    SpinBox,
)
from qtpy.QtCore import QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    DeviceComboBox,
    JobRunner,
    LossPlot,
    Settings,
    cells_on_voxels,
    is_output_layer,
    jump_to,
    layer_select,
    notify_error,
    notify_info,
    notify_warning,
    stop_jobs_with,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets._subprocess import DEFAULT_NICE
from napari_dagman.core.config import PRESET_NAMES, TEACHER_NOISES, PretrainConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.methods.registry import REGISTRY

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.events import FinishedEvent, PreviewEvent, StepEvent

#: Names of the live preview layers (one each, updated in place).
PREVIEW_CROP = "pretrain preview: crop"
PREVIEW_ATTENTION = "pretrain preview: teacher attention"
PREVIEW_MASK = "pretrain preview: mask"
#: Shared with the attention dock: the run folder most recently trained (or resumed) from the GUI.
LAST_RUN_GROUP, LAST_RUN_KEY = "runs", "last_run"
DEFAULT_RUNS_FOLDER = str(Path.home() / "napari-dagman-runs")
EXPLORER_WIDGET = "Attention & mask explorer"
MASK_COLOUR = "#00e5ff"


def _default(name: str) -> Any:
    return PretrainConfig.__dataclass_fields__[name].default


class PretrainWidget(QWidget):
    """Self-supervised pretraining from napari: method, data, hyperparameters, device; live loss and preview."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._settings = Settings("pretrain")
        self._runner = JobRunner(
            self._on_event,
            on_done=self._on_done,
            on_error=self._on_error,
            on_stopped=self._on_stopped,
            description="DAGMaN pretraining",
            viewer=napari_viewer,
        )
        self._cancel_requested_at: float | None = None
        self._step_seconds: list[float] = []
        self._trained_layer_names: set[str] = set()
        self._checkpoints: dict[str, str] = {}
        self.last_finished: FinishedEvent | None = None
        #: Unix nice value of the training process (0 = same priority as napari); see docs/pretraining.md
        self.process_nice = DEFAULT_NICE
        self._build()
        self._on_method()
        stop_jobs_with(self, self._runner)  # closing the dock stops the run cleanly (it saves first)

    # --- form ---------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        import napari

        help_of = PretrainConfig.field_help()
        s = self._settings

        self.method = ComboBox(
            label="method",
            choices=[(spec.title, spec.name) for spec in REGISTRY.values()],
            value=s.get("method", _default("method")) if s.get("method") in REGISTRY else _default("method"),
        )
        self._method_summary = Label(value="")
        self._method_summary.native.setWordWrap(True)

        self.layers = layer_select(
            self._viewer,
            napari.layers.Image,
            "image layers",
            tooltip="open CT layers to pretrain on (hold Ctrl/Shift to pick several)",
            where=lambda layer: not is_output_layer(layer),
        )
        self.layers.native.setMaximumHeight(80)
        self.files = FileEdit(
            label="files",
            mode="rm",
            filter="CT (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd *.dcm)",
            tooltip="CT files to pretrain on, in addition to the chosen layers",
        )
        self.folder = FileEdit(
            label="folder",
            mode="d",
            tooltip="a DICOM series folder, or a folder of CT files (NIfTI, NRRD, MHA), read when the run starts",
        )

        self.preset = ComboBox(
            label="preset",
            choices=list(PRESET_NAMES),
            value=s.get("preset", _default("preset")),
            tooltip=help_of["preset"],
        )
        self.dims = ComboBox(
            label="input",
            choices=[("3D volumes", 3), ("2D axial slices", 2)],
            value=int(s.get("dims", _default("dims"))),
            tooltip=help_of["dims"],
        )
        self.roi = SpinBox(
            label="ROI (voxels)",
            min=32,
            max=512,
            step=32,
            value=int(s.get("roi", _default("roi"))),
            tooltip=help_of["roi"],
        )
        self.spacing = FloatSpinBox(
            label="spacing (mm)",
            min=0.0,
            max=20.0,
            step=0.25,
            value=float(s.get("spacing", _default("spacing"))),
            tooltip=help_of["spacing"] + "; 0 keeps the file's spacing",
        )

        self.length_unit = ComboBox(
            label="length",
            choices=["steps", "epochs"],
            value="steps",
            tooltip="train for a number of optimiser steps or of passes over the volumes",
        )
        self.length = SpinBox(label="count", min=1, max=10_000_000, value=1000, tooltip=help_of["steps"])
        self.batch_size = SpinBox(
            label="batch", min=1, max=256, value=_default("batch_size"), tooltip=help_of["batch_size"]
        )
        self.lr = LineEdit(
            label="learning rate", value="auto", tooltip=help_of["lr"] + "; 'auto' or a number such as 2e-4"
        )

        self.mask_ratio = FloatSpinBox(
            label="mask ratio", min=0.0, max=1.0, step=0.05, value=0.6, tooltip=help_of["mask_ratio"]
        )
        self.teacher_noise = ComboBox(
            label="teacher noise", choices=list(TEACHER_NOISES), tooltip=help_of["teacher_noise"]
        )
        self.noise_rate = FloatSpinBox(
            label="noise rate",
            min=0.0,
            max=1.0,
            step=0.05,
            value=_default("noise_rate"),
            tooltip=help_of["noise_rate"],
        )

        self.seed = SpinBox(
            label="seed", min=0, max=2**31 - 1, value=_default("seed"), tooltip=help_of["seed"]
        )
        self.device = DeviceComboBox(value=s.get("device", "auto"))
        self.runs_folder = FileEdit(
            label="runs folder",
            mode="d",
            value=s.get("runs_folder", DEFAULT_RUNS_FOLDER),
            tooltip="where new run folders are created (remembered)",
        )
        self.run_name = LineEdit(
            label="run name", value="", tooltip="name of the new run folder (empty: method and date)"
        )
        self.resume_from = FileEdit(
            label="resume from",
            mode="d",
            tooltip="a run folder to continue from its last checkpoint (its settings are loaded into the form)",
        )
        self.preview_every = SpinBox(
            label="preview every",
            min=0,
            max=100_000,
            value=_default("preview_every"),
            tooltip=help_of["preview_every"],
        )
        self.checkpoint_every = SpinBox(
            label="snapshot every",
            min=0,
            max=10_000_000,
            value=_default("checkpoint_every"),
            tooltip=help_of["checkpoint_every"],
        )
        self.follow = CheckBox(
            label="follow preview", value=True, tooltip="move the slice slider to each new preview crop"
        )
        self.in_process = CheckBox(
            label="separate process",
            value=str(s.get("in_process", "true")).lower() != "false",
            tooltip="train in a child process (recommended: napari stays responsive, GPU memory is freed on "
            "exit); untick to train in a thread of napari (debugging)",
        )

        sections = [
            ("Data", [self.layers, self.files, self.folder], True),
            ("Model", [self.preset, self.dims, self.roi, self.spacing], True),
            ("Optimisation", [self.length_unit, self.length, self.batch_size, self.lr], True),
            ("Masking and teacher", [self.mask_ratio, self.teacher_noise, self.noise_rate], False),
            (
                "Run",
                [
                    self.seed,
                    self.device,
                    self.runs_folder,
                    self.run_name,
                    self.resume_from,
                    self.preview_every,
                    self.checkpoint_every,
                    self.follow,
                    self.in_process,
                ],
                True,
            ),
        ]

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        head = Container(widgets=[self.method, self._method_summary], labels=True)
        head.margins = (0, 0, 0, 0)
        layout.addWidget(head.native)
        self._sections: dict[str, QCollapsible] = {}
        self._forms: list[Container] = [head]
        for title, widgets, expanded in sections:
            form = Container(widgets=widgets, labels=True)
            form.margins = (0, 0, 0, 0)
            box = QCollapsible(title, self)
            box.addWidget(form.native)
            if expanded:
                box.expand(animate=False)
            layout.addWidget(box)
            self._sections[title] = box
            self._forms.append(form)

        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("start pretraining; becomes Cancel while it runs")
        self.pause_button = QPushButton("Pause")
        self.pause_button.setEnabled(False)
        self.pause_button.setToolTip("hold the run after the current step; Resume continues")
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.pause_button)
        layout.addLayout(buttons)

        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.plot = LossPlot("training loss", "loss", log_y=True)
        layout.addWidget(self.plot)

        after = QHBoxLayout()
        self.explore_button = QPushButton("Explore attention")
        self.explore_button.setToolTip("open the finished run in the attention & mask explorer")
        self.explore_button.setEnabled(False)
        self.folder_button = QPushButton("Open run folder")
        self.folder_button.setEnabled(False)
        after.addWidget(self.explore_button)
        after.addWidget(self.folder_button)
        layout.addLayout(after)
        layout.addStretch(1)

        # device and runs folder are remembered as soon as they change (the rest when a run starts)
        self.device.changed.connect(lambda value: self._settings.set("device", str(value)))
        self.runs_folder.changed.connect(
            lambda *_: self._settings.set("runs_folder", self.runs_folder.line_edit.value.strip())
        )
        self.method.changed.connect(self._on_method)
        self.resume_from.changed.connect(self._on_resume_folder)
        self.length_unit.changed.connect(self._on_length_unit)
        self.start_button.clicked.connect(self.start_or_cancel)
        self.pause_button.clicked.connect(self.toggle_pause)
        self.explore_button.clicked.connect(lambda: self.open_in_explorer())
        self.folder_button.clicked.connect(lambda: self.open_run_folder())

    # --- reacting to the form ------------------------------------------------------------------------------------
    def _on_method(self, _value: Any = None) -> None:
        """Show the method's summary and load its defaults (mask ratio, teacher noise) into the form."""
        spec = REGISTRY[self.method.value]
        self._method_summary.value = spec.summary
        self.method.tooltip = spec.summary
        defaults = spec.defaults
        if defaults.get("mask_ratio") is not None:
            self.mask_ratio.value = float(defaults["mask_ratio"])
        if defaults.get("teacher_noise") is not None:
            self.teacher_noise.value = defaults["teacher_noise"]
        # without a teacher, teacher noise means nothing: say so rather than offering a dead control
        self.teacher_noise.enabled = self.noise_rate.enabled = spec.uses_teacher

    def _on_length_unit(self, _value: Any = None) -> None:
        help_of = PretrainConfig.field_help()
        self.length.tooltip = help_of[self.length_unit.value]

    def _on_resume_folder(self, _value: Any = None) -> None:
        """Load a run's settings into the form, so that the resumed model is the same one."""
        from napari_dagman.core.checkpoint import RunFolder

        path = self.resume_from.line_edit.value.strip()
        if not path:
            return
        try:
            saved = RunFolder(path).config_dict()
        except DagmanError as err:
            notify_error(err)
            return
        self.apply_config(saved)
        self.status.setText(f"resuming {path}: settings loaded; raise the step count to train further")

    def apply_config(self, data: dict[str, Any]) -> None:
        """Fill the form from a config dict (a run's config.json)."""
        if data.get("method") in REGISTRY:
            self.method.value = data["method"]
            self._on_method()
        for name, widget in (
            ("preset", self.preset),
            ("dims", self.dims),
            ("roi", self.roi),
            ("batch_size", self.batch_size),
            ("seed", self.seed),
            ("mask_ratio", self.mask_ratio),
            ("teacher_noise", self.teacher_noise),
            ("noise_rate", self.noise_rate),
            ("preview_every", self.preview_every),
            ("checkpoint_every", self.checkpoint_every),
        ):
            if data.get(name) is not None:
                widget.value = data[name]
        self.spacing.value = float(data["spacing"]) if data.get("spacing") is not None else 0.0
        if data.get("steps"):
            self.length_unit.value = "steps"
            self.length.value = int(data["steps"])
        self.lr.value = f"{data['lr']:g}" if data.get("lr") is not None else "auto"

    # --- building the job ----------------------------------------------------------------------------------------
    def _paths(self) -> list[str]:
        """Files and the folder entry; a folder of CT files becomes its files (as on the command line)."""
        from napari_dagman.cli.pretrain import expand_inputs

        raw = [str(p) for p in (self.files.value or ()) if str(p).strip() not in ("", ".")]
        folder = self.folder.line_edit.value.strip()
        if folder:
            raw.append(folder)
        for path in raw:
            if not Path(path).exists():
                raise DagmanInputError(f"{path} does not exist")
        return expand_inputs(raw)

    def _learning_rate(self) -> float | None:
        text = self.lr.value.strip().lower()
        if text in ("", "auto"):
            return None
        try:
            return float(text)
        except ValueError:
            raise DagmanInputError(
                f"learning rate must be 'auto' or a number, got {self.lr.value!r}"
            ) from None

    def _run_folder(self) -> tuple[str, bool]:
        """(run folder, resume?)."""
        resume = self.resume_from.line_edit.value.strip()
        if resume:
            return resume, True
        parent = self.runs_folder.line_edit.value.strip()
        if not parent:
            raise DagmanInputError("choose a runs folder for the new run")
        name = self.run_name.value.strip() or f"{self.method.value}-{time.strftime('%Y%m%d-%H%M%S')}"
        return str(Path(parent).expanduser() / name), False

    def build_job(self) -> tuple[PretrainConfig, list[Any], bool]:
        """The config, the layer volumes and the resume flag the Start button would run (raises on bad input)."""
        from napari_dagman._widgets._jobs import picklable_volume
        from napari_dagman.core.checkpoint import RunFolder

        out, resume = self._run_folder()
        images = self._paths()
        volumes = [picklable_volume(volume_from_layer(layer, "image")) for layer in self.layers.value]
        base: dict[str, Any] = {}
        if resume:
            # the resolved settings of the run (schedules, HU window...) so the run continues exactly
            base = PretrainConfig.from_dict(RunFolder(out).config_dict(), strict=False).to_dict()
            if not volumes and not images:
                images = list(base.get("images") or [])
                if not images:
                    raise DagmanInputError(
                        f"{out} was trained on napari layers: choose the same image layers to resume it"
                    )
        elif not volumes and not images:
            raise DagmanInputError("no training data: choose image layers, files or a folder")
        unit = self.length_unit.value
        base.update(
            images=images,
            out=out,
            method=self.method.value,
            preset=self.preset.value,
            dims=int(self.dims.value),
            roi=int(self.roi.value),
            spacing=float(self.spacing.value) or None,
            steps=int(self.length.value) if unit == "steps" else None,
            epochs=int(self.length.value) if unit == "epochs" else None,
            batch_size=int(self.batch_size.value),
            lr=self._learning_rate(),
            mask_ratio=float(self.mask_ratio.value),
            teacher_noise=self.teacher_noise.value,
            noise_rate=float(self.noise_rate.value),
            seed=int(self.seed.value),
            device=str(self.device.value),
            preview_every=int(self.preview_every.value),
            checkpoint_every=int(self.checkpoint_every.value),
        )
        if not REGISTRY[self.method.value].uses_teacher:
            base.pop("teacher_noise")  # the method's own default ("none")
        config = PretrainConfig.from_dict(base)
        return config, volumes, resume

    # --- start / cancel / pause --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._runner.running

    def start_or_cancel(self) -> None:
        if self._runner.running:
            self.cancel()
        else:
            self.start()

    def start(self) -> bool:
        """Start a run from the form; bad input gives a notification. True when a run started."""
        from napari_dagman._widgets._jobs import pretrain_job

        if self._runner.running:
            notify_warning("a pretraining run is already going; cancel it first")
            return False
        try:
            config, volumes, resume = self.build_job()
        except DagmanError as err:
            notify_error(err)
            return False
        self._remember()
        # the engine names a volume by its metadata name: previews of these crops overlay an open layer
        self._trained_layer_names = {
            str(volume.metadata.get("name") or f"volume {i}") for i, volume in enumerate(volumes)
        }
        self._checkpoints.clear()
        self._step_seconds.clear()
        self._cancel_requested_at = None
        self.last_finished = None
        self.plot.clear()
        command = "napari-dagman pretraining dock"
        if self.in_process.value:
            self._runner.start_in_process(
                pretrain_job, config, volumes, resume=resume, command=command, nice=self.process_nice
            )
        else:
            self._runner.start(
                lambda token: pretrain_job(config, volumes, resume=resume, cancel=token, command=command)
            )
        self._set_running(True)
        where = "a separate process" if self.in_process.value else "a thread"
        self.status.setText(f"starting {config.method} in {where} on {config.device}: {config.out}")
        return True

    def cancel(self) -> None:
        """Stop at the end of the current step; the run saves a resumable checkpoint first."""
        if not self._runner.running:
            return
        self._cancel_requested_at = time.monotonic()
        self._runner.cancel()
        self.start_button.setEnabled(False)
        self.pause_button.setEnabled(False)
        self.status.setText("cancelling: finishing the current step and saving a checkpoint...")

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

    def _set_running(self, running: bool) -> None:
        self.start_button.setText("Cancel" if running else "Start")
        self.start_button.setEnabled(True)
        self.pause_button.setEnabled(running)
        self.pause_button.setText("Pause")
        for form in self._forms:
            form.enabled = not running

    def _remember(self) -> None:
        s = self._settings
        s.set("device", str(self.device.value))
        s.set("runs_folder", self.runs_folder.line_edit.value.strip())
        s.set("method", self.method.value)
        s.set("preset", self.preset.value)
        s.set("dims", int(self.dims.value))
        s.set("roi", int(self.roi.value))
        s.set("spacing", float(self.spacing.value))
        s.set("in_process", "true" if self.in_process.value else "false")

    # --- events from the job (main thread) -------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import CheckpointEvent, LogEvent, PreviewEvent, StepEvent

        if isinstance(event, StepEvent):
            self._on_step(event)
        elif isinstance(event, PreviewEvent):
            self._on_preview(event)
        elif isinstance(event, CheckpointEvent):
            self._checkpoints[event.kind] = event.path
        elif isinstance(event, LogEvent):
            if event.level == "warning":
                notify_warning(event.message)
            elif self._cancel_requested_at is None:
                self.status.setText(event.message)

    def _on_step(self, event: StepEvent) -> None:
        self.plot.add_point("loss", event.step, event.loss)
        for name, value in event.terms.items():
            self.plot.add_point(name, event.step, value)
        self._step_seconds.append(event.seconds_per_step)
        recent = self._step_seconds[-20:]
        seconds = float(np.mean(recent))
        eta = seconds * (event.total_steps - event.step)
        parts = [
            f"step {event.step}/{event.total_steps}",
            f"loss {event.loss:.4g}",
            f"{seconds:.2f} s/step",
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
        ]
        diversity = event.extras.get("head_diversity")
        if diversity is not None and np.isfinite(diversity):
            parts.append(f"head diversity {diversity:.3f}")
        if self._runner.paused:
            parts.append("pausing")
        if self._cancel_requested_at is None:
            self.status.setText(" · ".join(parts))

    def _on_preview(self, event: PreviewEvent) -> None:
        """The crop, the teacher's attention and the mask of this step, one layer each, updated in place."""
        from_layer = event.volume_name in self._trained_layer_names
        self._preview_layer(
            PREVIEW_CROP,
            event.image,
            "image",
            event.image_scale,
            event.image_translate,
            # training on layers: the CT is already there; from files: show what the model saw
            create={"colormap": "gray", "contrast_limits": (0.0, 1.0), "visible": not from_layer},
        )
        if event.attention is not None:
            # relative attention (x number of tokens): 1 = uniform, the unit of the attention explorer too
            mean = event.attention.mean(axis=0) * float(np.prod(event.attention.shape[1:]))
            self._preview_layer(
                PREVIEW_ATTENTION,
                mean.astype(np.float32),
                "image",
                event.attention_scale,
                event.attention_translate,
                create={"colormap": "inferno", "blending": "additive", "opacity": 0.7},
                contrast_limits=(0.0, max(2.0, float(mean.max()))),
            )
        # outlines of the hidden cells, drawn on the crop's voxels so that they read over the attention
        self._preview_layer(
            PREVIEW_MASK,
            cells_on_voxels(event.mask.astype(np.uint8), event.mask_scale, event.image_scale),
            "labels",
            event.image_scale,
            event.image_translate,
            create={"colormap": {1: MASK_COLOUR, None: "transparent"}, "opacity": 0.9, "contour": 1},
        )
        if self.follow.value:
            centre = np.asarray(event.image_translate) + (np.asarray(event.image.shape) - 1) / 2 * np.asarray(
                event.image_scale
            )
            current = np.asarray(self._viewer.dims.point)[-3:]
            if abs(current[0] - centre[0]) > event.image_scale[0] * event.image.shape[0] / 2:
                # only when the slice shown is outside the crop: moving the slider re-slices every layer
                jump_to(self._viewer, centre, center_camera=False)

    def _preview_layer(
        self,
        name: str,
        data: np.ndarray,
        layer_type: str,
        scale: list[float],
        translate: list[float],
        *,
        create: dict[str, Any],
        **update: Any,
    ) -> None:
        """Update ``name`` in place; style it only when it is created, so the user's changes stay."""
        kwargs: dict[str, Any] = {"scale": scale, "translate": translate, **update}
        created = name not in self._viewer.layers
        if created:
            kwargs["metadata"] = {OUTPUT_KEY: "pretrain-preview"}
            kwargs.update({k: v for k, v in create.items() if k != "contour"})
        layer = upsert_layer(self._viewer, name, data, layer_type, **kwargs)
        if created and "contour" in create:  # not an add_labels() argument
            layer.contour = create["contour"]

    def _on_done(self, finished: Any) -> None:
        from napari_dagman.core.events import FinishedEvent

        if not isinstance(finished, FinishedEvent):
            return
        self.last_finished = finished
        Settings(LAST_RUN_GROUP).set(LAST_RUN_KEY, finished.run_dir)
        best, last = finished.paths.get("best", ""), finished.paths.get("last", "")
        if finished.cancelled:
            head = f"Pretraining cancelled at step {finished.steps_done}/{finished.total_steps}; resumable."
        else:
            head = f"Pretraining finished: {finished.steps_done} steps."
        lines = [head, f"Run folder: {finished.run_dir}", f"last: {last}"]
        if best and Path(best).is_file():
            lines.append(f"best: {best}")
        self.status.setText("\n".join(lines))
        self.explore_button.setEnabled(True)
        self.folder_button.setEnabled(True)
        notify_info(
            "\n".join(lines),
            actions=[
                ("Explore attention", lambda *_: self.open_in_explorer(finished.run_dir)),
                ("Open folder", lambda *_: self.open_run_folder(finished.run_dir)),
            ],
        )

    def _on_error(self, err: BaseException) -> None:
        # the notification is already out (JobRunner); the dock keeps the reason and goes back to idle
        last = self._checkpoints.get("last")
        self.status.setText(f"failed: {err}" + (f"\nlast good checkpoint: {last}" if last else ""))

    def _on_stopped(self) -> None:
        self._set_running(False)
        self._cancel_requested_at = None

    # --- after the run -------------------------------------------------------------------------------------------
    def _finished_run(self, run_dir: str | None) -> str | None:
        if run_dir:
            return run_dir
        if self.last_finished is not None:
            return self.last_finished.run_dir
        notify_warning("no finished run yet")
        return None

    def open_in_explorer(self, run_dir: str | None = None) -> Any:
        """Dock the attention & mask explorer with this run folder chosen; returns the explorer widget."""
        run_dir = self._finished_run(run_dir)
        if run_dir is None:
            return None
        try:
            _, widget = self._viewer.window.add_plugin_dock_widget("napari-dagman", EXPLORER_WIDGET)
        except (KeyError, LookupError, ValueError) as err:
            notify_error(f"cannot open the attention explorer: {err}")
            return None
        widget.set_run(run_dir)
        return widget

    def open_run_folder(self, run_dir: str | None = None) -> None:
        run_dir = self._finished_run(run_dir)
        if run_dir is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(run_dir))
