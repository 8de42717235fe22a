"""Fine-tuning dock, thin over `core.segmentation`: its form is built from `FinetuneConfig`'s fields.

`FinetuneWidget`: an image layer and a labels layer (or files), the organs to segment (named), the pretraining
run whose encoder starts the model (or from scratch), the fine-tuning options (`_forms.ConfigForm`: the main ones
shown, the rest folded) and the device; `core.segmentation.run_finetuning` runs in a child process (or a thread)
and the dock draws the training loss and the validation Dice per organ as they come. Before a run starts, the
pretraining run is checked and the validation slab is checked to hold the chosen organs (a better slab position
is offered). Its results (prediction, table, click-through) are the results dock's (`results.py`), which opens
as a tab of this one.

torch and MONAI are imported inside functions, so napari starts fast.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, Select
from qtpy.QtWidgets import QPushButton, QVBoxLayout

from napari_dagman._widgets.common import (
    bind_encoder_chooser,
    last_run,
    layer_label_names,
    layer_picker,
    notify_error,
    notify_warning,
    path_text,
    run_json,
    volume_from_layer,
)
from napari_dagman._widgets.common.forms import ConfigForm, placeholder, with_widgets
from napari_dagman._widgets.common.jobs import finetune_job
from napari_dagman._widgets.common.plots import LossPlot
from napari_dagman._widgets.results.dock import RESULTS_WIDGET
from napari_dagman._widgets.training.base import Actions, TrainingDock
from napari_dagman.core.config import FinetuneConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.events import FinishedEvent, StepEvent

__all__ = ["FinetuneWidget", "finetune_job"]

#: The fields of `FinetuneConfig` the dock shows, by section (data, model, optimisation, validation, run).
FIELDS: tuple[str, ...] = (
    "roi", "spacing", "hu_min", "hu_max", "resample_labels", "background_ratio", "augment", "train_pieces",
    "train_slabs",
    "init", "init_encoder", "preset", "init_weights", "dims", "drop_path",
    "steps", "batch_size", "lr", "min_lr", "weight_decay", "warmup_steps", "grad_clip", "precision", "compile",
    "fused_attention",
    "val_split", "val_fraction", "val_position", "val_gap_mm", "val_every", "val_cases", "overlap",
    "device", "seed", "threads", "log_every", "save_every", "checkpoint_every",
)  # fmt: skip
#: Shown at first; the rest of each section is folded under "more ... options".
PRIMARY_FIELDS = frozenset(
    {"roi", "spacing", "init", "init_encoder", "preset", "steps", "batch_size", "lr", "val_split", "val_fraction",
     "val_position", "val_gap_mm", "val_every", "device", "seed"}
)  # fmt: skip
#: Form widgets that are also attributes of the dock (the names scripts and tests use).
EXPOSED: tuple[str, ...] = (
    "preset",
    "steps",
    "batch_size",
    "lr",
    "roi",
    "spacing",
    "seed",
    "val_split",
    "val_fraction",
    "val_position",
    "val_every",
)
#: How the form's fields are labelled in this dock (the field name otherwise).
LABELS = {
    "roi": "ROI (voxels)",
    "spacing": "spacing (mm)",
    "preset": "preset (scratch)",
    "batch_size": "batch",
    "lr": "learning rate",
    "val_split": "validation",
    "val_fraction": "slab fraction",
    "val_position": "slab position",
    "val_gap_mm": "gap (mm)",
    "val_every": "validate every",
}
SECTION_TITLES = {
    "data": "Data",
    "model": "Model",
    "optimisation": "Optimisation",
    "validation": "Validation",
    "run": "Run",
}
#: What a resumed run may change; the rest (data, organs, model) is the run's own.
RESUMABLE_FIELDS: tuple[str, ...] = ("steps", "lr", "val_every", "device")


class FinetuneWidget(TrainingDock):
    """Fine-tune a SwinUNETR segmentation model from napari; live loss and validation Dice per organ."""

    run_kind = "fine-tuning run"
    job = "finetune"
    command = "napari-dagman fine-tuning dock"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="finetune", description="segmentation fine-tuning")
        self.offered_organs: dict[int, str] = {}
        self._slab_acknowledged: tuple | None = None  # the slab warned about; Start again starts anyway
        self._build()
        self._match_labels()
        self.refresh_organs()
        self._show_auto_values()

    # --- form ---------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self._make_inputs()
        self._make_run_widgets(
            run_name_tip="name of the new run folder (empty: date)",
            resume_tip="a fine-tuning run folder to continue (same data and organs)",
            in_process_tip="train in a child process (napari stays responsive); untick to train in a thread",
        )
        self.init_run = FileEdit(label="pretrained run", mode="d", value=last_run())
        self.encoder = ComboBox(
            label="encoder",
            choices=[("auto", "auto")],
            tooltip="which encoder of the pretrained run starts the segmentation network: the names the run publishes "
            "(a Swin: a CNN cannot be SwinUNETR's encoder)",
        )
        bind_encoder_chooser(self.encoder, self.init_run, swin_only=True)
        self.scratch = CheckBox(
            label="from scratch", value=False, tooltip="no pretrained encoder (a baseline)"
        )
        self.form = ConfigForm(
            FinetuneConfig,
            FIELDS,
            widgets={"device": self.device, "init": self.init_run, "init_encoder": self.encoder},
            labels=LABELS,
        )
        self._expose(self.form, EXPOSED)
        self.val_gap = self.form["val_gap_mm"]

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        sections = with_widgets(
            self.form.sections(
                SECTION_TITLES, primary=PRIMARY_FIELDS, expanded=("data", "model", "optimisation", "run")
            ),
            before={"Data": [self.image, self.labels, self.image_file, self.labels_file, self.organs]},
            after={
                "Model": [self.scratch],
                "Run": [self.runs_folder, self.run_name, self.resume_from, self.in_process],
            },
        )
        self._add_sections(layout, sections)
        self._add_run_controls(
            layout,
            start_tip="start fine-tuning; becomes Cancel while it runs (a checkpoint is saved)",
            loss_label="Dice+CE",
        )
        self.dice_plot = LossPlot("validation Dice", "Dice", primary="mean")
        layout.addWidget(self.dice_plot)
        self.results_button = QPushButton("Predict && inspect results")
        self.results_button.setToolTip("open the results dock with this run and image")
        self.results_button.setEnabled(False)
        layout.addWidget(self.results_button)
        layout.addStretch(1)
        self.make_scrollable()

        self.labels.changed.connect(self.refresh_organs)
        self.labels_file.changed.connect(self.refresh_organs)
        self.image.changed.connect(self._match_labels)
        self.scratch.changed.connect(self._on_scratch)
        self.init_run.changed.connect(self._show_auto_values)
        self.results_button.clicked.connect(lambda: self.open_results())
        self._on_scratch()

    def _make_inputs(self) -> None:
        self.image = layer_picker(self._viewer, "image", tooltip="the CT to train on")
        self.labels = layer_picker(
            self._viewer, "labels", tooltip="its label map (same voxel grid as the image)"
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

    def _on_scratch(self, _value: Any = None) -> None:
        self.init_run.enabled = self.encoder.enabled = not self.scratch.value
        self.preset.enabled = bool(self.scratch.value)
        self._show_auto_values()

    def _match_labels(self, _value: Any = None) -> None:
        """With no labels chosen, the one label map on the image's voxel grid (the image's own)."""
        image = self.image.value
        if image is None or self.labels.value is not None:
            return
        shape = np.shape(image.data)
        matching = [
            layer for layer in self.labels.choices if layer is not None and np.shape(layer.data) == shape
        ]
        if len(matching) == 1:
            self.labels.value = matching[0]

    def _show_auto_values(self, _value: Any = None) -> None:
        """Left on auto, ROI and spacing show the values the run will use (the pretraining run's)."""
        if not hasattr(self, "form"):
            return
        saved = {} if self.scratch.value else _run_inputs(path_text(self.init_run))
        for name, unit in (("roi", ""), ("spacing", " mm")):
            widget, spec = self.form[name], self.form.specs[name]
            text = placeholder(spec.auto_text)
            if name in saved:
                value = saved[name] if name != "roi" else max(int(spec.minimum or 0), int(saved[name]))
                text = f"auto: {value:g}{unit} (the pretraining run's)"
            widget.native.setPlaceholderText(text)

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
    def _training_data(self, resume_dir: str) -> tuple[list[tuple[Any, Any]], list[str], list[str]]:
        """(layer pairs, image files, label map files): files when given, else the chosen layers."""
        from napari_dagman._widgets.common.jobs import picklable_volume

        image_file, labels_file = path_text(self.image_file), path_text(self.labels_file)
        if image_file or labels_file:
            if not (image_file and labels_file):
                raise DagmanInputError("give both an image file and its label map file (or use layers)")
            return [], [image_file], [labels_file]
        if self.image.value is not None and self.labels.value is not None:
            image = picklable_volume(volume_from_layer(self.image.value, "image"))
            return [(image, picklable_volume(volume_from_layer(self.labels.value, "labels")))], [], []
        if not resume_dir:
            raise DagmanInputError(
                "choose an image layer and its labels layer (or an image file and a label map)"
            )
        return [], [], []

    def build_job(self) -> tuple[FinetuneConfig, list[tuple[Any, Any]], bool]:
        """The config, the (image, labels) layer pairs and the resume flag that Start would run (raises on bad input)."""
        from napari_dagman.core.checkpoint import RunFolder

        pairs, images, segmentations = self._training_data(path_text(self.resume_from))
        values = self.form.values()
        out, resume = self._run_folder("finetune")
        if resume:
            base = FinetuneConfig.from_dict(RunFolder(out).config_dict(), strict=False).to_dict()
            if not pairs and not images and not base.get("images"):
                raise DagmanInputError(
                    f"{out} was trained on napari layers: choose the same image and labels layers to resume it"
                )
            base.update({name: values[name] for name in RESUMABLE_FIELDS})
        else:
            init = None if self.scratch.value else values["init"]
            base = {**values, "init": init, "organs": [int(i) for i in self.organs.value]}
            if init is not None:
                base["preset"] = None  # the run's preset
        if images:
            base.update(images=images, segmentations=segmentations)
        base["out"] = out
        return FinetuneConfig.from_dict(base), pairs, resume

    def _ready(self, config: FinetuneConfig, pairs: list[tuple[Any, Any]], resume: bool) -> bool:
        """The pretraining run is a pretraining run, and the validation slab holds the chosen organs."""
        if resume:
            return True
        from napari_dagman.core.segmentation.model import run_input_defaults

        defaults = run_input_defaults(config.init)  # one line now for a folder that is no pretraining run
        return self._slab_holds_organs(config, pairs, defaults)

    def _validation_labels(self, pairs: list[tuple[Any, Any]]) -> Any:
        """The one label map a slab split cuts (a layer's or a file's), else None (several pairs; a label map on
        another grid than its image, which the run itself refuses or resamples)."""
        if pairs:
            image, labels = pairs[0]
            return labels if len(pairs) == 1 and image.shape == labels.shape else None
        path = path_text(self.labels_file)
        if not path:
            return None
        from napari_dagman.core.io import read_volume

        return read_volume(path)

    def _slab_holds_organs(self, config: FinetuneConfig, pairs: list[Any], defaults: dict[str, Any]) -> bool:
        """Say at Start which organs the validation slab would not validate, and offer a slab that holds more.

        Start refuses once (the warning has a button that moves the slab); pressed again unchanged, it starts.
        """
        from napari_dagman.core.segmentation.data import slab_advice

        labels = self._validation_labels(pairs)
        if labels is None or config.val_split not in ("auto", "slab"):
            return True
        dims = int(config.dims or defaults["dims"])
        model_z = float(config.spacing or defaults["spacing"]) if dims == 3 else float(labels.spacing[0])
        # organs absent from the whole label map are the run's to refuse, with its own message
        advice = slab_advice(
            labels.array,
            labels.spacing[0],
            model_z,
            config.organs or sorted(self.offered_organs),
            fraction=config.val_fraction,
            position=config.val_position,
            gap_mm=config.val_gap_mm,
        )
        # the same choice as last time (the volume is rebuilt per Start: the layer or file identifies it)
        source = (id(self.labels.value), path_text(self.labels_file))
        key = (advice.organs, config.val_position, config.val_fraction, config.val_gap_mm, source)
        if not advice.missing or key == self._slab_acknowledged:
            return True
        self._slab_acknowledged = key
        position = f"'{self.form['val_position'].label}'"
        text = advice.text(self.offered_organs, config.val_position, position)
        actions: Actions = [("Start anyway", lambda *_: self.start())]
        if advice.best_position is not None:
            best = advice.best_position
            actions.insert(0, (f"Move the slab to {best:g}", lambda *_: self._move_slab(best)))
        self.status.setText(f"not started: {text}. Start again to start anyway.")
        notify_warning(text, actions)
        return False

    def _move_slab(self, position: float) -> None:
        self.val_position.value = position
        self.status.setText(f"validation slab moved to {position:g}; Start when ready")

    # --- running the job (hooks of TrainingDock) ---------------------------------------------------------------
    def _job(self) -> Callable[..., Generator[Any, None, Any]]:
        return finetune_job

    def _prepare_run(self, data: list[tuple[Any, Any]]) -> None:
        self.dice_plot.clear()

    def _starting_text(self, config: FinetuneConfig) -> str:
        return f"starting on {config.device}: {config.out}"

    # --- events (main thread) ---------------------------------------------------------------------------------
    def _on_job_event(self, event: Any) -> None:
        from napari_dagman.core.events import ProgressEvent, ValidationEvent

        if isinstance(event, ValidationEvent):
            self._add_dice(event.step, event.dice, event.mean_dice)
        elif isinstance(event, ProgressEvent) and self._cancel_requested_at is None:
            # validation over the held-out cases: minutes on a CPU, said case by case
            self.status.setText(f"{event.stage}: {event.done} of {event.total} held-out piece(s) done")

    def _add_dice(self, step: int, dice: dict[str, float], mean: float) -> None:
        for organ, value in dice.items():
            self.dice_plot.add_point(organ, step, value)
        self.dice_plot.add_point("mean", step, mean)

    def _on_history_record(self, record: dict[str, Any]) -> None:
        # a resumed run's earlier validations: the Dice curves show its whole history too
        if record.get("kind") == "validation" and isinstance(record.get("dice"), dict):
            self._add_dice(int(record["step"]), record["dice"], float(record.get("mean_dice", np.nan)))

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
            text += f"; best validation Dice {best:.3f} on the held-out slab (step {finished.summary.get('best_step')})"
        self.results_button.setEnabled(True)
        return text, [("Predict & inspect", lambda *_: self.open_results(finished.run_dir))]

    def open_results(self, run_dir: str | None = None) -> Any:
        """Dock the results widget with this run and the training image chosen; returns it."""
        return self._open_with_run(
            RESULTS_WIDGET, "results dock", run_dir, image=self.image.value, reference=self.labels.value
        )


def _run_inputs(path: str) -> dict[str, Any]:
    """ROI and spacing of a pretraining run (as its config.json says), for showing what "auto" means."""
    config = run_json(path)
    if config.get("job", "pretrain") != "pretrain":
        return {}
    return {k: config[k] for k in ("roi", "spacing") if isinstance(config.get(k), int | float)}
