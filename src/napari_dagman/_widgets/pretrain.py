"""Pretraining dock: gather a `PretrainConfig`, run `core.training.run_pretraining` in the background, draw its events.

The run happens in a child process by default (see `_subprocess` for why); a thread is available for
debugging. The dock shows the loss terms live, puts the teacher's attention and the chosen mask of the current
crop on the viewer every N steps (one layer each, updated in place), and on finish offers the run folder to
the attention explorer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    SpinBox,
)
from qtpy.QtCore import QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QVBoxLayout

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    LossPlot,
    cells_on_voxels,
    is_output_layer,
    jump_to,
    layer_select,
    notify_error,
    remember_last_run,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets._training import Actions, TrainingDock, compact_form, path_text
from napari_dagman.core.config import PRESET_NAMES, TEACHER_NOISES, PretrainConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.methods.registry import REGISTRY

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.events import FinishedEvent, PreviewEvent, StepEvent
    from napari_dagman.core.volume import Volume

#: Names of the live preview layers (one each, updated in place).
PREVIEW_CROP = "pretrain preview: crop"
PREVIEW_ATTENTION = "pretrain preview: teacher attention"
PREVIEW_MASK = "pretrain preview: mask"
EXPLORER_WIDGET = "Attention & mask explorer"
MASK_COLOUR = "#00e5ff"


def _default(name: str) -> Any:
    return PretrainConfig.__dataclass_fields__[name].default


class PretrainWidget(TrainingDock):
    """Self-supervised pretraining from napari: method, data, hyperparameters, device; live loss and preview."""

    run_kind = "pretraining"
    command = "napari-dagman pretraining dock"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="pretrain", description="DAGMaN pretraining")
        self._step_seconds: list[float] = []
        self._probe_diversity: float | None = None
        self._trained_layer_names: set[str] = set()
        self._build()
        self._on_method()

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
        self._make_run_widgets(
            run_name_tip="name of the new run folder (empty: method and date)",
            resume_tip="a run folder to continue from its last checkpoint (its settings are loaded into the form)",
            in_process_tip="train in a child process (recommended: napari stays responsive, GPU memory is freed "
            "on exit); untick to train in a thread of napari (debugging)",
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
        head = compact_form([self.method, self._method_summary])
        layout.addWidget(head.native)
        self._forms.append(head)
        self._add_sections(layout, sections)
        self._add_run_controls(
            layout, start_tip="start pretraining; becomes Cancel while it runs", loss_label="loss"
        )

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

        self.method.changed.connect(self._on_method)
        self.resume_from.changed.connect(self._on_resume_folder)
        self.length_unit.changed.connect(self._on_length_unit)
        self.explore_button.clicked.connect(lambda: self.open_in_explorer())
        self.folder_button.clicked.connect(lambda: self.open_run_folder())

    @property
    def plot(self) -> LossPlot:
        """The training-loss curve (the name scripts and tests know)."""
        return self.loss_plot

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

        path = path_text(self.resume_from)
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

    def build_job(self) -> tuple[PretrainConfig, list[Any], bool]:
        """The config, the layer volumes and the resume flag the Start button would run (raises on bad input)."""
        from napari_dagman._widgets._jobs import picklable_volume
        from napari_dagman.core.checkpoint import RunFolder

        out, resume = self._run_folder(self.method.value)
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

    # --- running the job (hooks of TrainingDock) ---------------------------------------------------------------
    def _job(self) -> Callable[..., Generator[Any, None, Any]]:
        from napari_dagman._widgets._jobs import pretrain_job

        return pretrain_job

    def _prepare_run(self, data: list[Volume]) -> None:
        # the engine names a volume by its metadata name: previews of these crops overlay an open layer
        self._trained_layer_names = {
            str(volume.metadata.get("name") or f"volume {i}") for i, volume in enumerate(data)
        }
        self._step_seconds.clear()
        self._probe_diversity = None

    def _starting_text(self, config: PretrainConfig) -> str:
        where = "a separate process" if self.in_process.value else "a thread"
        return f"starting {config.method} in {where} on {config.device}: {config.out}"

    def _remember(self) -> None:
        super()._remember()
        s = self._settings
        s.set("method", self.method.value)
        s.set("preset", self.preset.value)
        s.set("dims", int(self.dims.value))
        s.set("roi", int(self.roi.value))
        s.set("spacing", float(self.spacing.value))

    # --- events from the job (main thread) -------------------------------------------------------------------
    def _on_job_event(self, event: Any) -> None:
        from napari_dagman.core.events import PreviewEvent

        if isinstance(event, PreviewEvent):
            self._on_preview(event)

    def _step_text(self, event: StepEvent) -> str:
        """Step, loss, speed and ETA (over the last 20 steps), head diversity when the method reports it."""
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
        # measured on the run's probe crops every --probe-every steps: keep the latest figure on screen
        probe = event.extras.get("probe_teacher_head_diversity")
        if probe is not None and np.isfinite(probe):
            self._probe_diversity = float(probe)
        if self._probe_diversity is not None:
            parts.append(f"teacher head diversity {self._probe_diversity:.3f}")
        if self._runner.paused:
            parts.append("pausing")
        return " · ".join(parts)

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

    def _finish_report(self, finished: FinishedEvent) -> tuple[str, Actions]:
        """Run folder and checkpoints; the run becomes the attention explorer's "last run"."""
        remember_last_run(finished.run_dir)
        best, last = finished.paths.get("best", ""), finished.paths.get("last", "")
        if finished.cancelled:
            head = f"Pretraining cancelled at step {finished.steps_done}/{finished.total_steps}; resumable."
        else:
            head = f"Pretraining finished: {finished.steps_done} steps."
        lines = [head, f"Run folder: {finished.run_dir}", f"last: {last}"]
        if best and Path(best).is_file():
            lines.append(f"best: {best}")
        self.explore_button.setEnabled(True)
        self.folder_button.setEnabled(True)
        actions: Actions = [
            ("Explore attention", lambda *_: self.open_in_explorer(finished.run_dir)),
            ("Open folder", lambda *_: self.open_run_folder(finished.run_dir)),
        ]
        return "\n".join(lines), actions

    # --- after the run -------------------------------------------------------------------------------------------
    def open_in_explorer(self, run_dir: str | None = None) -> Any:
        """Dock the attention & mask explorer with this run folder chosen; returns the explorer widget."""
        return self._open_with_run(EXPLORER_WIDGET, "attention explorer", run_dir)

    def open_run_folder(self, run_dir: str | None = None) -> None:
        run_dir = self._finished_run(run_dir)
        if run_dir is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(run_dir))
