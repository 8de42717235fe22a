"""Pieces every dock shares: device list, layer pickers, a live curve plot, a job runner, layer helpers.

Thin on purpose: no science here. Heavy libraries (torch) are imported inside functions so napari starts fast.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox
from qtpy.QtCore import QSettings, QTimer
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari

    from napari_dagman.core.volume import Volume


# --- notifications --------------------------------------------------------------------------------------------
def notify_error(err: BaseException | str) -> None:
    """One-line error notification: the message of a user error, the type and message of anything else."""
    from napari.utils.notifications import show_error

    if isinstance(err, str):
        show_error(err)
    elif isinstance(err, DagmanError):
        show_error(str(err))
    else:
        # a bug, not a user error: keep the notification short, the traceback goes to the console
        traceback.print_exception(type(err), err, err.__traceback__)
        show_error(f"Unexpected error ({type(err).__name__}): {err}")


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


# --- settings ---------------------------------------------------------------------------------------------------
class Settings:
    """Values remembered between napari sessions (last device, output folder...).

    Stored with QSettings; ``NAPARI_DAGMAN_SETTINGS`` (an .ini path) redirects them, which tests use so they
    never touch a user's settings.
    """

    def __init__(self, group: str) -> None:
        path = os.environ.get("NAPARI_DAGMAN_SETTINGS")
        self._qs = QSettings(path, QSettings.Format.IniFormat) if path else QSettings("napari-dagman", "napari-dagman")
        self._group = group

    def get(self, key: str, default: Any = None) -> Any:
        value = self._qs.value(f"{self._group}/{key}", default)
        return default if value is None else value

    def set(self, key: str, value: Any) -> None:
        self._qs.setValue(f"{self._group}/{key}", value)
        self._qs.sync()


# --- pickers ----------------------------------------------------------------------------------------------------
class DeviceComboBox(ComboBox):
    """The devices that are really there: auto, each CUDA GPU with its name and free memory, mps, cpu."""

    def __init__(self, label: str = "device", value: str | None = None, **kwargs: Any) -> None:
        super().__init__(label=label, choices=self._choices, **kwargs)
        self.tooltip = "auto picks cuda > mps > cpu; GPUs are listed with their free memory"
        if value is not None:
            self.select(value)

    @staticmethod
    def _choices(_widget: Any = None) -> list[tuple[str, str]]:
        from napari_dagman.core.devices import available_devices

        return [(d.label, d.name) for d in available_devices()]

    def select(self, name: str) -> None:
        """Select a device by name when it is still available (a remembered GPU may be gone)."""
        if name in [v for _, v in self._choices()]:
            self.value = name


def layer_combo(viewer: napari.viewer.Viewer, layer_type: type, label: str, *, nullable: bool = False,
                tooltip: str = "") -> ComboBox:
    """A ComboBox of the viewer's layers of one type that follows layers being added, removed or renamed."""

    def choices(_widget: Any = None) -> list:
        return [layer for layer in viewer.layers if isinstance(layer, layer_type)]

    combo = ComboBox(label=label, choices=choices, nullable=nullable, tooltip=tooltip)
    for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
        event.connect(combo.reset_choices)
    return combo


# --- layers <-> volumes --------------------------------------------------------------------------------------------
def volume_from_layer(layer: Any, kind: str = "image") -> Volume:
    """A `Volume` (with the layer's physical placement) from a 3D Image (``kind="image"``) or Labels layer."""
    import napari

    from napari_dagman.core.volume import Volume

    if layer is None:
        raise DagmanInputError(f"no {kind} layer chosen")
    expected = napari.layers.Image if kind == "image" else napari.layers.Labels
    if not isinstance(layer, expected):
        raise DagmanInputError(f"'{layer.name}' is a {type(layer).__name__} layer, not an {kind} layer")
    if getattr(layer, "multiscale", False):
        raise DagmanInputError(f"'{layer.name}' is multiscale; open it as a single-resolution volume")
    if getattr(layer, "rgb", False):
        raise DagmanInputError(f"'{layer.name}' is an RGB image; a CT has one grey value per voxel")
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise DagmanInputError(f"'{layer.name}' is {data.ndim}D (shape {data.shape}); a CT volume is 3D (z, y, x)")
    meta = dict(layer.metadata)
    meta.setdefault("name", layer.name)
    return Volume.from_layer_data(data, scale=layer.scale, translate=layer.translate, metadata=meta)


def upsert_layer(viewer: napari.viewer.Viewer, name: str, data: Any, layer_type: str, **kwargs: Any) -> Any:
    """Update the layer called ``name`` in place (data, placement, properties) or add it once.

    Previews call this on every update, so a run adds one layer per kind, never a new layer per step.
    """
    existing = viewer.layers[name] if name in viewer.layers else None
    if existing is not None and existing._type_string == layer_type and np.ndim(existing.data) == np.ndim(data):
        for key in ("scale", "translate"):
            if key in kwargs:
                setattr(existing, key, kwargs[key])
        existing.data = data
        for key, value in kwargs.items():
            if key in ("scale", "translate", "name"):
                continue
            try:
                setattr(existing, key, value)
            except (AttributeError, TypeError, ValueError):
                pass  # constructor-only options (e.g. rgb) cannot change after creation
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    return getattr(viewer, f"add_{layer_type}")(data, name=name, **kwargs)


def jump_to(viewer: napari.viewer.Viewer, world_point: Any, *, zoom: float | None = None) -> None:
    """Show ``world_point`` (z, y, x world mm): slider of the non-displayed axes on it, camera centred on it."""
    point = np.asarray(world_point, dtype=float)
    ndim = viewer.dims.ndim
    if point.shape[0] < ndim:  # layers with extra leading axes (e.g. heads): keep their sliders
        point = np.concatenate([np.asarray(viewer.dims.point[: ndim - point.shape[0]]), point])
    point = point[-ndim:]
    for axis in viewer.dims.not_displayed:
        viewer.dims.set_point(axis, point[axis])
    viewer.camera.center = tuple(point[list(viewer.dims.displayed)])
    if zoom is not None:
        viewer.camera.zoom = zoom


# --- a live curve plot ------------------------------------------------------------------------------------------
class LossPlot(QWidget):
    """Curves that grow while a job runs (loss terms, validation Dice), redrawn at most ~4 times a second."""

    def __init__(self, title: str = "", ylabel: str = "", *, log_y: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        self.figure.patch.set_facecolor("#262930")  # napari's dark theme background
        self.axes = self.figure.add_subplot(111)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(180)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._title, self._ylabel, self._log_y = title, ylabel, log_y
        self._series: dict[str, tuple[list[float], list[float]]] = {}
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self._redraw_if_dirty)
        self._timer.start()
        self._style()

    def _style(self) -> None:
        ax = self.axes
        ax.set_facecolor("#262930")
        for spine in ax.spines.values():
            spine.set_color("#8f9294")
        ax.tick_params(colors="#d0d0d0", labelsize=8)
        ax.set_title(self._title, color="#e0e0e0", fontsize=9)
        ax.set_xlabel("step", color="#d0d0d0", fontsize=8)
        ax.set_ylabel(self._ylabel, color="#d0d0d0", fontsize=8)
        if self._log_y:
            ax.set_yscale("log")

    def add_point(self, series: str, step: float, value: float) -> None:
        if not np.isfinite(value):
            return
        xs, ys = self._series.setdefault(series, ([], []))
        xs.append(float(step))
        ys.append(float(value))
        self._dirty = True

    def series(self, name: str) -> tuple[list[float], list[float]]:
        return self._series.get(name, ([], []))

    def clear(self) -> None:
        self._series.clear()
        self._dirty = True
        self.redraw()

    def _redraw_if_dirty(self) -> None:
        if self._dirty:
            self.redraw()

    def redraw(self) -> None:
        self._dirty = False
        ax = self.axes
        ax.clear()
        self._style()
        for name, (xs, ys) in self._series.items():
            ax.plot(xs, ys, label=name, linewidth=1.2)
        if self._series:
            legend = ax.legend(fontsize=7, facecolor="#262930", edgecolor="#8f9294", labelcolor="#d0d0d0")
            legend.set_draggable(True)
        self.canvas.draw_idle()

    def save_png(self, path: str) -> None:
        self.redraw()
        self.figure.savefig(path, dpi=150, facecolor=self.figure.get_facecolor())


# --- running a core job in the background -------------------------------------------------------------------------
class JobRunner:
    """Runs a core job generator in a worker thread; its events arrive in the main thread.

    ``start(factory)`` calls ``factory(cancel_token)`` in the worker thread and iterates the generator it
    returns. ``cancel()`` sets the token, so the job stops at its next step boundary and finishes cleanly
    (pretraining saves a checkpoint first). Progress shows in napari's activity dock. Errors arrive once, as a
    one-line notification, and through ``on_error``.
    """

    def __init__(
        self,
        on_event: Callable[[Any], None],
        *,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_stopped: Callable[[], None] | None = None,
        description: str = "napari-dagman",
    ) -> None:
        self.on_event, self.on_done, self.on_error, self.on_stopped = on_event, on_done, on_error, on_stopped
        self.description = description
        self.worker = None
        self.token = None
        self._progress = None
        self.events_seen = 0
        self.last_error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None and self.worker.is_running

    def start(self, factory: Callable[[Any], Generator[Any, None, Any]]) -> None:
        from qtpy.QtWidgets import QApplication
        from superqt.utils import GeneratorWorker

        from napari_dagman.core.events import CancelToken

        if self.running:
            raise DagmanInputError("a job is already running; cancel it first")
        self.token = CancelToken()
        token = self.token

        def work() -> Generator[Any, None, Any]:
            result = yield from factory(token)
            return result

        # superqt's worker (not napari's notifying one): errors are reported once, as one line, by us
        worker = GeneratorWorker(work)
        worker.yielded.connect(self._on_yield)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.events_seen = 0
        self.last_error = None
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.cancel)
        worker.start()

    def cancel(self) -> None:
        """Ask the job to stop at its next step (it saves what it has, then finishes)."""
        if self.token is not None:
            self.token.cancel()
        if self.worker is not None and getattr(self.worker, "is_paused", False):
            self.worker.resume()

    def pause(self) -> None:
        if self.running:
            self.worker.pause()

    def resume(self) -> None:
        if self.worker is not None:
            self.worker.resume()

    @property
    def paused(self) -> bool:
        return bool(self.worker is not None and self.worker.is_paused)

    def wait(self, timeout: float = 30.0) -> bool:
        """Process Qt events until the job ends (tests and shutdown); True when it ended in time."""
        from qtpy.QtWidgets import QApplication

        end = time.monotonic() + timeout
        while self.worker is not None and time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.01)
        QApplication.processEvents()
        return self.worker is None

    # main-thread slots -------------------------------------------------------------------------------------------
    def _on_yield(self, event: Any) -> None:
        self.events_seen += 1
        self._update_progress(event)
        try:
            self.on_event(event)
        except Exception as err:  # a drawing problem must not kill the job silently
            notify_error(err)

    def _update_progress(self, event: Any) -> None:
        from napari_dagman.core.events import ProgressEvent, StepEvent

        if isinstance(event, StepEvent):
            done, total = event.step, event.total_steps
        elif isinstance(event, ProgressEvent):
            done, total = event.done, event.total
        else:
            return
        try:
            from napari.utils import progress
        except ImportError:  # pragma: no cover
            return
        if self._progress is None or self._progress.total != total:
            if self._progress is not None:
                self._progress.close()
            self._progress = progress(total=total, desc=self.description)
        self._progress.n = done
        self._progress.refresh()

    def _on_returned(self, value: Any) -> None:
        if self.on_done is not None:
            self.on_done(value)

    def _on_errored(self, err: BaseException) -> None:
        self.last_error = err
        notify_error(err)
        if self.on_error is not None:
            self.on_error(err)

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        if self.on_stopped is not None:
            self.on_stopped()
