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

The dock is built here and runs its jobs; its parts are mixins: what it draws (`results.view`), the click-through
(`results.navigation`) and the export (`results.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import FileEdit, RadioButtons
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_dagman._widgets.common import (
    DeviceComboBox,
    JobDock,
    Settings,
    checked_run,
    layer_label_names,
    layer_picker,
    notify_warning,
    volume_from_layer,
)
from napari_dagman._widgets.common.forms import ConfigForm, compact_form
from napari_dagman._widgets.results.cohort import ResultsCohort
from napari_dagman._widgets.results.export import ResultsExport
from napari_dagman._widgets.results.navigation import ResultsNavigation
from napari_dagman._widgets.results.view import COLUMNS, ResultsView
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.segmentation.jobs import SegmentationResults
    from napari_dagman.core.volume import Volume

__all__ = ["COLUMNS", "RESULTS_WIDGET", "VIEW_MODES", "SegmentationResultsWidget", "disagreement_legend"]

RESULTS_WIDGET = "Segmentation results"
VIEW_MODES: tuple[str, ...] = ("prediction", "reference", "both (contours)", "disagreement")


# --- the dock -----------------------------------------------------------------------------------------------------
class SegmentationResultsWidget(ResultsView, ResultsNavigation, ResultsExport, ResultsCohort, JobDock):
    """Predict with a fine-tuned run, compare with a reference, and click through the organs (and the cases of a
    cohort's predictions)."""

    COLUMNS = tuple(name for name, _ in COLUMNS)
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
        self._make_inputs()
        form = compact_form(
            [self.image, self.checkpoint, self.weights, self.overlap, self.roi, self.device, self.reference]
        )  # the prediction's own fields are the PredictConfig form's widgets
        self._forms.append(form)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(form.native)
        self._add_job_buttons(layout)
        self._add_result_controls(layout)
        self.status.setText("choose an image and a fine-tuned run, then Predict")
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.make_scrollable()
        self._connect()

    def _make_inputs(self) -> None:
        """The inputs: image, fine-tuned run, the PredictConfig options, reference and prediction layers, the view."""
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

    def _add_job_buttons(self, layout: QVBoxLayout) -> None:
        """Predict (Cancel while it runs), Evaluate layer, Open cohort (and its table of cases)."""
        row = QHBoxLayout()
        self.predict_button = QPushButton("Predict")
        self.predict_button.setToolTip(
            "sliding-window segmentation of the image; becomes Cancel while it runs"
        )
        self.evaluate_button = QPushButton("Evaluate layer")
        self.evaluate_button.setToolTip("fill the table from the 'prediction' layer (and the reference)")
        self.cohort_button, self.cohort_table = self._make_cohort_controls()
        row.addWidget(self.predict_button)
        row.addWidget(self.evaluate_button)
        row.addWidget(self.cohort_button)
        layout.addLayout(row)
        layout.addWidget(self.cohort_table)
        self._toggle = (self.predict_button, "Predict")
        self._start_buttons += [self.evaluate_button, self.cohort_button]

    def _add_result_controls(self, layout: QVBoxLayout) -> None:
        """The prediction layer and view switch, the legend, the table, organ navigation and export."""
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

    def _connect(self) -> None:
        """The buttons, the table and the view switch to what they do."""
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
        from napari_dagman._widgets.common.jobs import picklable_volume

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
        from napari_dagman.core.segmentation.cohort import CohortCase

        # one piece per event-loop turn (`Turns`): the layers and the table of a whole CT held napari 4 s in one piece
        pieces = self.case_pieces(results) if isinstance(results, CohortCase) else self.result_pieces(results)
        self.drawing.start(pieces)


def disagreement_legend() -> str:
    """Rich text naming the disagreement layer's colours (a coloured square before each name)."""
    from napari_dagman.core.segmentation import DISAGREEMENT_NAMES, disagreement_colours

    colours = disagreement_colours()
    parts = []
    for value, name in DISAGREEMENT_NAMES.items():
        r, g, b = (int(round(255 * c)) for c in np.asarray(colours[value])[:3])
        parts.append(f"<span style='color:#{r:02x}{g:02x}{b:02x}'>&#9632;</span> {name.replace('_', ' ')}")
    return "disagreement: " + " &nbsp; ".join(parts)
