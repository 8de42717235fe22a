"""Attention & mask explorer dock: what a pretrained encoder attends to, and which cells each strategy would mask.

A thin face over `core.attention`. The maps are the semantic class attention of the run's teacher (or student),
per head and averaged, in *relative attention* (x uniform: 1 = what every token would get if all were equal),
placed on the CT at the token (or sub-token) size; the masks are those the training code's own generators draw for
the crop around a point. The dock shows them as small multiples that follow the viewer's slice (`attention_figure`),
each head and each strategy's mask once, over the CT; a click on a tile shows it as the napari layer
(`attention_layers`). With a label map it gives each head's attention per organ (`attention_organs`); with a second
run, both runs side by side and the difference of their mean maps.

Heavy work runs in the background (`JobRunner`): a thread for a crop (the loaded network is reused, so the mask
controls answer quickly), a child process for the whole volume (sliding window), which keeps napari responsive.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import FileEdit
from qtpy.QtCore import QTimer, QUrl
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets._common import (
    JobDock,
    JobRunner,
    jump_to,
    last_run,
    layer_label_names,
    notify_info,
    notify_warning,
    path_text,
    slice_axis,
    stop_jobs_with,
    viewer_camera,
    volume_from_layer,
)
from napari_dagman._widgets._forms import compact_form
from napari_dagman._widgets.attention_controls import (
    HELP_FILE,
    READ_CHECKS,
    READ_DIFFERENCE,
    READ_DIVERSITY,
    READ_HEADS,
    READ_MASKS,
    READ_PICTURES,
    check_lines,
    diversity_lines,
    explorer_controls,
    model_lines,
)
from napari_dagman._widgets.attention_figure import DiversityFigure, TileFigure
from napari_dagman._widgets.attention_layers import (
    DIFFERENCE_LAYER,
    DROPPED_LAYER,
    HEADS_LAYER,
    MASK_LAYER,
    MEAN_LAYER,
    PICTURE_LAYER,
    ExplorerLayers,
)
from napari_dagman._widgets.attention_organs import OrganPanel, organ_job
from napari_dagman._widgets.attention_tiles import (
    DROPPED,
    SliceView,
    auto_contrast,
    difference_limit,
    difference_row,
    head_row,
    mask_row,
    run_label,
    volume_grid,
)
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    from collections.abc import Callable

    import napari
    from napari_dagman.core.attention import AttentionResult
    from napari_dagman.core.volume import Volume

__all__ = [
    "DIFFERENCE_LAYER",
    "DROPPED_LAYER",
    "HEADS_LAYER",
    "MASK_LAYER",
    "MEAN_LAYER",
    "PICTURE_LAYER",
    "AttentionWidget",
]


class AttentionWidget(JobDock):
    """Per-head class attention and the mask of every strategy, for an Image layer and a pretraining run."""

    run_kind = "attention computation"
    cancelling_text = "cancelling after the current batch of windows..."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="attention", description="DAGMaN attention")
        self._export_runner = JobRunner(
            lambda _event: None, on_done=self._on_exported, description="DAGMaN attention export"
        )
        self._organ_runner = JobRunner(
            lambda _event: None, on_done=self._on_organs, description="DAGMaN attention per organ"
        )
        self.result: AttentionResult | None = None
        self.compared: AttentionResult | None = None  # the second run, when two are compared
        self.layers = ExplorerLayers(napari_viewer)
        self._image_volume: Volume | None = None
        self._image_layer: Any = None
        self._encoder: Any = None  # (key, PretrainedEncoder) reused by crop computations in a thread
        self._encoder_key: tuple = ()
        self._cursor_seen = False
        self._masks_only = False
        self._pending_masks = False
        self._after_job: list[Callable[[], None]] = []  # called once when the next job ends
        self._run_names = ("", "")
        self._watched: Any = None  # the CT layer whose window the tiles follow
        #: whole-volume maps in a child process (True) or a thread (the child's nice value: ``process_nice``)
        self.volume_in_process = True
        self._build()
        stop_jobs_with(self, self._export_runner, self._organ_runner, timeout=30.0)
        # bound methods: napari holds them weakly, so a closed dock is not called
        napari_viewer.cursor.events.position.connect(self._on_cursor)
        napari_viewer.dims.events.point.connect(self._on_dims)
        napari_viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        callbacks, callback = napari_viewer.mouse_drag_callbacks, self._on_canvas_click
        callbacks.append(callback)
        self.destroyed.connect(lambda *_: callback in callbacks and callbacks.remove(callback))
        last = last_run()
        if last and Path(last).is_dir():
            self.run.value = last

    # --- form -----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        controls = explorer_controls(self._viewer, self._settings)
        for field in fields(controls):  # the names scripts and tests use: dock.image, dock.scope, ...
            setattr(self, field.name, getattr(controls, field.name))
        self._layout_dock()
        self._connect()

    def _layout_dock(self) -> None:
        o = self.options
        inputs = compact_form(
            [self.image, self.run, self.compare, self.organs, self.which, self.weights, o["device"]]
        )
        maps = compact_form(
            [self.scope, self.overlap, self.subtoken, self.smooth, self.colormap, self.stretch, self.checks,
             self.check_seeds]
        )  # fmt: skip
        masks = compact_form(
            [self.strategies, self.ratio, self.noise_rate, self.seed, self.show_mask, self.contour, self.follow]
        )
        view3d = compact_form([self.rendering, self.threshold])
        self._forms += [inputs, maps, masks]
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        for title, form in (("Image and runs", inputs), ("Maps", maps)):
            box = QCollapsible(title, self)
            box.addWidget(form.native)
            box.expand(animate=False)
            layout.addWidget(box)
        buttons = QHBoxLayout()
        self.compute_button = QPushButton("Compute")
        self.compute_button.setToolTip("compute the maps and the masks (Cancel while it runs)")
        self.last_run_button = QPushButton("Last run")
        self.last_run_button.setToolTip("use the run most recently trained from the pretraining dock")
        self.help = QLabel(
            f'<a href="{QUrl.fromLocalFile(str(HELP_FILE)).toString()}">Help: reading the maps</a>'
        )
        self.help.setOpenExternalLinks(True)
        self.help.setToolTip(f"what the maps, masks and figures mean: {HELP_FILE.name} in the project's docs")
        for widget in (self.compute_button, self.last_run_button, self.help):
            buttons.addWidget(widget)
        layout.addLayout(buttons)
        self._toggle = (self.compute_button, "Compute")
        self._start_buttons.append(self.last_run_button)
        self.model_line = QLabel("")
        self.model_line.setWordWrap(True)
        layout.addWidget(self.model_line)

        self.heads_reading, self.masks_reading = QLabel(READ_HEADS), QLabel(READ_MASKS)
        self.checks_reading = QLabel(READ_CHECKS)
        self.checks_panel = QWidget()
        QVBoxLayout(self.checks_panel).setContentsMargins(0, 0, 0, 0)
        self.check_labels: list[QLabel] = []
        self.contrast_line = QLabel("")
        self.heads_figure = TileFigure(empty_text="Compute to see each head's attention on this slice")
        self.masks_figure = TileFigure(empty_text="Compute to see every strategy's mask on this slice")
        self.diversity_text, self.diversity_reading = QLabel(""), QLabel(READ_DIVERSITY)
        self.diversity_figure = DiversityFigure()
        self.organ_panel = OrganPanel()
        self.three_d_button = QPushButton("3D view")
        self.three_d_button.setToolTip(
            "switch napari between its 2D and 3D views (the maps use the rendering above)"
        )
        sections = [
            ("Before reading the maps", [self.checks_reading, self.checks_panel]),
            ("Heads on this slice", [self.heads_reading, self.contrast_line, self.heads_figure]),
            ("Masks on this slice", [masks.native, self.masks_reading, self.masks_figure]),
            ("Attention per organ", [self.organ_panel]),
            ("Head diversity", [self.diversity_reading, self.diversity_text, self.diversity_figure]),
            ("3D view", [view3d.native, self.three_d_button]),
        ]
        for title, widgets in sections:
            box = QCollapsible(title, self)
            for widget in widgets:
                if isinstance(widget, QLabel):
                    widget.setWordWrap(True)
                box.addWidget(widget)
            if title != "3D view":
                box.expand(animate=False)
            layout.addWidget(box)
        export_row = QHBoxLayout()
        self.export_button = QPushButton("Export NIfTI...")
        self.export_button.setEnabled(False)
        self.export_button.setToolTip("write the shown maps (mean and per head) and the masks as NIfTI files")
        export_row.addWidget(self.export_button)
        export_row.addWidget(self.on_image_grid.native)
        layout.addLayout(export_row)
        self.status.setText("choose an image layer and a run folder, then Compute")
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.make_scrollable()

    def _connect(self) -> None:
        self._mask_timer = QTimer(self)
        self._mask_timer.setSingleShot(True)
        self._mask_timer.setInterval(150)
        self._mask_timer.timeout.connect(self.update_masks)
        self._slice_timer = QTimer(self)
        self._slice_timer.setSingleShot(True)
        self._slice_timer.setInterval(0)
        self._slice_timer.timeout.connect(self.redraw_slice)
        self.compute_button.clicked.connect(self.start_or_cancel)
        self.last_run_button.clicked.connect(self.use_last_run)
        self.export_button.clicked.connect(self._ask_export)
        self.three_d_button.clicked.connect(self.toggle_3d)
        for control in (self.strategies, self.ratio, self.noise_rate, self.seed):
            control.changed.connect(lambda *_: self._mask_timer.start())
        self.show_mask.changed.connect(self._apply_mask_visibility)
        self.contour.changed.connect(self._apply_mask_visibility)
        for control in (self.colormap, self.smooth, self.stretch, self.rendering, self.threshold):
            control.changed.connect(lambda *_: self._restyle())
        self.organs.changed.connect(lambda *_: self._compute_organs())
        self.heads_figure.clicked.connect(self.show_tile)
        self.masks_figure.clicked.connect(self.show_tile)
        self.organ_panel.organ_clicked.connect(lambda organ, _name: self.go_to_organ(organ))

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

    @staticmethod
    def _run_folder(edit: FileEdit, required: bool = True) -> str | None:
        """A chosen run folder, checked cheaply here so that a wrong folder is reported at once."""
        from napari_dagman._widgets._common import checked_run

        path = path_text(edit)
        if not path:
            if required:
                raise DagmanInputError("choose a run folder (a pretraining run), or train one first")
            return None
        checked_run(path, "pretrain")  # raises a one-line error for other folders and other kinds of run
        return path

    def _labels_volume(self) -> Volume | None:
        from napari_dagman._widgets._jobs import picklable_volume

        layer = self.organs.value
        if layer is None:
            return None
        volume = volume_from_layer(layer, "labels")
        volume.metadata["label_names"] = layer_label_names(layer)
        return picklable_volume(volume)

    def _on_cursor(self, _event: Any = None) -> None:
        self._cursor_seen = True

    def _on_dims(self, _event: Any = None) -> None:
        self._slice_timer.start()  # a slider drag sends many events: one redraw for the last of them

    def _on_ndisplay(self, _event: Any = None) -> None:
        self._restyle()

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
            centre = np.asarray(viewer_camera(self._viewer).center, dtype=float)
            for axis, value in zip(dims.displayed, centre[-len(dims.displayed) :], strict=True):
                point[axis] = value
        return point[-3:]

    def _physical(self, layer: Any, volume: Volume, world: np.ndarray) -> tuple[np.ndarray, int]:
        """(physical point, axial index) of a world point on ``layer`` (handles oblique scans' direction)."""
        index = np.asarray(layer.world_to_data(world), dtype=float)[-3:]
        z = int(np.clip(round(index[0]), 0, volume.shape[0] - 1))
        return volume.index_to_physical(index), z

    # --- compute --------------------------------------------------------------------------------------------
    def start(self) -> bool:
        return self.compute()

    def compute(self, image: Any = None) -> bool:
        """Compute maps (for the chosen scope) and masks; ``image`` overrides the layer picker. True if started."""
        return self._start(maps=True, image=image)

    def update_masks(self) -> bool:
        """Redraw the masks of the crop (ratio, noise or seed changed); a crop's maps come with them."""
        if self.result is None:
            return False
        if self._runner.running:
            self._pending_masks = True  # redraw when the running job ends
            return False
        return self._start(maps=self.result.scope == "crop", image=self._image_layer)

    def move_crop(self, world: Any) -> bool:
        """Centre the crop on a world point (a click on the CT) and redraw its masks."""
        if self.result is None or self._runner.running:
            return False
        return self._start(
            maps=self.result.scope == "crop", image=self._image_layer, point=np.asarray(world)[-3:]
        )

    def _on_canvas_click(self, viewer: Any, event: Any) -> Any:
        """A click (not a drag) on the canvas in pan/zoom mode moves the crop there, when asked to."""
        active = viewer.layers.selection.active
        if not self.follow.value or self.result is None or viewer.dims.ndisplay != 2:
            return
        if active is not None and getattr(active, "mode", "pan_zoom") != "pan_zoom":
            return
        start = np.asarray(event.pos, dtype=float)
        yield
        while event.type == "mouse_move":
            if np.abs(np.asarray(event.pos, dtype=float) - start).max() > 4:
                return  # a drag pans the view
            yield
        self.move_crop(event.position)

    def _start(self, *, maps: bool, image: Any, point: np.ndarray | None = None) -> bool:
        from napari_dagman._widgets._jobs import picklable_volume
        from napari_dagman.core.attention.job import attention_job, compare_job

        if self._busy():
            return False
        try:
            layer = image if image is not None else self.image.value
            volume = volume_from_layer(layer, "image")
            run = self._run_folder(self.run)
            second = self._run_folder(self.compare, required=False)
            labels = self._labels_volume() if maps else None
            physical, z = self._physical(layer, volume, self.crop_center() if point is None else point)
            config = self._config(run, second, maps, physical, z)
        except DagmanError as err:
            return self.refuse(err)
        self._settings.set("device", str(self.device.value))
        self._settings.set("colormap", self.colormap.value)
        self._settings.set("smooth", bool(self.smooth.value))
        self._image_layer, self._image_volume = layer, volume
        self._run_names = (run, second or "")
        self._masks_only, self._pending_masks = not maps, False
        status = "computing maps..." if maps else "drawing masks..."
        if second is not None:  # both runs loaded fresh and checked comparable before any work
            in_process = maps and config.scope == "volume" and self.volume_in_process
            self._launch(
                compare_job,
                config,
                picklable_volume(volume),
                labels=labels,
                in_process=in_process,
                status=status,
            )
        elif maps and config.scope == "volume" and self.volume_in_process:
            # minutes of CPU on a real CT: a child process keeps napari responsive (benchmarks/ui_latency.py)
            self._launch(
                attention_job,
                config,
                picklable_volume(volume),
                labels=labels,
                keep_encoder=False,
                in_process=True,
                status=status,
            )
        else:
            key = (run, self.which.value, self.weights.value, str(self.device.value))
            encoder = self._encoder[1] if self._encoder and self._encoder[0] == key else None
            self._encoder_key = key
            self._launch(attention_job, config, volume, labels=labels, encoder=encoder, status=status)
        return True

    def _config(self, run: str, second: str | None, maps: bool, physical: np.ndarray, z: int) -> Any:
        from napari_dagman.core.config import AttentionConfig

        values = self.options.values()
        values.update(
            checkpoint=run,
            compare=second,
            maps=maps,
            center=[float(c) for c in physical],
            slice_index=int(z),
            device=str(values["device"]),
        )
        config = AttentionConfig.from_dict(values)
        config.validate()
        return config

    # --- results --------------------------------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import LogEvent, ProgressEvent

        if isinstance(event, ProgressEvent):
            self.status.setText(f"attention: window {event.done}/{event.total}")
        elif isinstance(event, LogEvent):
            (notify_warning if event.level == "warning" else notify_info)(event.message)

    def _on_done(self, result: Any) -> None:
        from napari_dagman.core.attention.job import Comparison

        if result is None:
            return
        if isinstance(result, Comparison):
            first, second, difference = result.first, result.second, result.difference
        else:
            first, second, difference = result, None, None
            if first.encoder is not None:
                self._encoder = (self._encoder_key, first.encoder)
                first.encoder = None
        if self._masks_only:  # a mask-only update keeps the maps (and their figures) on screen
            self._keep_maps(first, self.result)
            self._keep_maps(second, self.compared)
            difference = self.layers.difference
        self.result, self.compared = first, second
        self.layers.results = [first, second]
        self.layers.difference = difference
        self._show_result()
        self.export_button.setEnabled(True)
        self.status.setText("masks updated" if self._masks_only else "maps and masks updated")

    @staticmethod
    def _keep_maps(new: AttentionResult | None, old: AttentionResult | None) -> None:
        if new is not None and old is not None and new.maps is None:
            new.maps, new.diversity, new.scope, new.organs = old.maps, old.diversity, old.scope, old.organs

    def after_next_job(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the next job of this dock has ended (done, failed or cancelled)."""
        self._after_job.append(callback)

    def _on_stopped(self) -> None:
        super()._on_stopped()
        callbacks, self._after_job = self._after_job, []
        for callback in callbacks:
            callback()
        if self._pending_masks:
            self._pending_masks = False
            self._mask_timer.start()

    def _show_result(self) -> None:
        """Layers, small multiples, organ table, diversity and the model line of the current result(s)."""
        result, second = self.result, self.compared
        maps = [r.maps for r in (result, second) if r is not None]
        self.layers.style.contrast = auto_contrast(maps, stretch=bool(self.stretch.value))
        self.layers.style.difference_limit = difference_limit(self.layers.difference)
        if result.maps is not None and not self._masks_only:  # 3D: the top tenth of the mean map shows
            threshold, self.layers.style.top = np.percentile(result.maps.mean, (90.0, 99.9))
            with self.threshold.changed.blocked():
                self.threshold.value = round(float(threshold), 2)
        self._sync_style()
        self.layers.prune()
        for (
            key
        ) in self.layers.tile_keys():  # the first run's layers now, the second's when their tile is clicked
            if key[0] == "difference" or key[1] == 0:
                self.layers.layer(key)
        self._apply_mask_visibility()
        self._refresh_figures()
        self.organ_panel.set_table(result.organs)
        if result.organs is None and result.maps is not None and self.organs.value is not None:
            self._compute_organs()
        self.model_line.setText(model_lines(self._shown_runs()))
        self._show_diversity()
        if not self._masks_only:
            self._show_checks()
        self._watch_ct()

    def _show_checks(self) -> None:
        """One sentence per sanity check of the first run (its figures in the tooltip)."""
        layout = self.checks_panel.layout()
        for label in self.check_labels:
            layout.removeWidget(label)
            label.deleteLater()
        self.check_labels = []
        lines = check_lines(self.result)
        if not lines and self.result is not None and self.result.maps is not None:
            lines = [("No checks computed (tick 'sanity checks' and Compute).", "")]
        for text, figures in lines:
            label = QLabel(text)
            label.setWordWrap(True)
            label.setToolTip(figures)
            layout.addWidget(label)
            self.check_labels.append(label)

    def _labels(self) -> tuple[str, str]:
        """Short names of the two runs in titles: method and folder."""
        pairs = zip((self.result, self.compared), self._run_names, strict=True)
        return tuple(run_label(r, Path(n).name) if r is not None else "" for r, n in pairs)  # type: ignore[return-value]

    def _refresh_figures(self) -> None:
        """Lay the tiles out for the current results and draw them on the viewer's slice."""
        if self.result is None or self._image_volume is None:
            return
        ct = volume_grid(self._image_volume)
        labels = self._labels()
        results = [r for r in (self.result, self.compared) if r is not None]
        heads = [head_row(r, ct, i, labels[i]) for i, r in enumerate(results)]
        heads.append(difference_row(self.layers.difference, ct, labels))
        masks = [mask_row(r, i, labels[i]) for i, r in enumerate(results)]
        view = self.slice_view()
        style = self.layers.style
        for figure in (self.heads_figure, self.masks_figure):
            figure.colormap, figure.smooth = style.colormap, style.smooth
            if self._image_layer is not None:
                figure.ct_limits = tuple(self._image_layer.contrast_limits)
        self.heads_figure.set_rows(
            [r for r in heads if r is not None],
            ct,
            view,
            contrast=style.contrast,
            difference_limit=style.difference_limit,
        )
        self.masks_figure.set_rows([r for r in masks if r is not None], ct, view)
        self.contrast_line.setText(style.contrast.text() if style.contrast else "")
        reading = READ_HEADS if self.result.maps is not None else READ_PICTURES
        self.heads_reading.setText(reading + (READ_DIFFERENCE if self.layers.difference is not None else ""))

    def slice_view(self) -> SliceView:
        """The viewer's slice axis (of the CT's three) and its world position."""
        axis = slice_axis(self._viewer)
        return SliceView(axis, float(np.asarray(self._viewer.dims.point)[-3 + axis]))

    def redraw_slice(self) -> None:
        """Cut the small multiples at the viewer's slice (the viewer's dims changed)."""
        if self.result is None or self._viewer.dims.ndim < 3 or self._image_layer not in self._viewer.layers:
            return  # the CT is gone (layers removed): the figures keep their last slice
        view = self.slice_view()
        self.heads_figure.set_slice(view)
        self.masks_figure.set_slice(view)

    def _watch_ct(self) -> None:
        """The tiles' grey window follows the CT layer's contrast limits."""
        layer = self._image_layer
        if layer is not None and self._watched is not layer:
            layer.events.contrast_limits.connect(self._on_ct_limits)
            self._watched = layer

    def _on_ct_limits(self, _event: Any = None) -> None:
        if self._image_layer is not None:
            for figure in (self.heads_figure, self.masks_figure):
                figure.set_ct_limits(tuple(self._image_layer.contrast_limits))

    def _shown_runs(self) -> list[tuple[str, AttentionResult]]:
        """(label, result) of the run and of the run it is compared with."""
        pairs = zip(self._labels(), (self.result, self.compared), strict=True)
        return [(label, result) for label, result in pairs if result is not None]

    def _show_diversity(self) -> None:
        text, figures = diversity_lines(self._shown_runs())
        self.diversity_text.setText(text)
        self.diversity_figure.show_diversity(figures)

    # --- tiles -> layers ------------------------------------------------------------------------------------
    def show_tile(self, key: tuple, *, quiet: bool = False) -> Any:
        """Show a tile's head, mean, mask or picture as the napari layer (alone among its kind)."""
        layer = self.layers.show(key, contour=bool(self.contour.value))
        if layer is None:
            if not quiet:
                notify_warning("nothing to show for this tile")
            return None
        for figure in (self.heads_figure, self.masks_figure):
            if key in figure.tile_keys():
                figure.select(key)
        if key[0] in ("mask", "dropped") and key[1] == 0:
            with self.show_mask.changed.blocked():
                self.show_mask.value = key[2] if key[0] == "mask" else DROPPED
        self.status.setText(f"showing '{layer.name}'")
        return layer

    def _apply_mask_visibility(self, *_: Any) -> None:
        """Show the mask chosen in 'show' alone (the first one there is when the method has not that one)."""
        chosen = self.show_mask.value
        if self.result is None:
            return
        if chosen == "none":
            for layer in self.layers.mask_layers():
                layer.visible = False
            return
        key = ("dropped", 0) if chosen == DROPPED else ("mask", 0, chosen)
        shown = [k for k in self.layers.tile_keys() if k[0] in ("mask", "dropped", "picture") and k[1] == 0]
        if shown:
            self.show_tile(key if key in shown else shown[0], quiet=True)

    # --- style and 3D ---------------------------------------------------------------------------------------
    def _sync_style(self) -> None:
        style = self.layers.style
        style.colormap, style.smooth = self.colormap.value, bool(self.smooth.value)
        style.rendering, style.threshold = self.rendering.value, float(self.threshold.value)

    def _restyle(self) -> None:
        """Colour map, scale, smooth or raw grid, 3D rendering: the layers and the tiles, without recomputing."""
        self._sync_style()
        maps = [r.maps for r in (self.result, self.compared) if r is not None]
        self.layers.style.contrast = auto_contrast(maps, stretch=bool(self.stretch.value))
        self.layers.restyle()
        style = self.layers.style
        for figure in (self.heads_figure, self.masks_figure):
            figure.set_style(colormap=style.colormap, smooth=style.smooth, contrast=style.contrast)
        self.contrast_line.setText(style.contrast.text() if style.contrast else "")

    def toggle_3d(self) -> None:
        """napari's 2D <-> 3D view; the maps switch to the 3D rendering above the threshold."""
        self._viewer.dims.ndisplay = 2 if self._viewer.dims.ndisplay == 3 else 3

    # --- organs ---------------------------------------------------------------------------------------------
    def _compute_organs(self) -> bool:
        """Each head's attention per organ of the chosen label map, for the maps shown (in the background)."""
        if self.result is None or self._organ_runner.running:
            return False
        if self.organs.value is None:
            self.organ_panel.set_table(None)
            return False
        if self.result.maps is None:
            notify_warning(
                "no attention maps to measure per organ (this method does not train the class attention)"
            )
            return False
        try:
            labels = self._labels_volume()
        except DagmanError as err:
            return self.refuse(err)
        maps, names = self.result.maps, labels.metadata.get("label_names") or {}
        self._organ_runner.start(lambda token: organ_job(maps, labels, names, cancel=token))
        self.status.setText("attention per organ...")
        return True

    def _on_organs(self, table: Any) -> None:
        if self.result is not None:
            self.result.organs = table
        self.organ_panel.set_table(table)
        self.status.setText("attention per organ updated")

    def go_to_organ(self, organ: int) -> bool:
        """Move the viewer to an organ of the label map: its largest slice, the camera on its centre there."""
        from napari_dagman.core.segmentation import organ_focus

        layer = self.organs.value
        if layer is None or layer not in self._viewer.layers:
            notify_warning("choose the organs' label map to go to an organ")
            return False
        index = organ_focus(np.asarray(layer.data), int(organ), slice_axis(self._viewer))
        if index is None:
            notify_warning(f"label {organ} is not in '{layer.name}'")
            return False
        jump_to(self._viewer, layer.data_to_world(index))
        layer.selected_label = int(organ)
        self.status.setText(f"organ {organ}: its largest slice, {index[slice_axis(self._viewer)]}")
        return True

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
