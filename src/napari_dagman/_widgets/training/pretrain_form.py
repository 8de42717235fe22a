"""The pretraining dock's form (a part of `PretrainWidget`): the general options built from `PretrainConfig`'s
fields, the method and its own options (its options dataclass, preset values first, rebuilt when the method
changes), the length unit, a resumed run's settings loaded into the form, and the values a run is built from.
What a method does is read from its `capabilities`, never from its name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, FileEdit
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets.common import is_output_layer, layer_select, notify_info, path_text
from napari_dagman._widgets.common.forms import (
    ConfigForm,
    add_sections,
    compact_form,
    default_values,
    field_spec,
    placeholder,
    with_widgets,
    wrapped_label,
)
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.methods.registry import REGISTRY, MethodSpec, get_method

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


class PretrainForm:
    """Form and method options of `PretrainWidget` (its attributes are the dock's).

    It overrides `JobDock.showEvent`, so it comes before `TrainingDock` in the dock's bases.
    """

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

    # --- the values a run is built from ------------------------------------------------------------------------
    def _paths(self) -> list[str]:
        """Files and the folder entry; a folder becomes its CT images, searched recursively (as on the command
        line); label maps left out are said once."""
        from napari_dagman.core.io import expand_inputs

        raw = [str(p) for p in (self.files.value or ()) if str(p).strip() not in ("", ".")]
        folder = path_text(self.folder)
        if folder:
            raw.append(folder)
        for path in raw:
            if not Path(path).exists():
                raise DagmanInputError(f"{path} does not exist")
        images, notes = expand_inputs(raw) if raw else ([], [])
        for note in notes:
            notify_info(note)
        return images

    def config_values(self) -> dict[str, Any]:
        """The form's general values and the method's options, as `PretrainConfig.from_dict` takes them."""
        values = self.form.values()
        length = values.pop("steps")
        unit = self.length_unit.value
        values["steps"], values["epochs"] = (length, None) if unit == "steps" else (None, length)
        values["options"] = self.method_form.values() if self.method_form is not None else {}
        return values
