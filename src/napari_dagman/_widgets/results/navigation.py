"""The results dock's click-through: the organ of a table row, next/previous organ and the worst slice (a part of
`SegmentationResultsWidget`)."""

from __future__ import annotations

import numpy as np

from napari_dagman._widgets.common import jump_to, notify_info, notify_warning, slice_axis


class ResultsNavigation:
    """Moving the viewer to the organs of `SegmentationResultsWidget`'s table (its attributes are the dock's)."""

    # --- click-through --------------------------------------------------------------------------------------------
    def _slice_axis(self) -> int:
        """The volume axis the viewer slices through (0 = axial); 0 in a 3D view."""
        return slice_axis(self._viewer)

    def _organ(self, row: int) -> tuple[int, str]:
        entry = self.results.table.iloc[row]
        return int(entry["id"]), str(entry["organ"])

    def go_to_organ(self, row: int) -> bool:
        """Move the viewer to the organ of table row ``row``: its largest slice, camera on its centre there."""
        from napari_dagman.core.segmentation import organ_focus

        if self.results is None or not 0 <= row < len(self.results.table):
            return False
        organ, name = self._organ(row)
        axis = self._slice_axis()
        index, layer = None, None
        # the reference first: a small false-positive blob must not stand for the organ (a colon row jumped to a
        # 1.2 ml blob); the prediction when there is no reference or the organ is not in it
        for candidate in (self.reference_layer, self.prediction_layer):
            if candidate is not None and candidate in self._viewer.layers:
                index = organ_focus(np.asarray(candidate.data), organ, axis)
                if index is not None:
                    layer = candidate
                    break
        self._select_row(row)
        if index is None:
            notify_warning(f"{name} is in neither the prediction nor the reference")
            return False
        jump_to(self._viewer, layer.data_to_world(index))
        if self.prediction_layer is not None:
            self.prediction_layer.selected_label = organ
        source = "reference" if layer is self.reference_layer else "prediction"
        self.status.setText(f"{name}: largest on slice {index[axis]} (axis {axis}) of the {source}")
        return True

    def step_organ(self, delta: int) -> bool:
        """Next (+1) or previous (-1) organ of the table, wrapping around."""
        if self.results is None or not len(self.results.table):
            return False
        n = len(self.results.table)
        row = (delta if delta > 0 else -1) % n if self.current_row is None else (self.current_row + delta) % n
        return self.go_to_organ(row)

    def go_to_worst_slice(self) -> bool:
        """Jump to the slice where prediction and reference disagree most (selected organ, else all organs)."""
        from napari_dagman.core.segmentation import worst_slice

        if self.results is None:
            return False
        pred, ref = self.prediction_layer, self.reference_layer
        if pred is None or ref is None or ref not in self._viewer.layers:
            notify_warning(
                "the worst slice needs a reference: choose a reference layer and predict or evaluate again"
            )
            return False
        organ = self._organ(self.current_row)[0] if self.current_row is not None else None
        axis = self._slice_axis()
        index = worst_slice(
            np.asarray(pred.data), np.asarray(ref.data), organ, axis=axis, organs=list(self.results.names)
        )
        if index is None:
            notify_info("prediction and reference agree everywhere")
            return False
        jump_to(self._viewer, pred.data_to_world(index))
        what = self._organ(self.current_row)[1] if organ is not None else "all organs"
        self.status.setText(f"worst slice for {what}: {index[axis]} (axis {axis})")
        return True

    def _select_row(self, row: int) -> None:
        self.current_row = row
        blocked = self.table.blockSignals(True)
        self.table.selectRow(row)
        self.table.blockSignals(blocked)
