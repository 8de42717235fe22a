"""Pretraining dock: a `PretrainConfig` from forms, `core.training.run_pretraining` in the background, its events drawn.

The form is built from the config's fields (`_forms.ConfigForm`): the general options, and the chosen method's own
options (its options dataclass, preset values first), rebuilt when the method changes. What a method does is read
from its `capabilities`, never from its name. The run happens in a child process by default (see `_subprocess`
for why; a thread is there for debugging). The dock shows the loss terms live, puts the crop, the class attention,
the chosen mask and the cells the noisy teacher did not see on the viewer every N steps (one layer each, updated
in place), and on finish offers the run folder to the attention explorer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit
from qtpy.QtCore import QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    cells_on_voxels,
    is_output_layer,
    jump_to,
    layer_select,
    path_text,
    remember_last_run,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets._forms import (
    ConfigForm,
    add_sections,
    compact_form,
    default_values,
    field_spec,
    placeholder,
    with_widgets,
    wrapped_label,
)
from napari_dagman._widgets._plots import LossPlot
from napari_dagman._widgets._training import Actions, TrainingDock
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.methods.registry import REGISTRY, MethodSpec, get_method

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.events import FinishedEvent, PreviewEvent, StepEvent
    from napari_dagman.core.volume import Volume

#: Names of the live preview layers (one each, updated in place).
PREVIEW_CROP = "pretrain preview: crop"
PREVIEW_ATTENTION = "pretrain preview: teacher attention"
PREVIEW_CLASS_ATTENTION = "pretrain preview: class attention"  # a method that trains it without a teacher
PREVIEW_MASK = "pretrain preview: mask"
PREVIEW_UNSEEN = "pretrain preview: unseen by the teacher"
PREVIEW_PICTURE = "pretrain preview: {}"  # a method's own picture, by name
PREVIEW_LAYERS = (PREVIEW_CROP, PREVIEW_ATTENTION, PREVIEW_CLASS_ATTENTION, PREVIEW_MASK, PREVIEW_UNSEEN)
EXPLORER_WIDGET = "Attention & mask explorer"
MASK_COLOUR = "#00e5ff"
UNSEEN_COLOUR = "#ff9100"

#: The general fields of `PretrainConfig` the dock shows, by section (the method's own options come separately).
GENERAL_FIELDS: tuple[str, ...] = (
    "roi", "spacing", "hu_min", "hu_max",  # data
    "view_region", "augment", "aug_intensity", "aug_contrast", "aug_noise", "aug_blur", "aug_flip", "aug_rotate",
    "aug_zoom",  # views
    "preset", "dims", "attention_stage", "out_dim", "drop_path", "mask_cell",  # model (+ mask cell)
    "steps", "batch_size", "lr", "min_lr", "weight_decay", "warmup_steps", "grad_clip", "precision", "compile",
    "fused_attention",
    "seed", "device", "preview_every", "checkpoint_every", "threads", "log_every", "save_every", "probe_every",
    "probe_crops",
)  # fmt: skip
#: Shown at first; the rest of each section is folded under "more ... options".
PRIMARY_FIELDS = frozenset(
    {"roi", "spacing", "preset", "dims", "steps", "batch_size", "lr", "seed", "device", "preview_every",
     "checkpoint_every"}
)  # fmt: skip
#: Form widgets that are also attributes of the dock (the names scripts and tests use).
EXPOSED: tuple[str, ...] = (
    "preset",
    "dims",
    "roi",
    "spacing",
    "batch_size",
    "lr",
    "seed",
    "preview_every",
    "checkpoint_every",
)
#: How the form's fields are labelled in this dock (the field name otherwise).
LABELS = {
    "roi": "ROI (voxels)",
    "spacing": "spacing (mm)",
    "dims": "input",
    "steps": "count",
    "batch_size": "batch",
    "lr": "learning rate",
    "preview_every": "preview every",
    "checkpoint_every": "snapshot every",
    "hu_min": "HU min",
    "hu_max": "HU max",
    "view_region": "view region (x ROI)",
    "augment": "augment each view",
}
SECTION_TITLES = {
    "data": "Data",
    "views": "Views",
    "model": "Model",
    "masking": "Model",
    "optimisation": "Optimisation",
    "run": "Run",
}


def describe_capabilities(capabilities: Any) -> str:
    """One line saying what a method does (its capabilities), for the dock's summary."""
    parts = [
        "EMA teacher" if capabilities.has_teacher else "no teacher",
        "trains the class attention"
        if capabilities.trains_class_attention
        else "class attention not trained",
    ]
    if capabilities.reconstructs:
        parts.append("reconstructs masked voxels")
    return "; ".join(parts)


class PretrainWidget(TrainingDock):
    """Self-supervised pretraining from napari: method, data, hyperparameters, device; live loss and preview."""

    run_kind = "pretraining run"
    job = "pretrain"
    command = "napari-dagman pretraining dock"
    remembered_fields = ("method", "preset", "dims", "roi", "spacing")

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="pretrain", description="pretraining")
        self._picture_layers: set[str] = set()
        self._step_seconds: list[float] = []
        self._probe_diversity: dict[str, float] = {}
        self._trained_layer_names: set[str] = set()
        self.method_form: ConfigForm | None = None
        self._method_forms: list[Any] = []
        self._build()
        self._restore_form()
        self._on_method()

    # --- form ---------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self._make_inputs()
        self._make_run_widgets(
            run_name_tip="name of the new run folder (empty: method and date)",
            resume_tip="a run folder to continue from its last checkpoint (its settings are loaded into the form)",
            in_process_tip="train in a child process (recommended: napari stays responsive, GPU memory is freed "
            "on exit); untick to train in a thread of napari (debugging)",
        )
        self.method = ComboBox(label="method", choices=self._method_choices)
        self.form = ConfigForm(
            PretrainConfig,
            ("method", *GENERAL_FIELDS),
            widgets={"device": self.device, "method": self.method},
            labels=LABELS,
            steps={"roi": 32},
            choice_text={"dims": {3: "3D volumes", 2: "2D axial slices"}},
        )
        self.method.value = default_values(PretrainConfig)["method"]
        self._expose(self.form, EXPOSED)
        self.length = self.form["steps"]
        self.length_unit = ComboBox(
            label="length",
            choices=["steps", "epochs"],
            value="steps",
            tooltip="train for a number of optimiser steps or of passes over the volumes",
        )
        self.follow = CheckBox(
            label="follow preview", value=True, tooltip="move the slice slider to each new preview crop"
        )
        self._lay_out()
        self.method.changed.connect(self._on_method)
        self.resume_from.changed.connect(self._on_resume_folder)
        self.length_unit.changed.connect(self._on_length_unit)
        self.explore_button.clicked.connect(lambda: self.open_in_explorer())
        self.folder_button.clicked.connect(lambda: self.open_run_folder())

    def _make_inputs(self) -> None:
        import napari

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

    def _lay_out(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        sections = with_widgets(
            self.form.sections(
                SECTION_TITLES, primary=PRIMARY_FIELDS, expanded=("data", "model", "optimisation", "run")
            ),
            before={"Data": [self.layers, self.files, self.folder], "Optimisation": [self.length_unit]},
            after={"Run": [self.runs_folder, self.run_name, self.resume_from, self.follow, self.in_process]},
        )
        general = [s for s in sections if s[0] != "General"]  # the method combo sits in the method's box
        self._add_sections(layout, general[:2])
        self._add_method_box(layout)
        self._add_sections(layout, general[2:])
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
        self.make_scrollable()

    def _add_method_box(self, layout: QVBoxLayout) -> None:
        """The "Method" box: the method, its summary and its own options (rebuilt when the method changes)."""
        self._method_summary = wrapped_label()
        head = compact_form([self.method, self._method_summary])
        self._forms.append(head)
        box = QCollapsible("Method", self)
        box.addWidget(head.native)
        self._method_holder = QWidget()
        self._method_layout = QVBoxLayout(self._method_holder)
        self._method_layout.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self._method_holder)
        box.expand(animate=False)
        layout.addWidget(box)

    @staticmethod
    def _method_choices(_widget: Any = None) -> list[tuple[str, str]]:
        """Every registered method (read each time: user code may register one after napari started)."""
        return [(spec.title, spec.name) for spec in REGISTRY.values()]

    @property
    def plot(self) -> LossPlot:
        """The training-loss curve (the name scripts and tests know)."""
        return self.loss_plot

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method.value)

    @property
    def capabilities(self) -> Any:
        """The chosen method's capabilities (what it trains, previews...)."""
        return self.spec.capabilities

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.method.reset_choices()  # methods registered since the dock was made
        super().showEvent(event)

    # --- reacting to the form ------------------------------------------------------------------------------------
    def _on_method(self, _value: Any = None) -> None:
        """Show the method's summary and rebuild its options form with the preset's values."""
        spec = self.spec
        self._method_summary.value = f"{spec.summary}\n({describe_capabilities(spec.capabilities)})"
        self.method.tooltip = spec.summary
        self._set_method_form(spec)

    def _set_method_form(self, spec: MethodSpec) -> None:
        """The method's options: the ones its preset sets shown, the others folded by group."""
        for form in self._method_forms:
            if form in self._forms:
                self._forms.remove(form)
        while self._method_layout.count():
            item = self._method_layout.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.method_form = form = ConfigForm(spec.options_class(), defaults=spec.default_options())
        sections = form.sections(primary=set(spec.defaults), expanded=False)
        shown = [widget for _, widgets, _, _ in sections for widget in widgets]
        folded = [(f"{title} options", widgets, [], False) for title, _, widgets, _ in sections if widgets]
        made = []
        if shown:
            made.append(compact_form(shown))
            self._method_layout.addWidget(made[-1].native)
        made += add_sections(self._method_layout, folded, self._method_holder)
        self._method_forms = made
        self._forms.extend(made)
        for widget in made:
            widget.enabled = not self.running

    def _on_length_unit(self, _value: Any = None) -> None:
        spec = field_spec(PretrainConfig, self.length_unit.value)
        self.length.tooltip = spec.help
        self.length.native.setPlaceholderText(placeholder(spec.auto_text))

    def _on_resume_folder(self, _value: Any = None) -> None:
        """Load a run's settings into the form, so that the resumed model is the same one."""
        from napari_dagman.core.checkpoint import RunFolder

        path = path_text(self.resume_from)
        if not path:
            return
        try:
            changed = self.apply_config(RunFolder(path).config_dict())
        except DagmanError as err:
            self.refuse(err)
            return
        # the run's resolved values replace "auto" (so its schedule continues exactly): say which, never silently
        note = f" ({', '.join(changed)})" if changed else ""
        self.status.setText(
            f"resuming {path}: the run's settings are loaded{note}; raise the step count to train further"
        )

    def apply_config(self, data: dict[str, Any]) -> list[str]:
        """Fill the form from a config dict (a run's config.json); raises `DagmanError` on a bad one.

        Returns what changed in the general form, as "label old -> new" (e.g. "learning rate auto -> 0.0001").
        """
        config = PretrainConfig.from_dict(data, strict=False)
        before = self.form.values()
        self.method.value = config.method  # rebuilds the method's form when it changes
        values = config.to_dict()
        epochs = values.get("epochs")
        self.length_unit.value = "epochs" if epochs else "steps"
        values["steps"] = epochs or values.get("steps")
        self.form.set_values({k: v for k, v in values.items() if k not in ("method", "device")})
        if self.method_form is not None:
            self.method_form.set_values(config.options)
        after = self.form.values()

        def shown(value: Any) -> str:
            return "auto" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

        return [
            f"{self.form[name].label} {shown(before[name])} -> {shown(after[name])}"
            for name in self.form.fields
            if name not in ("method", "device") and before[name] != after[name]
        ]

    # --- building the job ----------------------------------------------------------------------------------------
    def _paths(self) -> list[str]:
        """Files and the folder entry; a folder of CT files becomes its files (as on the command line)."""
        from napari_dagman.core.io import expand_inputs

        raw = [str(p) for p in (self.files.value or ()) if str(p).strip() not in ("", ".")]
        folder = path_text(self.folder)
        if folder:
            raw.append(folder)
        for path in raw:
            if not Path(path).exists():
                raise DagmanInputError(f"{path} does not exist")
        return expand_inputs(raw)

    def config_values(self) -> dict[str, Any]:
        """The form's general values and the method's options, as `PretrainConfig.from_dict` takes them."""
        values = self.form.values()
        length = values.pop("steps")
        unit = self.length_unit.value
        values["steps"], values["epochs"] = (length, None) if unit == "steps" else (None, length)
        values["options"] = self.method_form.values() if self.method_form is not None else {}
        return values

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
            base.pop(
                base.get("method"), None
            )  # its method options: the form holds them (loaded from the run)
            if not volumes and not images:
                images = list(base.get("images") or [])
                if not images:
                    raise DagmanInputError(
                        f"{out} was trained on napari layers: choose the same image layers to resume it"
                    )
        elif not volumes and not images:
            raise DagmanInputError("no training data: choose image layers, files or a folder")
        base.update(self.config_values(), images=images, out=out)
        return PretrainConfig.from_dict(base), volumes, resume

    # --- running the job (hooks of TrainingDock) ---------------------------------------------------------------
    def _job(self) -> Callable[..., Generator[Any, None, Any]]:
        from napari_dagman._widgets._jobs import pretrain_job

        return pretrain_job

    def _job_options(self, config: PretrainConfig) -> dict[str, Any]:
        # a method registered by user code exists only in this process: the child registers it too
        return {"methods": (get_method(config.method),)}

    def _prepare_run(self, data: list[Volume]) -> None:
        # the engine names a volume by its metadata name: previews of these crops overlay an open layer
        self._trained_layer_names = {
            str(volume.metadata.get("name") or f"volume {i}") for i, volume in enumerate(data)
        }
        self._step_seconds.clear()
        self._probe_diversity.clear()
        self.remove_previews()  # a previous run's previews would mislead

    def _starting_text(self, config: PretrainConfig) -> str:
        where = "a separate process" if self.in_process.value else "a thread"
        return f"starting {config.method} in {where} on {config.device}: {config.out}"

    # --- events from the job (main thread) -------------------------------------------------------------------
    def _on_job_event(self, event: Any) -> None:
        from napari_dagman.core.events import PreviewEvent

        if isinstance(event, PreviewEvent):
            self._on_preview(event)

    def _step_text(self, event: StepEvent) -> str:
        """Step, loss, speed and ETA (over the last 20 steps), head diversity when the method trains attention."""
        self._step_seconds.append(event.seconds_per_step)
        seconds = float(np.mean(self._step_seconds[-20:]))
        eta = seconds * (event.total_steps - event.step)
        parts = [
            f"step {event.step}/{event.total_steps}",
            f"loss {event.loss:.4g}",
            f"{seconds:.2f} s/step",
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
        ]
        if self.capabilities.trains_class_attention:
            # measured on the run's probe crops every --probe-every steps: keep the latest figures on screen
            for key, value in event.extras.items():
                found = re.fullmatch(r"probe_(\w+)_head_diversity", key)
                if found and np.isfinite(value):
                    self._probe_diversity[found.group(1)] = float(value)
            if self._probe_diversity:
                figures = ", ".join(f"{name} {value:.3f}" for name, value in self._probe_diversity.items())
                parts.append(f"head diversity: {figures}")
        if self._runner.paused:
            parts.append("pausing")
        return " · ".join(parts)

    def _on_preview(self, event: PreviewEvent) -> None:
        """The crop, the class attention, the mask and the unseen cells of this step, one layer each, in place."""
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
        capabilities = self.capabilities
        if event.attention is not None and "attention" in capabilities.previews:
            # relative attention (x number of tokens): 1 = uniform, the unit of the attention explorer too
            mean = event.attention.mean(axis=0) * float(np.prod(event.attention.shape[1:]))
            self._preview_layer(
                PREVIEW_ATTENTION if capabilities.has_teacher else PREVIEW_CLASS_ATTENTION,
                mean.astype(np.float32),
                "image",
                event.attention_scale,
                event.attention_translate,
                create={"colormap": "inferno", "blending": "additive", "opacity": 0.7},
                contrast_limits=(0.0, max(2.0, float(mean.max()))),
            )
        if "mask" in capabilities.previews:
            # outlines of the hidden cells, drawn on the crop's voxels so that they read over the attention
            self._cell_layer(PREVIEW_MASK, event.mask, event, MASK_COLOUR)
        if event.unseen is not None:
            self._cell_layer(PREVIEW_UNSEEN, event.unseen, event, UNSEEN_COLOUR)
        for picture in event.pictures:  # the method's own pictures: MiM's masks per level, reconstructions
            from napari_dagman.core.volume import grid_placement

            scale, translate = grid_placement(event.image_translate, event.image_scale, picture.factor)
            labels = picture.kind == "labels"
            self._preview_layer(
                PREVIEW_PICTURE.format(picture.name),
                picture.array,
                "labels" if labels else "image",
                scale,
                translate,
                create={"opacity": 0.5} if labels else {"colormap": "gray", "visible": False},
            )
            self._picture_layers.add(PREVIEW_PICTURE.format(picture.name))
        if self.follow.value:
            centre = np.asarray(event.image_translate) + (np.asarray(event.image.shape) - 1) / 2 * np.asarray(
                event.image_scale
            )
            current = np.asarray(self._viewer.dims.point)[-3:]
            if abs(current[0] - centre[0]) > event.image_scale[0] * event.image.shape[0] / 2:
                # only when the slice shown is outside the crop: moving the slider re-slices every layer
                jump_to(self._viewer, centre, center_camera=False)

    def _cell_layer(self, name: str, cells: np.ndarray, event: PreviewEvent, colour: str) -> None:
        """Cells of the mask grid as outlines on the crop's voxels."""
        self._preview_layer(
            name,
            cells_on_voxels(cells.astype(np.uint8), event.mask_scale, event.image_scale),
            "labels",
            event.image_scale,
            event.image_translate,
            create={"colormap": {1: colour, None: "transparent"}, "opacity": 0.9, "contour": 1},
        )

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
        run_dir = finished.run_dir
        first: tuple[str, Callable[..., Any]] = (
            # a cancelled run is offered to go on; a finished one, to be looked at
            ("Resume", lambda *_: self.resume_run(run_dir))
            if finished.cancelled
            else ("Explore attention", lambda *_: self.open_in_explorer(run_dir))
        )
        return "\n".join(lines), [first, ("Open folder", lambda *_: self.open_run_folder(run_dir))]

    def resume_run(self, run_dir: str) -> None:
        """Choose ``run_dir`` to resume (its settings fill the form); Start then continues it."""
        self.resume_from.value = run_dir

    # --- after the run -------------------------------------------------------------------------------------------
    def open_in_explorer(self, run_dir: str | None = None) -> Any:
        """Dock the attention & mask explorer with this run folder chosen; returns the explorer widget.

        The live previews are hidden at once (they showed one training crop, the explorer shows the run's maps)
        and removed when the explorer's first job has ended. Removed before it, napari crashed in its OpenGL
        drawing on Mesa's software renderer (a segfault in glDrawArrays, reproduced 5 of 5 times) when the
        explorer then computed; hidden, then removed after, it did not (0 of 4).
        """
        explorer = self._open_with_run(EXPLORER_WIDGET, "attention explorer", run_dir)
        if explorer is not None:
            self.hide_previews()
            explorer.after_next_job(self.remove_previews)
        return explorer

    def hide_previews(self) -> None:
        """Hide the live preview layers of the last run."""
        for name in (*PREVIEW_LAYERS, *self._picture_layers):
            if name in self._viewer.layers:
                self._viewer.layers[name].visible = False

    def remove_previews(self) -> None:
        """Remove the live preview layers of the last run."""
        for name in (*PREVIEW_LAYERS, *self._picture_layers):
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
        self._picture_layers.clear()

    def open_run_folder(self, run_dir: str | None = None) -> None:
        run_dir = self._finished_run(run_dir)
        if run_dir is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(run_dir))
