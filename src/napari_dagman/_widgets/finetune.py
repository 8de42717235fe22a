"""Fine-tuning dock and segmentation-results dock (click-through), thin over `core.segmentation`.

* `FinetuneWidget`: an image layer and a labels layer (or files), the organs to segment (named), the
  pretraining run whose encoder starts the model (or from scratch), the main hyperparameters and the device;
  `core.segmentation.run_finetuning` runs in a child process (or a thread) and the dock draws the training
  loss and the validation Dice per organ as they come.
* `SegmentationResultsWidget`: runs sliding-window prediction with a fine-tuned run (in a thread), shows the
  result as a Labels layer with organ names and stable colours, and - with a reference - a disagreement layer
  (false positive / false negative / wrong organ) and a table (organ, ml, Dice, HD95) whose rows move the viewer
  to the organ; next/previous organ, "worst slice", a prediction/reference/both toggle, and export.

No science here: remapping, metrics, where an organ is largest and where the disagreement is worst all come from
`core.segmentation`. torch and MONAI are imported inside functions, so napari starts fast.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    RadioButtons,
    Select,
    SpinBox,
)
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
    QWidget,
)

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    DeviceComboBox,
    JobRunner,
    LossPlot,
    Settings,
    is_output_layer,
    jump_to,
    last_run,
    layer_combo,
    notify_error,
    notify_info,
    notify_warning,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets._training import Actions, TrainingDock, compact_form, path_text
from napari_dagman.core.config import ENCODER_CHOICES, PRESET_NAMES, VAL_SPLITS, FinetuneConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import pandas as pd

    import napari
    from napari_dagman.core.events import CancelToken, FinishedEvent, StepEvent
    from napari_dagman.core.volume import Volume

RESULTS_WIDGET = "Segmentation results"
VIEW_MODES: tuple[str, ...] = ("prediction", "reference", "both (contours)")


def _default(name: str) -> Any:
    return FinetuneConfig.__dataclass_fields__[name].default


# =============================================================================================================
# Jobs (Qt-free, module level so a child process can run them)
# =============================================================================================================
def finetune_job(
    config: FinetuneConfig,
    pairs: list[tuple[Volume, Volume]] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str = "napari-dagman fine-tuning dock",
) -> Generator[Any, None, Any]:
    """`core.segmentation.run_finetuning` on layer pairs or on the files of ``config``."""
    from napari_dagman.core.segmentation import run_finetuning

    result = yield from run_finetuning(config, pairs or None, resume=resume, cancel=cancel, command=command)
    return result


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


def layer_label_names(layer: Any) -> dict[int, str]:
    """Id -> name of the organs present in a Labels layer: its features table, else metadata, else defaults."""
    from napari_dagman.core.labels import names_in

    names: dict[int, str] = {}
    features = getattr(layer, "features", None)
    if features is not None and len(features) and {"index", "name"} <= set(features.columns):
        names = {int(i): str(n) for i, n in zip(features["index"], features["name"], strict=True) if int(i)}
    elif layer.metadata.get("label_names"):
        names = {int(k): str(v) for k, v in layer.metadata["label_names"].items()}
    return names_in(np.asarray(layer.data), names)


# =============================================================================================================
# Fine-tuning dock
# =============================================================================================================
class FinetuneWidget(TrainingDock):
    """Fine-tune a SwinUNETR segmentation model from napari; live loss and validation Dice per organ."""

    run_kind = "fine-tuning"
    command = "napari-dagman fine-tuning dock"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="finetune", description="segmentation fine-tuning")
        self.offered_organs: dict[int, str] = {}
        self._build()
        self.refresh_organs()

    # --- form ---------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        import napari

        help_of = FinetuneConfig.field_help()
        not_ours = lambda layer: not is_output_layer(layer)  # noqa: E731
        self.image = layer_combo(
            self._viewer, napari.layers.Image, "image", tooltip="the CT to train on", where=not_ours
        )
        self.labels = layer_combo(
            self._viewer,
            napari.layers.Labels,
            "labels",
            nullable=True,
            tooltip="its label map (same voxel grid as the image)",
            where=not_ours,
        )
        self.image_file = FileEdit(
            label="or image file",
            mode="r",
            tooltip="train on files instead of layers (with a label map file)",
        )
        self.labels_file = FileEdit(
            label="label map file", mode="r", tooltip="the label map of the image file"
        )
        self.organs = Select(
            label="organs",
            choices=[],
            tooltip="organs to segment (Ctrl/Shift for several); none selected = every organ of the label map",
        )
        self.organs.native.setMaximumHeight(110)

        self.init_run = FileEdit(label="pretrained run", mode="d", value=last_run(), tooltip=help_of["init"])
        self.scratch = CheckBox(
            label="from scratch", value=False, tooltip="no pretrained encoder (a baseline)"
        )
        self.encoder = ComboBox(
            label="encoder", choices=list(ENCODER_CHOICES), tooltip=help_of["init_encoder"]
        )
        self.preset = ComboBox(
            label="preset (scratch)", choices=list(PRESET_NAMES), value="small", tooltip=help_of["preset"]
        )

        self.steps = SpinBox(
            label="steps", min=1, max=10_000_000, value=_default("steps"), tooltip=help_of["steps"]
        )
        self.batch_size = SpinBox(
            label="batch", min=1, max=64, value=_default("batch_size"), tooltip=help_of["batch_size"]
        )
        self.lr = LineEdit(label="learning rate", value=f"{_default('lr'):g}", tooltip=help_of["lr"])
        self.roi = SpinBox(
            label="ROI (voxels)", min=0, max=512, step=32, value=0, tooltip=help_of["roi"] + "; 0 = default"
        )
        self.spacing = FloatSpinBox(
            label="spacing (mm)",
            min=0.0,
            max=20.0,
            step=0.25,
            value=0.0,
            tooltip=help_of["spacing"] + "; 0 = default",
        )

        self.val_split = ComboBox(label="validation", choices=list(VAL_SPLITS), tooltip=help_of["val_split"])
        self.val_fraction = FloatSpinBox(
            label="slab fraction",
            min=0.01,
            max=0.8,
            step=0.05,
            value=_default("val_fraction"),
            tooltip=help_of["val_fraction"],
        )
        self.val_position = FloatSpinBox(
            label="slab position",
            min=0.0,
            max=1.0,
            step=0.05,
            value=_default("val_position"),
            tooltip=help_of["val_position"],
        )
        self.val_gap = FloatSpinBox(
            label="gap (mm)",
            min=0.0,
            max=500.0,
            step=5.0,
            value=_default("val_gap_mm"),
            tooltip=help_of["val_gap_mm"],
        )
        self.val_every = SpinBox(
            label="validate every",
            min=1,
            max=1_000_000,
            value=_default("val_every"),
            tooltip=help_of["val_every"],
        )

        self._make_run_widgets(
            run_name_tip="name of the new run folder (empty: date)",
            resume_tip="a fine-tuning run folder to continue (same data and organs)",
            in_process_tip="train in a child process (napari stays responsive); untick to train in a thread",
        )
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0, tooltip=help_of["seed"])

        sections = [
            ("Data", [self.image, self.labels, self.image_file, self.labels_file, self.organs], True),
            ("Model", [self.init_run, self.scratch, self.encoder, self.preset], True),
            ("Optimisation", [self.steps, self.batch_size, self.lr, self.roi, self.spacing], True),
            (
                "Validation",
                [self.val_split, self.val_fraction, self.val_position, self.val_gap, self.val_every],
                False,
            ),
            (
                "Run",
                [self.device, self.seed, self.runs_folder, self.run_name, self.resume_from, self.in_process],
                True,
            ),
        ]
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self._add_sections(layout, sections)
        self._add_run_controls(
            layout,
            start_tip="start fine-tuning; becomes Cancel while it runs (a checkpoint is saved)",
            loss_label="Dice+CE",
        )
        self.dice_plot = LossPlot("validation Dice", "Dice")
        layout.addWidget(self.dice_plot)
        self.results_button = QPushButton("Predict && inspect results")
        self.results_button.setToolTip("open the results dock with this run and image")
        self.results_button.setEnabled(False)
        layout.addWidget(self.results_button)
        layout.addStretch(1)

        self.labels.changed.connect(self.refresh_organs)
        self.labels_file.changed.connect(self.refresh_organs)
        self.scratch.changed.connect(self._on_scratch)
        self.results_button.clicked.connect(lambda: self.open_results())
        self._on_scratch()

    def _on_scratch(self, _value: Any = None) -> None:
        self.init_run.enabled = self.encoder.enabled = not self.scratch.value
        self.preset.enabled = bool(self.scratch.value)

    def refresh_organs(self, _value: Any = None) -> None:
        """Offer the organs of the chosen label map (layer or file), by name and id."""
        names: dict[int, str] = {}
        try:
            path = path_text(self.labels_file)
            if path:
                from napari_dagman.core.io import read_volume
                from napari_dagman.core.labels import names_in

                volume = read_volume(path)  # SimpleITK only: no torch import in the GUI thread
                names = names_in(volume.array, volume.metadata.get("label_names"))
            elif self.labels.value is not None:
                names = layer_label_names(self.labels.value)
        except DagmanError as err:
            notify_error(err)
        self.offer_organs(names)

    def offer_organs(self, names: dict[int, str]) -> None:
        """Put these organs (id -> name) in the picker, as "name (id)"."""
        self.offered_organs = {int(i): str(n) for i, n in sorted(names.items())}
        self.organs.choices = [(f"{name} ({i})", i) for i, name in self.offered_organs.items()]

    # --- building the job ----------------------------------------------------------------------------------------
    def _learning_rate(self) -> float:
        try:
            return float(self.lr.value.strip())
        except ValueError:
            raise DagmanInputError(
                f"learning rate must be a number such as 1e-4, got {self.lr.value!r}"
            ) from None

    def build_job(self) -> tuple[FinetuneConfig, list[tuple[Any, Any]], bool]:
        """The config, the (image, labels) layer pairs and the resume flag that Start would run (raises on bad input)."""
        from napari_dagman._widgets._jobs import picklable_volume
        from napari_dagman.core.checkpoint import RunFolder

        resume_dir = path_text(self.resume_from)
        image_file, labels_file = path_text(self.image_file), path_text(self.labels_file)
        pairs: list[tuple[Any, Any]] = []
        images: list[str] = []
        segmentations: list[str] = []
        if image_file or labels_file:
            if not (image_file and labels_file):
                raise DagmanInputError("give both an image file and its label map file (or use layers)")
            images, segmentations = [image_file], [labels_file]
        elif self.image.value is not None and self.labels.value is not None:
            pairs = [
                (
                    picklable_volume(volume_from_layer(self.image.value, "image")),
                    picklable_volume(volume_from_layer(self.labels.value, "labels")),
                )
            ]
        elif not resume_dir:
            raise DagmanInputError(
                "choose an image layer and its labels layer (or an image file and a label map)"
            )
        base: dict[str, Any] = {}
        out, resume = self._run_folder("finetune")
        if resume:
            base = FinetuneConfig.from_dict(RunFolder(out).config_dict(), strict=False).to_dict()
            if not pairs and not images and not base.get("images"):
                raise DagmanInputError(
                    f"{out} was trained on napari layers: choose the same image and labels layers to resume it"
                )
        else:
            init = None if self.scratch.value else (path_text(self.init_run) or None)
            base.update(
                init=init,
                init_encoder=self.encoder.value,
                preset=self.preset.value if init is None else None,
                organs=[int(i) for i in self.organs.value],
                roi=int(self.roi.value) or None,
                spacing=float(self.spacing.value) or None,
                val_split=self.val_split.value,
                val_fraction=float(self.val_fraction.value),
                val_position=float(self.val_position.value),
                val_gap_mm=float(self.val_gap.value),
                seed=int(self.seed.value),
                batch_size=int(self.batch_size.value),
            )
        if images:
            base.update(images=images, segmentations=segmentations)
        base.update(
            out=out,
            steps=int(self.steps.value),
            lr=self._learning_rate(),
            val_every=int(self.val_every.value),
            device=str(self.device.value),
        )
        return FinetuneConfig.from_dict(base), pairs, resume

    # --- running the job (hooks of TrainingDock) ---------------------------------------------------------------
    def _job(self) -> Callable[..., Generator[Any, None, Any]]:
        return finetune_job

    def _prepare_run(self, data: list[tuple[Any, Any]]) -> None:
        self.dice_plot.clear()

    def _starting_text(self, config: FinetuneConfig) -> str:
        return f"starting on {config.device}: {config.out}"

    # --- events (main thread) ---------------------------------------------------------------------------------
    def _on_job_event(self, event: Any) -> None:
        from napari_dagman.core.events import ValidationEvent

        if isinstance(event, ValidationEvent):
            for organ, value in event.dice.items():
                self.dice_plot.add_point(organ, event.step, value)
            self.dice_plot.add_point("mean", event.step, event.mean_dice)

    def _step_text(self, event: StepEvent) -> str:
        return f"step {event.step}/{event.total_steps}: loss {event.loss:.4f} ({event.seconds_per_step:.2f} s/step)"

    def _finish_report(self, finished: FinishedEvent) -> tuple[str, Actions]:
        """Run folder and best validation Dice; offers the results dock."""
        best = finished.summary.get("best_mean_dice")
        head = (
            f"cancelled at step {finished.steps_done}/{finished.total_steps} (resumable)"
            if finished.cancelled
            else f"finished {finished.steps_done} steps"
        )
        text = f"{head}; run folder {finished.run_dir}"
        if best is not None:
            text += f"; best validation Dice {best:.3f} (step {finished.summary.get('best_step')})"
        self.results_button.setEnabled(True)
        return text, [("Predict & inspect", lambda *_: self.open_results())]

    def open_results(self, run_dir: str | None = None) -> Any:
        """Dock the results widget with this run and the training image chosen; returns it."""
        return self._open_with_run(
            RESULTS_WIDGET, "results dock", run_dir, image=self.image.value, reference=self.labels.value
        )


# =============================================================================================================
# Results dock: prediction, table, click-through
# =============================================================================================================
class SegmentationResultsWidget(QWidget):
    """Predict with a fine-tuned run, compare with a reference, and click through the organs."""

    COLUMNS = ("organ", "volume (ml)", "Dice", "HD95 (mm)")

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._runner = JobRunner(
            self._on_event,
            on_done=self._on_done,
            on_stopped=self._on_stopped,
            description="segmentation prediction",
            viewer=napari_viewer,
        )
        self.results: SegmentationResults | None = None
        self.prediction_layer: Any = None
        self.reference_layer: Any = None
        self.disagreement_layer: Any = None
        self.current_row: int | None = None
        self._image_layer: Any = None  # the CT a running prediction is for (None: evaluating a layer)
        self._build()

    def _build(self) -> None:
        import napari

        not_ours = lambda layer: not is_output_layer(layer)  # noqa: E731
        self.image = layer_combo(self._viewer, napari.layers.Image, "image", where=not_ours)
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
        self.reference = layer_combo(
            self._viewer,
            napari.layers.Labels,
            "reference",
            nullable=True,
            tooltip="a reference label map on the image's grid: Dice, HD95 and the disagreement layer",
        )
        self.prediction = layer_combo(
            self._viewer,
            napari.layers.Labels,
            "prediction",
            nullable=True,
            tooltip="an existing prediction layer to evaluate (instead of predicting)",
        )
        self.view = RadioButtons(
            label="show", choices=list(VIEW_MODES), value=VIEW_MODES[2], orientation="horizontal"
        )
        form = compact_form(
            [self.image, self.checkpoint, self.weights, self.overlap, self.roi, self.device, self.reference]
        )
        self._forms = [form]
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
        self.status = QLabel("choose an image and a fine-tuned run, then Predict")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.predict_button.clicked.connect(self.predict_or_cancel)
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
    def predict_or_cancel(self) -> None:
        if self._runner.running:
            self._runner.cancel()
            self.status.setText("cancelling after the current batch of windows...")
        else:
            self.predict()

    def predict(self) -> bool:
        """Run the prediction job on the chosen image; bad input gives a notification."""
        if self._runner.running:
            notify_warning("a prediction is already running")
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
        self._set_running(True)
        self.status.setText("predicting...")
        return True

    def evaluate_layers(self) -> bool:
        """Fill the table from the chosen prediction layer (and reference layer) without predicting."""
        if self._runner.running:
            notify_warning("a job is already running")
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
        self._set_running(True)
        self.status.setText("computing the table...")
        return True

    def wait(self, timeout: float = 300.0) -> bool:
        return self._runner.wait(timeout)

    def _set_running(self, running: bool) -> None:
        self.predict_button.setText("Cancel" if running else "Predict")
        self.evaluate_button.setEnabled(not running)
        for form in self._forms:
            form.enabled = not running

    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import LogEvent, ProgressEvent

        if isinstance(event, ProgressEvent):
            self.status.setText(f"{event.stage}: {event.done}/{event.total}")
        elif isinstance(event, LogEvent) and event.level == "warning":
            notify_warning(event.message)

    def _on_stopped(self) -> None:
        self._set_running(False)

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
