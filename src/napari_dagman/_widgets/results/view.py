"""What the results dock draws: the per-organ table, the result layers (prediction, disagreement) and which of them
are shown (a part of `SegmentationResultsWidget`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from napari_dagman._widgets.common import OUTPUT_KEY, upsert_layer

if TYPE_CHECKING:
    import pandas as pd

    from napari_dagman.core.segmentation.jobs import SegmentationResults

#: The table's columns and what each one means (header tooltips).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("organ", "the organ's name (label id in the CSV)"),
    ("predicted ml", "volume of the organ in the prediction, millilitres"),
    ("reference ml", "volume of the organ in the reference label map, millilitres"),
    ("Dice", "overlap of prediction and reference: 2 |P and R| / (|P| + |R|); 1 = identical, 0 = no overlap"),
    ("HD95 mm", "95th percentile of the distances between the two organ surfaces, in mm (lower is better)"),
)


def make_table(columns: Sequence[tuple[str, str]], *, min_height: int) -> QTableWidget:
    """A read-only table of whole rows, one selected at a time, with the columns' names and tooltips."""
    table = QTableWidget(0, len(columns))
    table.setHorizontalHeaderLabels([name for name, _ in columns])
    for column, (_, tip) in enumerate(columns):
        table.horizontalHeaderItem(column).setToolTip(tip)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    header = table.horizontalHeader()
    # every column as wide as its longest entry: full organ names ("urinary_bladder", not "urinary_blad...");
    # a narrow dock scrolls the table sideways instead of cutting names
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setStretchLastSection(True)
    table.setTextElideMode(Qt.TextElideMode.ElideNone)
    table.verticalHeader().setVisible(False)
    table.setMinimumHeight(min_height)
    return table


class ResultsView:
    """The table and the result layers of `SegmentationResultsWidget` (its attributes are the dock's)."""

    def _make_table(self) -> QTableWidget:
        """The per-organ table: full organ names, predicted and reference ml, Dice, HD95; header tooltips."""
        return make_table(COLUMNS, min_height=160)

    # --- drawing ------------------------------------------------------------------------------------------------
    def show_results(self, results: SegmentationResults) -> None:
        """Layers (prediction, disagreement) and the table."""
        for piece in self.result_pieces(results):
            piece()

    def result_pieces(self, results: SegmentationResults) -> list[Callable[[], None]]:
        """`show_results` as pieces (the prediction layer, the disagreement layer, the table), one per event-loop
        turn when a job delivers them."""

        def start() -> None:
            self.results = results

        return [start, lambda: self._prediction_layer(results), lambda: self._disagreement_layer(results),
                lambda: self._show_table(results)]  # fmt: skip

    def _prediction_layer(self, results: SegmentationResults) -> None:
        from napari_dagman._layers import labels_layer_data
        from napari_dagman.core.segmentation.dicom_seg import series_source

        if self._image_layer is not None:  # a new prediction: draw it over the CT
            base = self._image_layer.name
            data, kwargs, _ = labels_layer_data(results.prediction, results.names, name=f"{base} prediction")
            kwargs["metadata"][OUTPUT_KEY] = "prediction"
            # the DICOM series it was predicted on, for napari's File > Save as a DICOM SEG (`_writer`)
            kwargs["metadata"].update(series_source(self._image_layer.metadata))
            self.prediction_layer = upsert_layer(self._viewer, kwargs.pop("name"), data, "labels", **kwargs)

    def _disagreement_layer(self, results: SegmentationResults) -> None:
        if results.disagreement is not None and self.prediction_layer is not None:
            from napari_dagman.core.labels import label_table
            from napari_dagman.core.segmentation import DISAGREEMENT_NAMES, disagreement_colours

            placement = {
                "scale": list(self.prediction_layer.scale),
                "translate": list(self.prediction_layer.translate),
            }
            self.disagreement_layer = upsert_layer(
                self._viewer,
                f"{self.prediction_layer.name} vs reference",
                results.disagreement,
                "labels",
                colormap=disagreement_colours(),
                features=label_table(DISAGREEMENT_NAMES, DISAGREEMENT_NAMES),
                opacity=0.8,
                metadata={OUTPUT_KEY: "disagreement", "label_names": dict(DISAGREEMENT_NAMES)},
                **placement,
            )

    def _show_table(self, results: SegmentationResults) -> None:
        self._fill_table(results.table)
        self.set_view(self.view.value)
        summary = results.table["dice"].to_numpy(dtype=float)
        scored = np.isfinite(summary)
        self.status.setText(
            f"{len(results.table)} organs"
            # over the whole CT: not the fine-tuning dock's validation Dice, which is over its held-out slab only
            + (
                f"; mean Dice {np.mean(summary[scored]):.3f} over {int(scored.sum())}, whole CT"
                if scored.any()
                else ""
            )
            + "; click a row to go to the organ"
        )

    def _fill_table(self, table: pd.DataFrame) -> None:
        def text(value: float, fmt: str) -> str:
            return format(value, fmt) if np.isfinite(value) else "-"

        self.table.setRowCount(len(table))
        for r, row in enumerate(table.itertuples(index=False)):
            cells = (
                str(row.organ),
                text(row.volume_ml, ".1f"),
                text(getattr(row, "reference_ml", np.nan), ".1f"),
                text(row.dice, ".3f"),
                text(row.hd95_mm, ".1f"),
            )
            for c, value in enumerate(cells):
                item = QTableWidgetItem(value)
                if c:
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                else:
                    item.setToolTip(f"{row.organ} (label {int(row.id)})")
                self.table.setItem(r, c, item)
        self.current_row = None

    def set_view(self, mode: str) -> None:
        """Every result layer at once: prediction / reference / both (prediction filled, reference as contours) /
        disagreement (false positive, false negative, wrong organ, with the reference as contours)."""
        layers = self._viewer.layers
        pred, ref, diff = self.prediction_layer, self.reference_layer, self.disagreement_layer
        outlined = mode in ("both (contours)", "disagreement")
        if pred is not None and pred in layers:
            pred.visible = mode in ("prediction", "both (contours)")
            pred.contour = 0
        if ref is not None and ref in layers:
            ref.visible = mode != "prediction"
            # napari draws no contours in 3D: there the reference is shown filled
            ref.contour = 2 if outlined and self._viewer.dims.ndisplay == 2 else 0
        if diff is not None and diff in layers:
            diff.visible = mode == "disagreement"
