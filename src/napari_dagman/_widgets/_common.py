"""Pieces every dock shares: device list, layer pickers, a live curve plot, a job runner and a dock that owns
one, layer helpers.

Thin on purpose: no science here. Heavy libraries (torch) are imported inside functions so napari starts fast.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from magicgui.widgets import ComboBox, Select
from qtpy.QtCore import QEvent, QObject, QSettings
from qtpy.QtWidgets import QLabel, QWidget

from napari_dagman._widgets._subprocess import DEFAULT_NICE
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


def notify_info(message: str, actions: Sequence[tuple[str, Callable[..., Any]]] = ()) -> None:
    """An info notification; ``actions`` are (button text, callback) pairs shown on the notification."""
    from napari.utils.notifications import Notification, NotificationSeverity, notification_manager

    notification_manager.dispatch(Notification(message, severity=NotificationSeverity.INFO, actions=actions))


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
        self._qs = (
            QSettings(path, QSettings.Format.IniFormat)
            if path
            else QSettings("napari-dagman", "napari-dagman")
        )
        self._group = group

    def get(self, key: str, default: Any = None) -> Any:
        value = self._qs.value(f"{self._group}/{key}", default)
        return default if value is None else value

    def set(self, key: str, value: Any) -> None:
        self._qs.setValue(f"{self._group}/{key}", value)
        self._qs.sync()


# --- pickers ----------------------------------------------------------------------------------------------------
def path_text(edit: Any) -> str:
    """The path typed in a magicgui FileEdit; "" when it is empty (an emptied FileEdit can read ".")."""
    value = edit.line_edit.value.strip()
    return "" if value in ("", ".") else value


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


#: ``layer.metadata`` key that marks the layers the docks draw (previews, maps, masks): never offered as inputs.
OUTPUT_KEY = "dagman_output"


def is_output_layer(layer: Any) -> bool:
    """True for a layer a napari-dagman dock made (a preview, an attention map, a mask)."""
    return bool(getattr(layer, "metadata", {}).get(OUTPUT_KEY))


def _layer_choices(
    viewer: napari.viewer.Viewer, layer_type: type, where: Callable[[Any], bool] | None
) -> Callable[[Any], list]:
    def choices(_widget: Any = None) -> list:
        return [
            layer
            for layer in viewer.layers
            if isinstance(layer, layer_type) and (where is None or where(layer))
        ]

    return choices


def _follow_layers(viewer: napari.viewer.Viewer, widget: Any) -> None:
    for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
        event.connect(widget.reset_choices)


def layer_combo(
    viewer: napari.viewer.Viewer,
    layer_type: type,
    label: str,
    *,
    nullable: bool = False,
    tooltip: str = "",
    where: Callable[[Any], bool] | None = None,
) -> ComboBox:
    """A ComboBox of the viewer's layers of one type that follows layers being added, removed or moved.

    ``where`` filters further (e.g. ``lambda layer: not is_output_layer(layer)``).
    """
    combo = ComboBox(
        label=label, choices=_layer_choices(viewer, layer_type, where), nullable=nullable, tooltip=tooltip
    )
    _follow_layers(viewer, combo)
    return combo


def layer_picker(
    viewer: napari.viewer.Viewer,
    kind: str = "image",
    label: str | None = None,
    *,
    tooltip: str = "",
    inputs_only: bool = True,
) -> ComboBox:
    """A `layer_combo` of the viewer's Image (``kind="image"``) or Labels layers; a labels picker may be left
    empty. ``inputs_only`` leaves out the layers the docks drew (previews, maps, predictions)."""
    import napari

    return layer_combo(
        viewer,
        napari.layers.Image if kind == "image" else napari.layers.Labels,
        label or kind,
        nullable=kind != "image",
        tooltip=tooltip,
        where=(lambda layer: not is_output_layer(layer)) if inputs_only else None,
    )


def layer_select(
    viewer: napari.viewer.Viewer,
    layer_type: type,
    label: str,
    *,
    tooltip: str = "",
    where: Callable[[Any], bool] | None = None,
) -> Select:
    """Like `layer_combo`, for choosing several layers at once (a list with multi-selection)."""
    select = Select(label=label, choices=_layer_choices(viewer, layer_type, where), tooltip=tooltip)
    _follow_layers(viewer, select)
    return select


# --- layers <-> volumes --------------------------------------------------------------------------------------------
def volume_from_layer(layer: Any, kind: str = "image") -> Volume:
    """A `Volume` (with the layer's physical placement) from a 3D Image (``kind="image"``) or Labels layer."""
    import napari
    from napari_dagman.core.volume import Volume

    if layer is None:
        raise DagmanInputError(f"no {kind} layer chosen")
    expected = napari.layers.Image if kind == "image" else napari.layers.Labels
    if not isinstance(layer, expected):
        article = "an" if kind == "image" else "a"
        raise DagmanInputError(
            f"'{layer.name}' is a {type(layer).__name__} layer, not {article} {kind} layer"
        )
    if getattr(layer, "multiscale", False):
        raise DagmanInputError(f"'{layer.name}' is multiscale; open it as a single-resolution volume")
    if getattr(layer, "rgb", False):
        raise DagmanInputError(f"'{layer.name}' is an RGB image; a CT has one grey value per voxel")
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise DagmanInputError(
            f"'{layer.name}' is {data.ndim}D (shape {data.shape}); a CT volume is 3D (z, y, x)"
        )
    meta = dict(layer.metadata)
    meta.setdefault("name", layer.name)
    if kind == "labels" and not meta.get("label_names"):
        meta_names = label_names_from_features(getattr(layer, "features", None))
        if meta_names:
            meta["label_names"] = meta_names
    return Volume.from_layer_data(data, scale=layer.scale, translate=layer.translate, metadata=meta)


def label_names_from_features(features: Any) -> dict[int, str]:
    """Id -> organ name from a Labels layer's ``features`` (``index`` and ``name`` columns), else empty.

    Labels made outside this plugin (painted, or added by another plugin with a features table) keep their names.
    """
    if features is None or not {"index", "name"} <= set(getattr(features, "columns", ())):
        return {}
    return {
        int(i): str(n)
        for i, n in zip(features["index"], features["name"], strict=True)
        if int(i) != 0 and isinstance(n, str) and n
    }


def layer_label_names(layer: Any) -> dict[int, str]:
    """Id -> name of the organs present in a Labels layer: its features table, else metadata, else defaults."""
    from napari_dagman.core.labels import names_in

    names = label_names_from_features(getattr(layer, "features", None))
    if not names and layer.metadata.get("label_names"):
        names = {int(k): str(v) for k, v in layer.metadata["label_names"].items()}
    return names_in(np.asarray(layer.data), names)


def _differs(current: Any, value: Any) -> bool:
    """True unless ``value`` is plainly equal to a layer's ``current`` property (numbers compared as arrays)."""
    try:
        a, b = np.asarray(current, dtype=float), np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        try:
            return bool(current != value)
        except Exception:  # e.g. colormaps that do not compare: set them again
            return True
    return a.shape != b.shape or not np.allclose(a, b)


def upsert_layer(viewer: napari.viewer.Viewer, name: str, data: Any, layer_type: str, **kwargs: Any) -> Any:
    """Update the layer called ``name`` in place (data, placement, properties) or add it once.

    Previews call this on every update, so a run adds one layer per kind, never a new layer per step.
    """
    import napari

    existing = next((layer for layer in viewer.layers if layer.name == name), None)
    # isinstance, not the private _type_string: plugin docks get layers behind napari's public-only proxy
    kind = getattr(napari.layers, layer_type.capitalize())
    if existing is not None and isinstance(existing, kind) and np.ndim(existing.data) == np.ndim(data):
        # every property set re-slices and redraws the layer in the GUI thread: set only what changed
        for key in ("scale", "translate"):
            if key in kwargs and _differs(getattr(existing, key), kwargs[key]):
                setattr(existing, key, kwargs[key])
        existing.data = data
        for key, value in kwargs.items():
            if key in ("scale", "translate", "name"):
                continue
            # constructor-only options (e.g. rgb) cannot change after creation
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                if _differs(getattr(existing, key), value):
                    setattr(existing, key, value)
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    # napari selects a new layer; a preview appearing must not take the user's selection (their CT) away
    active = viewer.layers.selection.active
    layer = getattr(viewer, f"add_{layer_type}")(data, name=name, **kwargs)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer


def cells_on_voxels(
    mask: np.ndarray, cell_scale: Sequence[float], voxel_scale: Sequence[float]
) -> np.ndarray:
    """A mask on a coarse grid (mask cells, tokens) repeated onto the voxel grid it covers.

    Shown with the voxels' scale and the crop's translate, it overlays exactly where the coarse one would
    (see `core.volume.grid_placement`); napari draws Labels outlines in data pixels, so only this form can be
    shown as contours of the hidden region.
    """
    factors = tuple(max(1, int(round(c / v))) for c, v in zip(cell_scale, voxel_scale, strict=True))
    return np.kron(mask, np.ones(factors, dtype=mask.dtype))


def jump_to(
    viewer: napari.viewer.Viewer, world_point: Any, *, zoom: float | None = None, center_camera: bool = True
) -> None:
    """Show ``world_point`` (z, y, x world mm): slider of the non-displayed axes on it, camera centred on it.

    ``center_camera=False`` only moves the sliders (e.g. to follow a live preview without panning the view).
    """
    point = np.asarray(world_point, dtype=float)
    ndim = viewer.dims.ndim
    if point.shape[0] < ndim:  # layers with extra leading axes (e.g. heads): keep their sliders
        point = np.concatenate([np.asarray(viewer.dims.point[: ndim - point.shape[0]]), point])
    point = point[-ndim:]
    for axis in viewer.dims.not_displayed:
        viewer.dims.set_point(axis, point[axis])
    if center_camera:
        viewer.camera.center = tuple(point[list(viewer.dims.displayed)])
    if zoom is not None:
        viewer.camera.zoom = zoom


# --- running a core job in the background -------------------------------------------------------------------------
class JobRunner:
    """Runs a core job generator in the background; its events arrive in the main thread.

    ``start(factory)`` calls ``factory(cancel_token)`` in a worker thread and iterates the generator it
    returns. ``start_in_process(target, *args)`` runs ``target(*args, cancel=token)`` in a child process
    instead (see `_subprocess`): the choice for long CPU/GPU work such as pretraining, because a thread
    competes with the GUI for the GIL and the cores. Either way, ``cancel()`` sets the token, so the job stops
    at its next step boundary and finishes cleanly (pretraining saves a checkpoint first); ``pause()`` holds
    it between steps. Progress shows in napari's activity dock. Errors arrive once, as a one-line
    notification, and through ``on_error``. Quitting napari stops a running job cleanly (it is cancelled and
    waited for); a dock makes closing itself do the same with `stop_jobs_with`. ``viewer`` is accepted and
    not used (napari's task-status API is private): callers of the first version keep working.
    """

    def __init__(
        self,
        on_event: Callable[[Any], None],
        *,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_stopped: Callable[[], None] | None = None,
        description: str = "napari-dagman",
        viewer: napari.viewer.Viewer | None = None,
    ) -> None:
        self.on_event, self.on_done, self.on_error, self.on_stopped = on_event, on_done, on_error, on_stopped
        self.description = description
        self.worker = None
        self.token = None
        self.process_job: Any = None
        self._progress = None
        self._quit_hooked = False
        self.events_seen = 0
        self.last_error: BaseException | None = None
        self._delivery: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._delivering = False

    @property
    def running(self) -> bool:
        """True from `start` until the job has finished and its last event was delivered."""
        return self.worker is not None

    def start(self, factory: Callable[[Any], Generator[Any, None, Any]]) -> None:
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
        worker.yielded.connect(partial(self._deliver, self._on_yield))
        worker.returned.connect(partial(self._deliver, self._on_returned))
        worker.errored.connect(partial(self._deliver, self._on_errored))
        worker.finished.connect(partial(self._deliver, self._on_finished))
        self.worker = worker
        self.events_seen = 0
        self.last_error = None
        self._hook_shutdown()
        worker.start()

    def start_in_process(
        self, target: Callable[..., Generator[Any, None, Any]], *args: Any, **kwargs: Any
    ) -> None:
        """Run ``target(*args, cancel=token, **kwargs)`` in a child process (a module-level generator function).

        Arguments are pickled into the child; ``nice`` and ``grace_s`` are passed to `ChildProcessJob`.
        """
        from napari_dagman._widgets._subprocess import ChildProcessJob

        if self.running:
            raise DagmanInputError("a job is already running; cancel it first")
        job = ChildProcessJob(target, *args, **kwargs)
        self.process_job = job
        self.start(job.events)

    def cancel(self) -> None:
        """Ask the job to stop at its next step (it saves what it has, then finishes)."""
        if self.token is not None:
            self.token.cancel()
        if self.process_job is not None:
            self.process_job.cancel()  # at once, not at the relay's next poll; also un-pauses the child
        if self.worker is not None and getattr(self.worker, "is_paused", False):
            self.worker.resume()

    def pause(self) -> None:
        """Hold the job at its next step boundary (a child process waits; a thread sleeps)."""
        if not self.running:
            return
        if self.process_job is not None:
            self.process_job.pause()
        else:
            self.worker.pause()

    def resume(self) -> None:
        if self.process_job is not None:
            self.process_job.resume()
        elif self.worker is not None:
            self.worker.resume()

    @property
    def paused(self) -> bool:
        if self.process_job is not None:
            return self.process_job.paused
        return bool(self.worker is not None and self.worker.is_paused)

    def wait(self, timeout: float = 30.0) -> bool:
        """Process Qt events until the job ends (tests and shutdown); True when it ended in time."""
        from qtpy.QtWidgets import QApplication

        end = time.monotonic() + timeout
        while self.worker is not None and time.monotonic() < end:
            QApplication.processEvents()
            self._drain()  # called from inside a delivered callback, the outer loop cannot run them
            time.sleep(0.01)
        QApplication.processEvents()
        self._drain()
        return self.worker is None

    def stop(self, timeout: float = 60.0) -> bool:
        """Cancel and wait up to ``timeout`` s for a clean end; a child process still running is then killed.

        For closing a dock or napari. Returns True when the job ended by itself (its checkpoint saved).
        """
        if self.worker is None:
            return True
        self.cancel()
        if self.wait(timeout):
            return True
        if self.process_job is not None:
            self.process_job.terminate()  # the relay then sees the child gone and finishes
            return self.wait(10.0) and False
        return False

    def detach(self) -> None:
        """Stop delivering events (the dock that drew them is gone); the job itself is not touched."""
        self.on_event = lambda _event: None
        self.on_done = self.on_error = self.on_stopped = None

    def _hook_shutdown(self) -> None:
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None and not self._quit_hooked:
            app.aboutToQuit.connect(self.stop)  # napari quitting: let the job save and end first
            self._quit_hooked = True

    # main-thread slots -------------------------------------------------------------------------------------------
    def _deliver(self, slot: Callable[..., None], *args: Any) -> None:
        """Run the worker's signals one at a time, in the order it sent them.

        Drawing an event can re-enter Qt's event loop (napari's activity-dock progress bar does on its first
        update); a later event delivered there would be drawn before the one in hand (the loss curve got step 2
        before step 1). Signals that arrive meanwhile wait in a queue that the outermost delivery empties.
        """
        self._delivery.append((slot, args))
        if not self._delivering:
            self._drain()

    def _drain(self) -> None:
        outer, self._delivering = self._delivering, True
        try:
            while self._delivery:
                slot, args = self._delivery.popleft()
                try:
                    slot(*args)
                except Exception as err:  # a failing callback must not hold back the ones queued after it
                    notify_error(err)
        finally:
            self._delivering = outer

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
        if isinstance(event, StepEvent) and np.isfinite(event.loss):
            self._progress.set_description(f"{self.description} (loss {event.loss:.4g})")
        self._progress.n = done
        self._progress.refresh()

    def _on_returned(self, value: Any) -> None:
        if self.on_done is not None:
            self.on_done(value)

    def _on_errored(self, err: BaseException) -> None:
        from napari_dagman.core.events import JobCancelled

        if isinstance(err, JobCancelled):  # the user asked for it: not an error
            return
        self.last_error = err
        notify_error(err)
        if self.on_error is not None:
            self.on_error(err)

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        self.process_job = None
        if self.on_stopped is not None:
            self.on_stopped()


def _abandon(runners: tuple[JobRunner, ...], *_: Any) -> None:
    for runner in runners:
        runner.detach()
        runner.cancel()


class _JobGuard(QObject):
    """Stops a dock's jobs when the dock is closed (napari unparents its widget) or the widget is deleted."""

    def __init__(self, widget: QWidget, runners: tuple[JobRunner, ...], timeout: float) -> None:
        super().__init__(widget)
        self._runners, self._timeout = runners, timeout
        widget.installEventFilter(self)
        # napari deletes the docks with its window: cancel (the job saves and ends by itself), draw nothing more
        widget.destroyed.connect(partial(_abandon, runners))

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
            for runner in self._runners:
                if runner.running:
                    runner.stop(self._timeout)
        return False


def stop_jobs_with(widget: QWidget, *runners: JobRunner, timeout: float = 60.0) -> None:
    """Tie ``runners`` to a dock ``widget``: closing the dock stops them cleanly (cancel, wait up to
    ``timeout`` s, then end a child process); deleting the widget (napari's window closed) cancels them."""
    _JobGuard(widget, tuple(runners), timeout)


# --- docks ------------------------------------------------------------------------------------------------------
#: Where the pretraining dock remembers the run folder it trained (or resumed) last.
LAST_RUN_GROUP, LAST_RUN_KEY = "runs", "last_run"


def last_run() -> str:
    """The run folder last trained (or resumed) in the pretraining dock ("" when none): the attention explorer
    and the fine-tuning dock start from it."""
    return str(Settings(LAST_RUN_GROUP).get(LAST_RUN_KEY, "") or "")


def remember_last_run(run_dir: str) -> None:
    Settings(LAST_RUN_GROUP).set(LAST_RUN_KEY, run_dir)


class JobDock(QWidget):
    """A dock with remembered settings and one background job whose events it draws: the one cancel contract.

    The runner calls the dock's ``_on_event``, ``_on_done``, ``_on_error`` and ``_on_stopped`` in the main
    thread; a subclass overrides the ones it needs. A dock starts its job with `_launch` (a thread or a child
    process) from its `start`; `cancel` asks the job to stop at its next step (it saves what it has and ends),
    `start_or_cancel` is what a Start button that reads "Cancel" while running calls, and closing the dock stops
    the job the same way (`stop_jobs_with`). While a job runs, the dock's forms (``_forms``) and start buttons
    (``_start_buttons``) are disabled and its cancel buttons (``_cancel_buttons``) enabled; ``_toggle`` is a
    (button, idle text) pair whose text becomes "Cancel".
    """

    #: The dock's kind of job, as in "a prediction is already running".
    run_kind: ClassVar[str] = "job"
    #: The status line while a cancel is under way.
    cancelling_text: ClassVar[str] = "cancelling: finishing the current step..."

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, settings_group: str, description: str) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._settings = Settings(settings_group)
        self._runner = JobRunner(
            self._on_event,
            on_done=self._on_done,
            on_error=self._on_error,
            on_stopped=self._on_stopped,
            description=description,
            viewer=napari_viewer,
        )
        #: Unix nice value of a job run in a child process (0 = same priority as napari); see docs/pretraining.md
        self.process_nice = DEFAULT_NICE
        self._forms: list[Any] = []
        self._start_buttons: list[Any] = []
        self._cancel_buttons: list[Any] = []
        self._toggle: tuple[Any, str] | None = None
        self._cancel_requested_at: float | None = None  # while set, "cancelling..." stays on the status line
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        stop_jobs_with(self, self._runner)  # closing the dock stops its job cleanly (a run saves first)

    def _expose(self, form: Any, names: Sequence[str]) -> None:
        """Make some of a form's widgets attributes of the dock (the names scripts and tests use)."""
        for name in names:
            setattr(self, name, form[name])

    @property
    def runner(self) -> JobRunner:
        """The dock's job runner (scripts and tests wait on it)."""
        return self._runner

    @property
    def running(self) -> bool:
        """True from the job's start until its last event has been drawn."""
        return self._runner.running

    # --- start / cancel -----------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the dock's job from its form; bad input gives a notification. True when a job started."""
        raise NotImplementedError

    def start_or_cancel(self) -> None:
        if self._runner.running:
            self.cancel()
        else:
            self.start()

    def _busy(self) -> bool:
        """True (with a warning) when a job is already running."""
        if self._runner.running:
            notify_warning(f"a {self.run_kind} is already running; cancel it first")
            return True
        return False

    def _launch(
        self,
        job: Callable[..., Generator[Any, None, Any]],
        *args: Any,
        in_process: bool = False,
        status: str = "",
        **kwargs: Any,
    ) -> None:
        """Run ``job(*args, cancel=token, **kwargs)`` in a worker thread or, ``in_process``, a child process."""
        if in_process:
            self._runner.start_in_process(job, *args, nice=self.process_nice, **kwargs)
        else:
            self._runner.start(lambda token: job(*args, cancel=token, **kwargs))
        self._started(status)

    def _started(self, status: str = "") -> None:
        """The dock's state once its runner has started a job: running, with ``status`` on the status line."""
        self._cancel_requested_at = None
        self._set_running(True)
        if status:
            self.status.setText(status)

    def cancel(self, _value: Any = None) -> None:
        """Ask the job to stop at the end of its current step (a training run saves a checkpoint first)."""
        if not self._runner.running:
            return
        self._cancel_requested_at = time.monotonic()
        self._runner.cancel()
        for button in self._cancel_buttons + ([self._toggle[0]] if self._toggle else []):
            set_enabled(button, False)
        self.status.setText(self.cancelling_text)

    def wait(self, timeout: float = 600.0) -> bool:
        """Process events until the job ends (tests and scripts)."""
        return self._runner.wait(timeout)

    def _set_running(self, running: bool) -> None:
        for form in self._forms:
            form.enabled = not running
        for button in self._start_buttons:
            set_enabled(button, not running)
        for button in self._cancel_buttons:
            set_enabled(button, running)
        if self._toggle is not None:
            button, idle_text = self._toggle
            button.setText("Cancel" if running else idle_text)
            button.setEnabled(True)

    # --- the runner's callbacks (main thread) -------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        """An event the job yielded."""

    def _on_done(self, result: Any) -> None:
        """The job's return value (None or a partial result when it was cancelled)."""

    def _on_error(self, err: BaseException) -> None:
        """The job failed; the runner has already shown the notification, the status line keeps the reason."""
        text = str(err).strip()
        self.status.setText(f"failed: {text.splitlines()[0] if text else type(err).__name__}")

    def _on_stopped(self) -> None:
        """The job ended, whatever the way: the dock goes back to idle."""
        if self._cancel_requested_at is not None and self.status.text() == self.cancelling_text:
            self.status.setText("cancelled")
        self._set_running(False)
        self._cancel_requested_at = None


def set_enabled(button: Any, enabled: bool) -> None:
    """Enable a Qt or a magicgui button."""
    if hasattr(button, "setEnabled"):
        button.setEnabled(enabled)
    else:
        button.enabled = enabled
