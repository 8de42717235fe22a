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
from qtpy.QtCore import QTimer

from napari_dagman._widgets.common import (
    JobDock,
    JobRunner,
    bind_encoder_chooser,
    last_run,
    layer_label_names,
    notify_info,
    notify_warning,
    path_text,
    stop_jobs_with,
    viewer_camera,
    volume_from_layer,
)
from napari_dagman._widgets.explorer.actions import ExplorerActions
from napari_dagman._widgets.explorer.controls import (
    explorer_controls,
)
from napari_dagman._widgets.explorer.layers import (
    DIFFERENCE_LAYER,
    DROPPED_LAYER,
    HEADS_LAYER,
    MASK_LAYER,
    MEAN_LAYER,
    PICTURE_LAYER,
    ExplorerLayers,
)
from napari_dagman._widgets.explorer.view import ExplorerView
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


class AttentionWidget(ExplorerView, ExplorerActions, JobDock):
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
        # the run's own encoder names (a Swin's: the others have no attention)
        self.refresh_encoders = bind_encoder_chooser(self.which, self.run, swin_only=True)
        self.run.changed.connect(lambda *_: self.honour_run())
        self.honour_run()

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

    def honour_run(self) -> None:
        """Offer only the mask controls the chosen run has: a method that hides no cells (MiM, CASS) has no mask of
        its own to preview, and the teacher noise means nothing for a run without a teacher."""
        from napari_dagman.core.errors import CheckpointError
        from napari_dagman.core.runs import published

        try:
            offers = published(path_text(self.run)) if path_text(self.run) else None
        except CheckpointError:
            offers = None
        cell_masks = offers is None or offers.cell_masks
        choices = (
            [("this run's", "run"), ("every strategy", "all")]
            if cell_masks
            else [("none (this run masks no cells)", "run")]
        )
        # a callable: napari's reset_choices() on a layer change would put back the constructor's list
        self.strategies.choices = lambda *_: choices
        self.strategies.value = self.strategies.value if cell_masks else "run"
        self.strategies.enabled = cell_masks
        self.strategies.tooltip = (
            "the mask this run draws, or every strategy's beside it for comparison"
            if cell_masks
            else f"{offers.method} hides no cells of a crop: there is no cell mask to preview"
        )
        has_teacher = offers is None or offers.has_teacher
        self.noise_rate.enabled = has_teacher
        self.noise_rate.tooltip = (
            "input dropout of the noisy-teacher preview (empty: the run's own; 0.2 for a clean teacher shown under "
            "'every strategy')"
            if has_teacher
            else f"{offers.method} trains no teacher: there is no noisy-teacher preview"
        )

    def use_last_run(self) -> None:
        last = last_run()
        if not last:
            notify_warning("no run trained from the pretraining dock yet")
            return
        self.set_run(last)

    @staticmethod
    def _run_folder(edit: FileEdit, required: bool = True) -> str | None:
        """A chosen run folder, checked cheaply here so that a wrong folder is reported at once."""
        from napari_dagman._widgets.common import checked_run

        path = path_text(edit)
        if not path:
            if required:
                raise DagmanInputError("choose a run folder (a pretraining run), or train one first")
            return None
        checked_run(path, "pretrain")  # raises a one-line error for other folders and other kinds of run
        return path

    def _labels_volume(self) -> Volume | None:
        from napari_dagman._widgets.common.jobs import picklable_volume

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

    def compute_around(self, world: Any, image: Any = None) -> bool:
        """Maps and masks of a crop centred on a world point (the classification dock's "attention here")."""
        self.scope.value = "crop"
        return self._start(maps=True, image=image, point=np.asarray(world, dtype=float)[-3:])

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
        from napari_dagman._widgets.common.jobs import picklable_volume
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
