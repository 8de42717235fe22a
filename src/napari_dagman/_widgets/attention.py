"""Attention & mask explorer dock: what a pretrained encoder attends to, and which cells each strategy would mask.

A thin face over `core.attention`: the maps are the semantic class attention of the run's teacher (or student),
per head and averaged, in *relative attention* (1 = as much as a uniform map), placed on the CT at the token
size; the masks are those the training code's own generators draw for the crop around a point. Heavy work runs
in the background (`JobRunner`): a thread for a crop (the loaded network is reused, so the mask-ratio slider
answers quickly), a child process for the whole volume (sliding window), which keeps napari responsive.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    SpinBox,
)
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    DeviceComboBox,
    JobDock,
    JobRunner,
    cells_on_voxels,
    is_output_layer,
    last_run,
    layer_combo,
    notify_error,
    notify_info,
    notify_warning,
    stop_jobs_with,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.attention import AttentionResult
    from napari_dagman.core.volume import Volume

#: Layer names (one each; a new computation updates them in place).
MEAN_LAYER = "attention: mean"
HEADS_LAYER = "attention: heads"
HEAD_LAYER = "attention: head {}"
MASK_LAYER = "mask: {}"
DROPPED_LAYER = "noisy teacher: cells it did not see"
SCOPE_CHOICES = [
    ("crop around the cursor", "crop"),
    ("displayed slice (2D model)", "slice"),
    ("whole volume (sliding window)", "volume"),
]
#: A colour per mask strategy (hidden cells), distinct on a grey CT.
MASK_COLOURS = {
    "random": "#9e9e9e",
    "block": "#4fc3f7",
    "attention-high": "#ff5252",
    "attention-low": "#7c4dff",
    "attention-hint": "#ffb300",
    "noisy-teacher": "#00e676",
}
DROPPED_COLOUR = "#ffffff"


class DiversityFigure(QWidget):
    """Head-diversity figures of the shown maps: head x head correlation and per-head entropy."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 1.9))
        self.figure.patch.set_facecolor("#262930")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def show_diversity(self, diversity: dict[str, Any]) -> None:
        fig = self.figure
        fig.clear()
        similarity = np.asarray(diversity.get("similarity", []), dtype=float)
        entropy = np.asarray(diversity.get("entropy", []), dtype=float)
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": (1, 1.3)})
        for ax in (left, right):
            ax.set_facecolor("#262930")
            ax.tick_params(colors="#d0d0d0", labelsize=7)
            for spine in ax.spines.values():
                spine.set_color("#8f9294")
        if similarity.size:
            image = left.imshow(similarity, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
            left.set_xticks(range(len(similarity)))
            left.set_yticks(range(len(similarity)))
            cbar = fig.colorbar(image, ax=left, fraction=0.046, pad=0.04)
            cbar.ax.tick_params(colors="#d0d0d0", labelsize=6)
        left.set_title("correlation", color="#e0e0e0", fontsize=8)
        left.set_xlabel("head", color="#d0d0d0", fontsize=7)
        if entropy.size:
            right.bar(range(len(entropy)), entropy, color="#f0a030")
            right.set_ylim(0, 1.05)
            right.set_xticks(range(len(entropy)))
        right.set_title("entropy (1 = uniform)", color="#e0e0e0", fontsize=8)
        right.set_xlabel("head", color="#d0d0d0", fontsize=7)
        fig.tight_layout(pad=0.4, w_pad=1.0)
        self.canvas.draw_idle()


class AttentionWidget(JobDock):
    """Per-head class attention and the mask of every strategy, for an Image layer and a pretraining run."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="attention", description="DAGMaN attention")
        self._export_runner = JobRunner(
            lambda _event: None, on_done=self._on_exported, description="DAGMaN attention export"
        )
        self.result: AttentionResult | None = None
        self._image_volume: Volume | None = None
        self._image_layer: Any = None
        self._encoder: Any = None  # (key, PretrainedEncoder) reused by crop computations in a thread
        self._encoder_key: tuple = ()
        self._cursor_seen = False
        self._pending_masks = False
        self._grid_was_enabled: bool | None = None
        #: whole-volume maps in a child process (True) or a thread (the child's nice value: ``process_nice``)
        self.volume_in_process = True
        self._build()
        stop_jobs_with(self, self._runner, self._export_runner, timeout=30.0)
        napari_viewer.cursor.events.position.connect(self._on_cursor)
        last = last_run()
        if last and Path(last).is_dir():
            self.run.value = last

    # --- form -----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        import napari

        s = self._settings
        self.image = layer_combo(
            self._viewer,
            napari.layers.Image,
            "image",
            tooltip="the CT to look at (HU); it is resampled to the run's spacing as in training",
            where=lambda layer: not is_output_layer(layer),
        )
        self.run = FileEdit(
            label="run folder", mode="d", tooltip="a pretraining run folder (config.json + weights)"
        )
        self.which = ComboBox(
            label="network",
            choices=[("teacher (auto)", "auto"), ("teacher", "teacher"), ("student", "student")],
            tooltip="whose attention: DAGMaN's masks are chosen by the teacher's; SimMIM has only a student",
        )
        self.weights = ComboBox(label="weights", choices=["last", "best"], tooltip="last or best checkpoint")
        self.device = DeviceComboBox(value=s.get("device", "auto"))
        self.scope = ComboBox(
            label="where",
            choices=SCOPE_CHOICES,
            value="crop",
            tooltip="a ROI crop around the last cursor position (or the view centre), the displayed axial slice "
            "(2D models), or every sliding window of the volume",
        )
        self.overlap = FloatSpinBox(
            label="window overlap", min=0.0, max=0.9, step=0.05, value=0.25, tooltip="sliding-window overlap"
        )
        self.view = ComboBox(
            label="heads",
            choices=[("slider", "slider"), ("grid", "grid")],
            tooltip="one layer with a head slider, or each head in its own tile (napari grid mode)",
        )
        self.colormap = ComboBox(
            label="colormap", choices=["inferno", "turbo"], value=s.get("colormap", "inferno")
        )
        self._maps_form = Container(
            widgets=[
                self.image,
                self.run,
                self.which,
                self.weights,
                self.device,
                self.scope,
                self.overlap,
                self.view,
                self.colormap,
            ],
            labels=True,
        )
        self._maps_form.margins = (0, 0, 0, 0)

        self.ratio = FloatSlider(
            label="mask ratio",
            min=0.05,
            max=0.95,
            step=0.05,
            value=0.6,
            tracking=False,
            tooltip="fraction of mask cells hidden; the masks are redrawn when the slider is released",
        )
        self.noise_rate = FloatSpinBox(
            label="teacher noise",
            min=0.0,
            max=0.9,
            step=0.05,
            value=0.2,
            tooltip="input dropout of the noisy teacher",
        )
        self.seed = SpinBox(
            label="seed", min=0, max=2**31 - 1, value=0, tooltip="seed of the random and block masks"
        )
        self.show_mask = ComboBox(label="show", choices=["all", *MASK_COLOURS], value="noisy-teacher")
        self.contour = CheckBox(label="outlines only", value=False, tooltip="draw the masks as contours")
        self._mask_form = Container(
            widgets=[self.ratio, self.noise_rate, self.seed, self.show_mask, self.contour], labels=True
        )
        self._mask_form.margins = (0, 0, 0, 0)

        self.on_image_grid = CheckBox(
            label="on the CT grid",
            value=True,
            tooltip="resample the exported maps and masks onto the CT's voxels",
        )
        self._model_label = Label(value="")
        self._model_label.native.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self._maps_form.native)
        buttons = QHBoxLayout()
        self.compute_button = QPushButton("Compute")
        self.compute_button.setToolTip("compute the attention maps and the masks (Cancel while it runs)")
        self.last_run_button = QPushButton("Last run")
        self.last_run_button.setToolTip("use the run most recently trained from the pretraining dock")
        buttons.addWidget(self.compute_button)
        buttons.addWidget(self.last_run_button)
        layout.addLayout(buttons)

        masks = QCollapsible("Masks of the crop", self)
        masks.addWidget(self._mask_form.native)
        masks.expand(animate=False)
        layout.addWidget(masks)

        diversity = QCollapsible("Head diversity", self)
        self.diversity_text = QLabel("")
        self.diversity_text.setWordWrap(True)
        self.diversity_figure = DiversityFigure()
        diversity.addWidget(self.diversity_text)
        diversity.addWidget(self.diversity_figure)
        diversity.expand(animate=False)
        layout.addWidget(diversity)

        export_row = QHBoxLayout()
        self.export_button = QPushButton("Export NIfTI...")
        self.export_button.setEnabled(False)
        self.export_button.setToolTip("write the shown maps (mean and per head) and the masks as NIfTI files")
        export_row.addWidget(self.export_button)
        export_row.addWidget(self.on_image_grid.native)
        layout.addLayout(export_row)
        layout.addWidget(self._model_label.native)
        self.status = QLabel("choose an image layer and a run folder, then Compute")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._mask_timer = QTimer(self)
        self._mask_timer.setSingleShot(True)
        self._mask_timer.setInterval(150)
        self._mask_timer.timeout.connect(self.update_masks)

        self.compute_button.clicked.connect(self.compute_or_cancel)
        self.last_run_button.clicked.connect(self.use_last_run)
        self.export_button.clicked.connect(self._ask_export)
        for control in (self.ratio, self.noise_rate, self.seed):
            control.changed.connect(lambda *_: self._mask_timer.start())
        self.show_mask.changed.connect(self._apply_mask_visibility)
        self.contour.changed.connect(self._apply_mask_visibility)
        self.view.changed.connect(lambda *_: self._show_maps())
        self.colormap.changed.connect(lambda *_: self._show_maps())

    # --- inputs ---------------------------------------------------------------------------------------------
    def set_run(self, path: str) -> None:
        """Choose a run folder (the pretraining dock calls this for the run it just finished)."""
        self.run.value = path
        self._encoder = None
        self.status.setText(f"run folder: {path}")

    def use_last_run(self) -> None:
        last = last_run()
        if not last:
            notify_warning("no run trained from the pretraining dock yet")
            return
        self.set_run(last)

    def _run_folder(self) -> str:
        """The chosen run folder, checked cheaply here so that a wrong folder is reported at once."""
        from napari_dagman.core.checkpoint import RunFolder

        path = self.run.line_edit.value.strip()
        if not path:
            raise DagmanInputError("choose a run folder (a pretraining run), or train one first")
        config = RunFolder(path).config_dict()  # raises a one-line CheckpointError for other folders
        if config.get("job", "pretrain") != "pretrain":
            raise DagmanInputError(f"{path} is a {config.get('job')} run, not a pretraining run")
        return path

    def _on_cursor(self, _event: Any = None) -> None:
        self._cursor_seen = True

    def crop_center(self) -> np.ndarray:
        """World point for the crop: the last cursor position in the displayed plane, the current slice."""
        dims = self._viewer.dims
        point = np.asarray(dims.point, dtype=float)
        if self._cursor_seen:
            cursor = np.asarray(self._viewer.cursor.position, dtype=float)
            if cursor.shape == point.shape:
                for axis in dims.displayed:
                    point[axis] = cursor[axis]
        else:
            centre = np.asarray(self._viewer.camera.center, dtype=float)
            for axis, value in zip(dims.displayed, centre[-len(dims.displayed) :], strict=True):
                point[axis] = value
        return point[-3:]

    def _physical(self, layer: Any, volume: Volume, world: np.ndarray) -> tuple[np.ndarray, int]:
        """(physical point, axial index) of a world point on ``layer`` (handles oblique scans' direction)."""
        index = np.asarray(layer.world_to_data(world), dtype=float)[-3:]
        z = int(np.clip(round(index[0]), 0, volume.shape[0] - 1))
        return volume.index_to_physical(index), z

    # --- compute --------------------------------------------------------------------------------------------
    def compute_or_cancel(self) -> None:
        if self._runner.running:
            self._runner.cancel()
            self.status.setText("cancelling...")
        else:
            self.compute()

    def compute(self, image: Any = None) -> bool:
        """Compute maps (for the chosen scope) and masks; ``image`` overrides the layer picker. True if started."""
        return self._start(maps=True, image=image)

    def update_masks(self) -> bool:
        """Redraw only the masks of the crop (ratio, noise or seed changed)."""
        if self.result is None:
            return False
        if self._runner.running:
            self._pending_masks = True  # redraw when the running job ends
            return False
        return self._start(maps=False, image=self._image_layer)

    def _start(self, *, maps: bool, image: Any) -> bool:
        from napari_dagman._widgets._jobs import picklable_volume
        from napari_dagman.core.attention import attention_job
        from napari_dagman.core.config import AttentionConfig

        if self._runner.running:
            notify_warning("the explorer is busy; cancel it first")
            return False
        try:
            layer = image if image is not None else self.image.value
            volume = volume_from_layer(layer, "image")
            run = self._run_folder()
            scope = self.scope.value
            physical, z = self._physical(layer, volume, self.crop_center())
            config = AttentionConfig(
                checkpoint=run,
                which=self.which.value,
                weights=self.weights.value,
                scope=scope,
                maps=maps,
                center=[float(c) for c in physical],
                slice_index=int(z),
                overlap=float(self.overlap.value),
                ratio=float(self.ratio.value),
                noise_rate=float(self.noise_rate.value),
                seed=int(self.seed.value),
                device=str(self.device.value),
            )
            config.validate()
        except DagmanError as err:
            notify_error(err)
            return False
        self._settings.set("device", str(self.device.value))
        self._settings.set("colormap", self.colormap.value)
        self._image_layer, self._image_volume = layer, volume
        self._pending_masks = False
        if maps and scope == "volume" and self.volume_in_process:
            # minutes of CPU on a real CT: a child process keeps napari responsive (benchmarks/ui_latency.py)
            self._runner.start_in_process(
                attention_job, config, picklable_volume(volume), keep_encoder=False, nice=self.process_nice
            )
        else:
            key = (run, self.which.value, self.weights.value, str(self.device.value))
            encoder = self._encoder[1] if self._encoder and self._encoder[0] == key else None
            self._encoder_key = key
            self._runner.start(lambda token: attention_job(config, volume, encoder=encoder, cancel=token))
        self.compute_button.setText("Cancel")
        self.status.setText("computing maps..." if maps else "drawing masks...")
        return True

    # --- results --------------------------------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import LogEvent, ProgressEvent

        if isinstance(event, ProgressEvent):
            self.status.setText(f"attention: window {event.done}/{event.total}")
        elif isinstance(event, LogEvent):
            (notify_warning if event.level == "warning" else notify_info)(event.message)

    def _on_done(self, result: AttentionResult) -> None:
        if result.encoder is not None:
            self._encoder = (self._encoder_key, result.encoder)
            result.encoder = None
        keep_maps = result.maps is None and self.result is not None
        if keep_maps:  # a mask-only update keeps the maps (and their figures) on screen
            result.maps, result.diversity, result.scope = (
                self.result.maps,
                self.result.diversity,
                self.result.scope,
            )
        self.result = result
        if not keep_maps:
            self._show_maps()
            self._show_diversity()
        self._show_masks()
        m = result.model
        self._model_label.value = (
            f"{m.get('method')} · {m.get('which')} · step {m.get('step')} · {m.get('dims')}D, ROI {m.get('roi')}"
            + (
                ""
                if m.get("trains_class_attention", True)
                else " · class attention NOT trained by this method"
            )
        )
        self.export_button.setEnabled(True)
        self.status.setText("maps and masks updated" if not keep_maps else "masks updated")

    def _on_error(self, err: BaseException) -> None:
        self.status.setText(f"failed: {err}")

    def _on_stopped(self) -> None:
        self.compute_button.setText("Compute")
        if self._pending_masks:
            self._pending_masks = False
            self._mask_timer.start()

    def _output(
        self, name: str, data: np.ndarray, layer_type: str, create: dict[str, Any], **kwargs: Any
    ) -> Any:
        """Upsert an output layer; style it only when it is created so the user's tweaks survive updates."""
        if name not in self._viewer.layers:
            kwargs.update(create)
            kwargs["metadata"] = {OUTPUT_KEY: "attention-explorer"}
        return upsert_layer(self._viewer, name, data, layer_type, **kwargs)

    def _remove(self, name: str) -> None:
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)

    def _show_maps(self) -> None:
        """Mean map, and the heads on a slider or in grid tiles, at the token size over the CT."""
        if self.result is None or self.result.maps is None:
            return
        maps = self.result.maps
        heads = np.asarray(maps.maps, dtype=np.float32)
        # one contrast for every head and the mean, so that they compare; relative attention 1 = uniform
        top = max(2.0, float(np.percentile(heads, 99.5)))
        style = {"blending": "additive", "opacity": 0.7}
        common = {"colormap": self.colormap.value, "contrast_limits": (0.0, top)}
        self._output(
            MEAN_LAYER,
            maps.mean.astype(np.float32),
            "image",
            style,
            scale=maps.scale,
            translate=maps.translate,
            **common,
        )
        n = heads.shape[0]
        if self.view.value == "slider":
            for h in range(n):
                self._remove(HEAD_LAYER.format(h))
            self._output(
                HEADS_LAYER,
                heads,
                "image",
                {**style, "visible": False},
                scale=[1.0, *maps.scale],
                translate=[0.0, *maps.translate],
                **common,
            )
            if self._grid_was_enabled is not None:
                self._grid().enabled = self._grid_was_enabled
                self._grid_was_enabled = None
        else:
            self._remove(HEADS_LAYER)
            for h in range(n):
                self._output(
                    HEAD_LAYER.format(h),
                    heads[h],
                    "image",
                    style,
                    scale=maps.scale,
                    translate=maps.translate,
                    **common,
                )
            if self._grid_was_enabled is None:
                self._grid_was_enabled = bool(self._grid().enabled)
            self._grid().enabled = True

    def _grid(self) -> Any:
        # napari 0.9 moved the grid to viewer.canvas.grid (viewer.grid is deprecated there)
        canvas = getattr(self._viewer, "canvas", None)
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else self._viewer.grid

    def _show_masks(self) -> None:
        preview = self.result.preview if self.result is not None else None
        if preview is None:
            return
        for strategy, mask in preview.masks.items():
            colour = MASK_COLOURS.get(strategy, "#ffffff")
            # on the crop's voxels (not one pixel per cell): napari draws Labels outlines in data pixels
            self._output(
                MASK_LAYER.format(strategy),
                cells_on_voxels(mask.astype(np.uint8), preview.mask_scale, preview.image_scale),
                "labels",
                {"colormap": {1: colour, None: "transparent"}, "opacity": 0.5},
                scale=preview.image_scale,
                translate=preview.image_translate,
            )
        self._output(
            DROPPED_LAYER,
            cells_on_voxels(preview.teacher_dropped.astype(np.uint8), preview.mask_scale, preview.image_scale),
            "labels",
            {"colormap": {1: DROPPED_COLOUR, None: "transparent"}, "opacity": 0.35},
            scale=preview.image_scale,
            translate=preview.image_translate,
        )
        self._apply_mask_visibility()

    def _apply_mask_visibility(self, *_: Any) -> None:
        preview = self.result.preview if self.result is not None else None
        if preview is None:
            return
        chosen = self.show_mask.value
        for strategy in preview.masks:
            name = MASK_LAYER.format(strategy)
            if name in self._viewer.layers:
                layer = self._viewer.layers[name]
                layer.visible = chosen in ("all", strategy)
                layer.contour = 1 if self.contour.value else 0
        if DROPPED_LAYER in self._viewer.layers:  # shown with the mask the dropped cells belong to
            layer = self._viewer.layers[DROPPED_LAYER]
            layer.visible = chosen in ("all", "noisy-teacher")
            layer.contour = 1 if self.contour.value else 0

    def _show_diversity(self) -> None:
        d = self.result.diversity if self.result is not None else {}
        if not d:
            return
        self.diversity_text.setText(
            f"diversity {d['diversity']:.3f} (1 − mean pairwise correlation of the {d['heads']} heads' maps; "
            "0 = all alike, 1 = unrelated) · "
            f"mean entropy {d['entropy_mean']:.3f} ± {d['entropy_std']:.3f} (1 = uniform) · {d['tokens']} tokens"
        )
        self.diversity_figure.show_diversity(d)

    # --- export ---------------------------------------------------------------------------------------------
    def _ask_export(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export attention maps and masks to")
        if folder:
            self.export(folder)

    def export(self, folder: str) -> bool:
        """Write the shown maps and masks as NIfTI to ``folder`` in the background; True when started."""
        from napari_dagman.core.attention import export_attention_job

        if self.result is None or self._image_volume is None:
            notify_warning("nothing to export yet: Compute first")
            return False
        if self._export_runner.running:
            notify_warning("an export is already running")
            return False
        result, image, on_grid = self.result, self._image_volume, bool(self.on_image_grid.value)
        prefix = f"attention_{result.scope}"
        self._export_runner.start(
            lambda token: export_attention_job(result, image, folder, on_image_grid=on_grid, prefix=prefix)
        )
        self.status.setText(f"exporting to {folder}...")
        return True

    def _on_exported(self, paths: list[str]) -> None:
        folder = str(Path(paths[0]).parent) if paths else ""
        self.status.setText(f"exported {len(paths)} files to {folder}")
        notify_info(f"Exported {len(paths)} NIfTI files to {folder}")
