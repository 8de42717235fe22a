"""Segmentation-results dock (click-through), thin over `core.segmentation`.

`SegmentationResultsWidget` runs sliding-window prediction with a fine-tuned run (in a thread), shows the result
as a Labels layer with organ names and stable colours, and - with a reference - a disagreement layer (false
positive / false negative / wrong organ) and a table (organ, ml, Dice, HD95) whose rows move the viewer to the
organ; next/previous organ, "worst slice", a prediction/reference/both toggle, and export. It follows the docks'
one cancel contract (`_common.JobDock`): Predict reads "Cancel" while a job runs, closing the dock stops it.

No science here: remapping, metrics, where an organ is largest and where the disagreement is worst all come from
`core.segmentation`. torch and MONAI are imported inside functions, so napari starts fast.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, RadioButtons, SpinBox
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    DeviceComboBox,
    JobDock,
    Settings,
    jump_to,
    layer_label_names,
    layer_picker,
    notify_error,
    notify_info,
    notify_warning,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets._forms import compact_form
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import pandas as pd

    import napari
    from napari_dagman.core.events import CancelToken
    from napari_dagman.core.volume import Volume

RESULTS_WIDGET = "Segmentation results"
VIEW_MODES: tuple[str, ...] = ("prediction", "reference", "both (contours)")


# --- jobs (Qt-free, module level) -----------------------------------------------------------------------------------
@dataclass
class SegmentationResults:
    """What the results dock shows: the prediction, the reference, the per-organ table, the disagreement map."""

    prediction: Volume
    reference: Volume | None
    table: pd.DataFrame
    names: dict[int, str]
    disagreement: np.ndarray | None = None


def evaluation_job(
    prediction: Volume,
    reference: Volume | None,
    *,
    names: dict[int, str] | None = None,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, SegmentationResults]:
    """Per-organ table and disagreement map of a prediction (against a reference on its grid, if any)."""
    from napari_dagman.core.events import ProgressEvent
    from napari_dagman.core.segmentation import (
        align_labels,
        check_label_volume,
        disagreement_map,
        evaluate,
        label_names_of,
    )

    names = {int(k): str(v) for k, v in (names or label_names_of(prediction)).items()}
    yield ProgressEvent(0, 1, "metrics")
    if reference is not None:
        reference = align_labels(
            prediction,
            check_label_volume(reference, "reference"),
            resample=False,
            image_name=str(prediction.metadata.get("name", "prediction")),
            labels_name=str(reference.metadata.get("name", "reference")),
        )
    table = evaluate(prediction, reference, names)
    disagreement = (
        disagreement_map(prediction.array, reference.array, list(names)) if reference is not None else None
    )
    yield ProgressEvent(1, 1, "metrics")
    return SegmentationResults(prediction, reference, table, names, disagreement)


def prediction_job(
    image: Volume,
    checkpoint: str,
    reference: Volume | None = None,
    *,
    weights: str = "best",
    roi: int | None = None,
    overlap: float = 0.5,
    device: str = "auto",
    cancel: CancelToken | None = None,
) -> Generator[Any, None, SegmentationResults | None]:
    """Sliding-window prediction with a fine-tuned run, then `evaluation_job` (None when cancelled)."""
    from napari_dagman.core.segmentation import load_segmenter, run_prediction

    if not checkpoint:
        raise DagmanInputError("no fine-tuned run chosen: pick a fine-tuning run folder")
    segmenter = load_segmenter(checkpoint, weights=weights, device=device)
    labels = yield from run_prediction(image, segmenter, roi=roi, overlap=overlap, cancel=cancel)
    if labels is None:
        return None
    results = yield from evaluation_job(
        labels, reference, names=labels.metadata["label_names"], cancel=cancel
    )
    return results


# --- the dock -----------------------------------------------------------------------------------------------------
class SegmentationResultsWidget(JobDock):
    """Predict with a fine-tuned run, compare with a reference, and click through the organs."""

    COLUMNS = ("organ", "volume (ml)", "Dice", "HD95 (mm)")
    run_kind = "prediction"
    cancelling_text = "cancelling after the current batch of windows..."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="results", description="segmentation prediction")
        self.results: SegmentationResults | None = None
        self.prediction_layer: Any = None
        self.reference_layer: Any = None
        self.disagreement_layer: Any = None
        self.current_row: int | None = None
        self._image_layer: Any = None  # the CT a running prediction is for (None: evaluating a layer)
        self._build()

    def _build(self) -> None:

        self.image = layer_picker(self._viewer, "image")
        self.checkpoint = FileEdit(
            label="fine-tuned run", mode="d", tooltip="a run folder of `napari-dagman finetune`"
        )
        self.weights = ComboBox(
            label="weights", choices=["best", "last"], tooltip="best validation Dice or last step"
        )
        self.overlap = FloatSpinBox(
            label="overlap", min=0.0, max=0.95, step=0.05, value=0.5, tooltip="sliding-window overlap"
        )
        self.roi = SpinBox(
            label="ROI (voxels)",
            min=0,
            max=512,
            step=32,
            value=0,
            tooltip="sliding window; 0 = the training ROI",
        )
        self.device = DeviceComboBox(value=Settings("finetune").get("device", "auto"))
        self.reference = layer_picker(
            self._viewer,
            "labels",
            "reference",
            tooltip="a reference label map on the image's grid: Dice, HD95 and the disagreement layer",
            inputs_only=False,
        )
        self.prediction = layer_picker(
            self._viewer,
            "labels",
            "prediction",
            tooltip="an existing prediction layer to evaluate (instead of predicting)",
            inputs_only=False,
        )
        self.view = RadioButtons(
            label="show", choices=list(VIEW_MODES), value=VIEW_MODES[2], orientation="horizontal"
        )
        form = compact_form(
            [self.image, self.checkpoint, self.weights, self.overlap, self.roi, self.device, self.reference]
        )
        self._forms.append(form)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(form.native)
        row = QHBoxLayout()
        self.predict_button = QPushButton("Predict")
        self.predict_button.setToolTip(
            "sliding-window segmentation of the image; becomes Cancel while it runs"
        )
        self.evaluate_button = QPushButton("Evaluate layer")
        self.evaluate_button.setToolTip("fill the table from the 'prediction' layer (and the reference)")
        row.addWidget(self.predict_button)
        row.addWidget(self.evaluate_button)
        layout.addLayout(row)
        self._toggle = (self.predict_button, "Predict")
        self._start_buttons.append(self.evaluate_button)
        second = compact_form([self.prediction, self.view])
        self._forms.append(second)
        layout.addWidget(second.native)

        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(160)
        layout.addWidget(self.table)
        nav = QHBoxLayout()
        self.prev_button = QPushButton("< Previous organ")
        self.next_button = QPushButton("Next organ >")
        self.worst_button = QPushButton("Worst slice")
        self.worst_button.setToolTip(
            "the slice where prediction and reference disagree most (selected organ, or all)"
        )
        for b in (self.prev_button, self.next_button, self.worst_button):
            nav.addWidget(b)
        layout.addLayout(nav)
        export = QHBoxLayout()
        self.save_prediction_button = QPushButton("Save prediction...")
        self.save_table_button = QPushButton("Save table (CSV)...")
        export.addWidget(self.save_prediction_button)
        export.addWidget(self.save_table_button)
        layout.addLayout(export)
        self.status.setText("choose an image and a fine-tuned run, then Predict")
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.predict_button.clicked.connect(self.start_or_cancel)
        self.evaluate_button.clicked.connect(lambda: self.evaluate_layers())
        self.table.cellClicked.connect(lambda row, _col: self.go_to_organ(row))
        self.prev_button.clicked.connect(lambda: self.step_organ(-1))
        self.next_button.clicked.connect(lambda: self.step_organ(1))
        self.worst_button.clicked.connect(lambda: self.go_to_worst_slice())
        self.view.changed.connect(lambda value: self.set_view(value))
        self.save_prediction_button.clicked.connect(self._ask_save_prediction)
        self.save_table_button.clicked.connect(self._ask_save_table)

    # --- inputs -------------------------------------------------------------------------------------------------
    def set_run(self, run_dir: str, *, image: Any = None, reference: Any = None) -> None:
        """Choose a fine-tuned run (and optionally the image and reference layers)."""
        self.checkpoint.value = run_dir
        if image is not None:
            self.image.value = image
        if reference is not None:
            self.reference.value = reference

    def _reference_volume(self) -> Volume | None:
        from napari_dagman._widgets._jobs import picklable_volume

        layer = self.reference.value
        return None if layer is None else picklable_volume(volume_from_layer(layer, "labels"))

    # --- prediction / evaluation ----------------------------------------------------------------------------------
    def start(self) -> bool:
        return self.predict()

    def predict(self) -> bool:
        """Run the prediction job on the chosen image; bad input gives a notification."""
        if self._busy():
            return False
        try:
            image = volume_from_layer(self.image.value, "image")
            checkpoint = self.checkpoint.line_edit.value.strip()
            if checkpoint in ("", "."):
                raise DagmanInputError("no fine-tuned run chosen: pick a fine-tuning run folder")
            reference = self._reference_volume()
        except DagmanError as err:
            notify_error(err)
            return False
        self.reference_layer = self.reference.value
        self._image_layer = self.image.value
        kwargs = {
            "weights": self.weights.value,
            "roi": int(self.roi.value) or None,
            "overlap": float(self.overlap.value),
            "device": str(self.device.value),
        }
        self._runner.start(lambda token: prediction_job(image, checkpoint, reference, cancel=token, **kwargs))
        self._started("predicting...")
        return True

    def evaluate_layers(self) -> bool:
        """Fill the table from the chosen prediction layer (and reference layer) without predicting."""
        if self._busy():
            return False
        layer = self.prediction.value
        try:
            if layer is None:
                raise DagmanInputError("choose a prediction layer to evaluate")
            prediction = volume_from_layer(layer, "labels")
            reference = self._reference_volume()
            names = layer_label_names(layer)
        except DagmanError as err:
            notify_error(err)
            return False
        self.prediction_layer, self.reference_layer = layer, self.reference.value
        self._image_layer = None
        self._runner.start(lambda token: evaluation_job(prediction, reference, names=names, cancel=token))
        self._started("computing the table...")
        return True

    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import LogEvent, ProgressEvent

        if isinstance(event, ProgressEvent):
            self.status.setText(f"{event.stage}: {event.done}/{event.total}")
        elif isinstance(event, LogEvent) and event.level == "warning":
            notify_warning(event.message)

    def _on_done(self, results: Any) -> None:
        if not isinstance(results, SegmentationResults):
            self.status.setText("cancelled")
            return
        self.show_results(results)

    # --- drawing ------------------------------------------------------------------------------------------------
    def show_results(self, results: SegmentationResults) -> None:
        """Layers (prediction, disagreement) and the table."""
        from napari_dagman._layers import labels_layer_data

        self.results = results
        if self._image_layer is not None:  # a new prediction: draw it over the CT
            base = self._image_layer.name
            data, kwargs, _ = labels_layer_data(results.prediction, results.names, name=f"{base} prediction")
            kwargs["metadata"][OUTPUT_KEY] = "prediction"
            self.prediction_layer = upsert_layer(self._viewer, kwargs.pop("name"), data, "labels", **kwargs)
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
        self._fill_table(results.table)
        self.set_view(self.view.value)
        summary = results.table["dice"].to_numpy(dtype=float)
        scored = np.isfinite(summary)
        self.status.setText(
            f"{len(results.table)} organs"
            + (f"; mean Dice {np.mean(summary[scored]):.3f} over {int(scored.sum())}" if scored.any() else "")
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
                text(row.dice, ".3f"),
                text(row.hd95_mm, ".1f"),
            )
            for c, value in enumerate(cells):
                item = QTableWidgetItem(value)
                if c:
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                self.table.setItem(r, c, item)
        self.current_row = None

    def set_view(self, mode: str) -> None:
        """prediction / reference / both (prediction filled, reference as contours)."""
        pred, ref = self.prediction_layer, self.reference_layer
        if pred is not None and pred in self._viewer.layers:
            pred.visible = mode != "reference"
            pred.contour = 0
        if ref is not None and ref in self._viewer.layers:
            ref.visible = mode != "prediction"
            # napari draws no contours in 3D: there "both" overlays the two filled layers
            ref.contour = 2 if mode == "both (contours)" and self._viewer.dims.ndisplay == 2 else 0

    # --- click-through --------------------------------------------------------------------------------------------
    def _slice_axis(self) -> int:
        """The volume axis the viewer slices through (0 = axial); 0 in a 3D view."""
        dims = self._viewer.dims
        offset = dims.ndim - 3
        hidden = [a - offset for a in dims.not_displayed if a >= offset]
        return hidden[-1] if hidden else 0

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
        for candidate in (self.prediction_layer, self.reference_layer):
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
        self.status.setText(f"{name}: largest on slice {index[axis]} (axis {axis})")
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

    # --- export ---------------------------------------------------------------------------------------------------
    def export_prediction(self, path: str) -> list[str]:
        """The prediction layer (with any edits) as NIfTI/MHA/NRRD with the CT's geometry and organ names."""
        from napari_dagman.core.io import write_volume

        if self.prediction_layer is None:
            raise DagmanInputError("no prediction to save yet")
        volume = volume_from_layer(self.prediction_layer, "labels")
        array = volume.array.astype(np.uint8 if volume.array.max(initial=0) <= 255 else np.uint16)
        return write_volume(
            volume.with_array(array), path, label_names=layer_label_names(self.prediction_layer)
        )

    def export_table(self, path: str) -> str:
        """The results table as CSV (organ, id, volumes, Dice, HD95, focus and worst slice)."""
        from napari_dagman.core.io import atomic_write_text

        if self.results is None:
            raise DagmanInputError("no results table yet")
        atomic_write_text(path, self.results.table.to_csv(index=False))
        return path

    def _ask_save_prediction(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save prediction", "prediction.nii.gz", "Label maps (*.nii.gz *.nii *.mha *.nrrd)"
        )
        if path:
            try:
                written = self.export_prediction(path)
                notify_info(f"saved {', '.join(written)}")
            except DagmanError as err:
                notify_error(err)

    def _ask_save_table(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save table", "results.csv", "CSV (*.csv)")
        if path:
            try:
                notify_info(f"saved {self.export_table(path)}")
            except DagmanError as err:
                notify_error(err)
