"""Segmentation-results dock (click-through), thin over `core.segmentation`.

`SegmentationResultsWidget` runs sliding-window prediction with a fine-tuned run (in a thread), shows the result
as a Labels layer with organ names and stable colours, and - with a reference - a disagreement layer (false
positive / false negative / wrong organ, with its legend) and a table (organ, predicted and reference ml, Dice,
HD95) whose rows move the viewer to the organ (the reference's, when there is one); next/previous organ, "worst
slice", a prediction / reference / both / disagreement switch that sets every result layer, and export. It
follows the docks' one cancel contract (`_common.JobDock`): Predict reads "Cancel" while a job runs, closing the
dock stops it. It opens as a tab of the fine-tuning dock.

No science here: remapping, metrics, where an organ is largest and where the disagreement is worst all come from
`core.segmentation`. torch and MONAI are imported inside functions, so napari starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import FileEdit, RadioButtons
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
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
    checked_run,
    jump_to,
    layer_label_names,
    layer_picker,
    notify_error,
    notify_info,
    notify_warning,
    slice_axis,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets._forms import ConfigForm, compact_form
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import pandas as pd

    import napari
    from napari_dagman.core.segmentation.jobs import SegmentationResults
    from napari_dagman.core.volume import Volume

RESULTS_WIDGET = "Segmentation results"
VIEW_MODES: tuple[str, ...] = ("prediction", "reference", "both (contours)", "disagreement")
#: The table's columns and what each one means (header tooltips).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("organ", "the organ's name (label id in the CSV)"),
    ("predicted ml", "volume of the organ in the prediction, millilitres"),
    ("reference ml", "volume of the organ in the reference label map, millilitres"),
    ("Dice", "overlap of prediction and reference: 2 |P and R| / (|P| + |R|); 1 = identical, 0 = no overlap"),
    ("HD95 mm", "95th percentile of the distances between the two organ surfaces, in mm (lower is better)"),
)


# --- the dock -----------------------------------------------------------------------------------------------------
class SegmentationResultsWidget(JobDock):
    """Predict with a fine-tuned run, compare with a reference, and click through the organs."""

    COLUMNS = tuple(name for name, _ in COLUMNS)
    run_kind = "prediction"
    cancelling_text = "cancelling after the current batch of windows..."
    tab_group = "segmentation"

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

        from napari_dagman.core.config import PredictConfig

        self.image = layer_picker(self._viewer, "image")
        self.checkpoint = FileEdit(
            label="fine-tuned run", mode="d", tooltip="a run folder of `napari-dagman finetune`"
        )
        device = DeviceComboBox(value=Settings("finetune").get("device", "auto"))
        # limits, defaults and help come from PredictConfig, as the CLI's flags do
        self.options = ConfigForm(
            PredictConfig,
            ["weights", "overlap", "roi", "device"],
            widgets={"device": device},
            labels={"roi": "ROI (voxels)"},
            steps={"overlap": 0.05},
        )
        self.weights, self.overlap, self.roi, self.device = (
            self.options[n] for n in ("weights", "overlap", "roi", "device")
        )
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
            choose=False,  # the only labels layer is the reference, not a prediction to evaluate
        )
        self.view = RadioButtons(
            label="show",
            choices=list(VIEW_MODES),
            value=VIEW_MODES[2],
            orientation="horizontal",
            tooltip="which result layers are shown: the prediction, the reference, the prediction with the "
            "reference's outlines, or where they disagree (with the reference's outlines)",
        )
        self.legend = QLabel(disagreement_legend())
        self.legend.setToolTip("colours of the disagreement layer ('disagreement' above)")
        form = compact_form(
            [self.image, self.checkpoint, self.weights, self.overlap, self.roi, self.device, self.reference]
        )  # the prediction's own fields are the PredictConfig form's widgets
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
        layout.addWidget(self.legend)

        self.table = self._make_table()
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
        self.make_scrollable()

        self.predict_button.clicked.connect(self.start_or_cancel)
        self.evaluate_button.clicked.connect(lambda: self.evaluate_layers())
        self.table.cellClicked.connect(lambda row, _col: self.go_to_organ(row))
        self.prev_button.clicked.connect(lambda: self.step_organ(-1))
        self.next_button.clicked.connect(lambda: self.step_organ(1))
        self.worst_button.clicked.connect(lambda: self.go_to_worst_slice())
        self.view.changed.connect(lambda value: self.set_view(value))
        self.save_prediction_button.clicked.connect(self._ask_save_prediction)
        self.save_table_button.clicked.connect(self._ask_save_table)

    def _make_table(self) -> QTableWidget:
        """The per-organ table: full organ names, predicted and reference ml, Dice, HD95; header tooltips."""
        table = QTableWidget(0, len(self.COLUMNS))
        table.setHorizontalHeaderLabels(list(self.COLUMNS))
        for column, (_, tip) in enumerate(COLUMNS):
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
        table.setMinimumHeight(160)
        return table

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
        from napari_dagman.core.config import PredictConfig
        from napari_dagman.core.segmentation.jobs import predict_job

        if self._busy():
            return False
        try:
            image = volume_from_layer(self.image.value, "image")
            checkpoint = self.checkpoint.line_edit.value.strip()
            if checkpoint in ("", "."):
                raise DagmanInputError("no fine-tuned run chosen: pick a fine-tuning run folder")
            if Path(checkpoint).is_dir():  # a folder that is no fine-tuning run: said now, not after loading
                checked_run(checkpoint, "finetune")
            reference = self._reference_volume()
            config = PredictConfig.from_dict({**self.options.values(), "checkpoint": checkpoint})
        except DagmanError as err:
            return self.refuse(err)
        self.reference_layer = self.reference.value
        self._image_layer = self.image.value
        self._runner.start(lambda token: predict_job(config, image, reference, cancel=token))
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
            return self.refuse(err)
        self.prediction_layer, self.reference_layer = layer, self.reference.value
        self._image_layer = None
        from napari_dagman.core.segmentation.jobs import evaluation_job

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

    # --- export ---------------------------------------------------------------------------------------------------
    def export_prediction(self, path: str) -> list[str]:
        """The prediction layer (with any edits) as NIfTI/MHA/NRRD with the CT's geometry and organ names, or,
        for a path ending in ``.dcm``, as a DICOM SEG over the DICOM series the prediction was made on."""
        from napari_dagman.core.io import suffix_of, write_volume

        if self.prediction_layer is None:
            raise DagmanInputError("no prediction to save yet")
        volume = volume_from_layer(self.prediction_layer, "labels")
        array = volume.array.astype(np.uint8 if volume.array.max(initial=0) <= 255 else np.uint16)
        names = layer_label_names(self.prediction_layer)
        if suffix_of(path) == ".dcm":
            from napari_dagman.core.segmentation.dicom_seg import check_dicom_source, write_dicom_seg

            if self._image_layer is None:
                raise DagmanInputError("the image the prediction was made on is no longer open")
            image = volume_from_layer(self._image_layer, "image")
            for note in check_dicom_source(image):  # said before the file is written, as predict does
                notify_warning(note)
            return write_dicom_seg(volume.with_array(array), image, path, names=names)
        return write_volume(volume.with_array(array), path, label_names=names)

    def export_table(self, path: str) -> str:
        """The results table as CSV (organ, id, volumes, Dice, HD95, focus and worst slice)."""
        from napari_dagman.core.io import atomic_write_text

        if self.results is None:
            raise DagmanInputError("no results table yet")
        atomic_write_text(path, self.results.table.to_csv(index=False))
        return path

    def _ask_save_prediction(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save prediction", "prediction.nii.gz", "Label maps (*.nii.gz *.nii *.mha *.nrrd);;DICOM SEG over the DICOM series (*.dcm)"
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


def disagreement_legend() -> str:
    """Rich text naming the disagreement layer's colours (a coloured square before each name)."""
    from napari_dagman.core.segmentation import DISAGREEMENT_NAMES, disagreement_colours

    colours = disagreement_colours()
    parts = []
    for value, name in DISAGREEMENT_NAMES.items():
        r, g, b = (int(round(255 * c)) for c in np.asarray(colours[value])[:3])
        parts.append(f"<span style='color:#{r:02x}{g:02x}{b:02x}'>&#9632;</span> {name.replace('_', ' ')}")
    return "disagreement: " + " &nbsp; ".join(parts)
