"""What the clusters dock draws for a result: the points at the patch centres, the metrics and their figures, the
scatter coloured by organ or by cluster (a part of `ClustersWidget`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QLabel

from napari_dagman._widgets.common import OUTPUT_KEY, upsert_layer, volume_from_layer

if TYPE_CHECKING:
    from napari_dagman.core.embeddings import EmbeddingResult

#: Names of the layers this dock draws (one each, updated in place).
POINTS_LAYER = "organ clusters"
SELECTION_LAYER = "organ clusters: selection"
PICKED_LAYER = "organ clusters: picked"


class ClustersView:
    """The result shown by `ClustersWidget`: layers, metrics, colours (its attributes are the dock's)."""

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
