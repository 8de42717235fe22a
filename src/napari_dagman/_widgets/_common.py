"""Pieces every dock shares: device list, layer pickers that start from what is open, layer helpers, and
`JobDock`, the base of every dock that runs a job (one cancel contract, a scrolling body, tabs for docks that
belong together, bad input as one line in the dock's own words).

Thin on purpose: no science here. Heavy libraries (torch) are imported inside functions so napari starts fast.
The job runner lives in `_runner`, the notifications in `_notify`; both are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from magicgui.widgets import ComboBox, Select
from qtpy.QtCore import QEvent, QSettings, QSize, Qt
from qtpy.QtWidgets import (
    QDockWidget,
    QFrame,
    QLabel,
    QMainWindow,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_dagman._widgets._notify import (
    guard_notification_timers,
    notify_error,
    notify_info,
    notify_warning,
)
from napari_dagman._widgets._runner import JobRunner, stop_jobs_with
from napari_dagman._widgets._subprocess import DEFAULT_NICE
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.volume import Volume

__all__ = [
    "OUTPUT_KEY", "DeviceComboBox", "JobDock", "JobRunner", "Settings", "cells_on_voxels", "checked_run",
    "dock_widget_of", "is_output_layer",
    "jump_to", "label_names_from_features", "last_run", "layer_combo", "layer_label_names", "layer_picker",
    "layer_select", "notify_error", "notify_info", "notify_warning", "path_text", "preselect",
    "remember_last_run", "run_json", "scroll_body", "set_enabled", "slice_axis", "stop_jobs_with", "upsert_layer",
    "volume_from_layer",
]  # fmt: skip


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


def _is_empty(widget: Any) -> bool:
    value = widget.value
    return value is None or (isinstance(value, list | tuple) and not value)


def preselect(viewer: napari.viewer.Viewer, widget: Any, candidates: Sequence[Any]) -> None:
    """Choose a layer for an empty picker: the active layer when it is a candidate, else the only candidate.

    A picker the user has set is left alone; several candidates and none active leave the choice to the user;
    a layer a dock drew (a preview, a prediction) is never chosen for the user.
    """
    candidates = [layer for layer in candidates if not is_output_layer(layer)]
    if not candidates or not _is_empty(widget):
        return
    active = viewer.layers.selection.active
    chosen = active if active in candidates else (candidates[0] if len(candidates) == 1 else None)
    if chosen is not None:
        widget.value = [chosen] if isinstance(widget, Select) else chosen


def _follow_layers(
    viewer: napari.viewer.Viewer, widget: Any, choices: Callable[[Any], list], choose: bool = True
) -> None:
    """Keep a picker's choices in step with the layer list; with ``choose``, it starts from the active or only
    layer (`preselect`) and a layer opened while it is empty is chosen (not one a dock drew)."""

    def on_inserted(event: Any) -> None:
        widget.reset_choices()
        layer = event.value
        if choose and _is_empty(widget) and layer in choices() and not is_output_layer(layer):
            widget.value = [layer] if isinstance(widget, Select) else layer

    viewer.layers.events.inserted.connect(on_inserted)
    for event in (viewer.layers.events.removed, viewer.layers.events.moved):
        event.connect(widget.reset_choices)
    if choose:
        preselect(viewer, widget, choices())


def layer_combo(
    viewer: napari.viewer.Viewer,
    layer_type: type,
    label: str,
    *,
    nullable: bool = False,
    tooltip: str = "",
    where: Callable[[Any], bool] | None = None,
    choose: bool = True,
) -> ComboBox:
    """A ComboBox of the viewer's layers of one type that follows layers being added, removed or moved.

    ``where`` filters further (e.g. ``lambda layer: not is_output_layer(layer)``); ``choose`` starts it from the
    active or only layer (see `preselect`; False leaves an optional picker empty until the user chooses).
    """
    choices = _layer_choices(viewer, layer_type, where)
    combo = ComboBox(label=label, choices=choices, nullable=nullable, tooltip=tooltip)
    active = viewer.layers.selection.active
    # magicgui starts on the first layer: the active one is the likelier choice
    if choose and not nullable and active in choices():
        combo.value = active
    _follow_layers(viewer, combo, choices, choose)
    return combo


def layer_picker(
    viewer: napari.viewer.Viewer,
    kind: str = "image",
    label: str | None = None,
    *,
    tooltip: str = "",
    inputs_only: bool = True,
    choose: bool = True,
) -> ComboBox:
    """A `layer_combo` of the viewer's Image (``kind="image"``) or Labels layers; a labels picker may be left
    empty. ``inputs_only`` leaves out the layers the docks drew (previews, maps, predictions); ``choose`` starts
    it from the active or only layer."""
    import napari

    return layer_combo(
        viewer,
        napari.layers.Image if kind == "image" else napari.layers.Labels,
        label or kind,
        nullable=kind != "image",
        tooltip=tooltip,
        where=(lambda layer: not is_output_layer(layer)) if inputs_only else None,
        choose=choose,
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
    choices = _layer_choices(viewer, layer_type, where)
    select = Select(label=label, choices=choices, tooltip=tooltip)
    _follow_layers(viewer, select, choices)
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
    volume = Volume.from_layer_data(data, scale=layer.scale, translate=layer.translate, metadata=meta)
    if kind == "image":
        warn_if_label_map(volume, f"'{layer.name}'")
    return volume


def warn_if_label_map(volume: Volume, what: str) -> None:
    """A warning notification when an image looks like a label map (used as a CT it teaches nothing)."""
    from napari_dagman._widgets._jobs import label_map_warning

    message = label_map_warning(volume, what)
    if message:
        notify_warning(message)


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


def slice_axis(viewer: napari.viewer.Viewer) -> int:
    """The volume axis (of the last three) the viewer slices through: 0 = axial; 0 in a 3D view."""
    dims = viewer.dims
    offset = dims.ndim - 3
    hidden = [a - offset for a in dims.not_displayed if a >= offset]
    return hidden[-1] if hidden else 0


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
    camera = viewer_camera(viewer)
    if center_camera:
        camera.center = tuple(point[list(viewer.dims.displayed)])
    if zoom is not None:
        camera.zoom = zoom


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9 (``viewer.camera`` is deprecated there),
    ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return getattr(scene, "camera", None) or viewer.camera


# --- layout ----------------------------------------------------------------------------------------------------
class VerticalScrollArea(QScrollArea):
    """Scrolls vertically only: as wide as its content needs, as tall as it is given (a dock's body)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def setWidget(self, widget: QWidget) -> None:  # noqa: N802 (Qt's name)
        super().setWidget(widget)
        widget.installEventFilter(self)

    def eventFilter(self, obj: Any, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        # the content's needs changed (a longer status line, a rebuilt form): the dock follows its width
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def _width(self, content: int) -> int:
        return content + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = super().minimumSizeHint()
        if self.widget() is not None:
            hint.setWidth(self._width(self.widget().minimumSizeHint().width()))
        return hint

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        if self.widget() is not None:
            hint.setWidth(self._width(self.widget().sizeHint().width()))
        return hint


def scroll_body(widget: QWidget) -> VerticalScrollArea | None:
    """Move ``widget``'s layout (and the widgets it holds) into a vertical scroll area that becomes its only
    child; returns the scroll area (None when the widget has no layout yet).

    Qt supports taking a laid-out widget's layout for another widget; references to the layout and its widgets
    stay valid (a magicgui Container keeps adding to its layout).
    """
    layout = widget.layout()
    if layout is None:
        return None
    body = QWidget()
    body.setLayout(layout)  # Qt moves the layout, and the widgets it holds, to the body
    scroll = VerticalScrollArea()
    scroll.setWidget(body)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    # napari adds a stretch below docks that do not ask for height: this one fills its dock instead
    widget.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
    return scroll


# --- run folders ------------------------------------------------------------------------------------------------
#: How the docks name the kinds of run (a run folder's config.json "job").
JOB_NAMES = {"pretrain": "pretraining", "finetune": "fine-tuning"}


def run_json(path: str) -> dict[str, Any]:
    """A run folder's config.json read as plain JSON, {} when there is none or it is unreadable.

    For showing what a run implies (its spacing, its ROI) as soon as it is chosen: unlike `checked_run` it
    imports no torch, so choosing a folder (or opening a dock with the last run) stays instant.
    """
    import json
    from pathlib import Path

    if not path:
        return {}
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def checked_run(path: str, job: str | None = None) -> dict[str, Any]:
    """The config of a run folder a dock was given, or a one-line refusal at Start (not a run folder, or a run
    of another kind), before a job is started that would fail on it later."""
    from napari_dagman.core.checkpoint import RunFolder

    config = RunFolder(path).config_dict()
    kind = str(config.get("job", "pretrain"))
    if job is not None and kind != job:
        raise DagmanInputError(f"{path} is a {kind} run, not a {JOB_NAMES.get(job, job)} run")
    return config


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
    #: Docks of the same group open as tabs of one another (e.g. fine-tuning and its results); "" = none.
    tab_group: ClassVar[str] = ""

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, settings_group: str, description: str) -> None:
        super().__init__()
        guard_notification_timers()  # a job's toasts must not spin napari's event loop (see the function)
        self._viewer = napari_viewer
        self._settings = Settings(settings_group)
        self._runner = JobRunner(
            self._on_event,
            on_done=self._on_done,
            on_error=self._on_error,
            on_stopped=self._on_stopped,
            description=description,
            viewer=napari_viewer,
            describe=self.user_text,
        )
        self._scroll: QScrollArea | None = None
        self._tabbed = False
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

    # --- layout: a scrolling body, tabs with the docks of the same group ---------------------------------------------
    def make_scrollable(self) -> None:
        """Put the dock's content (its layout) in a scroll area, once.

        A dock taller than the screen made napari's window grow past it (buttons and plots out of reach); in a
        scroll area the dock takes the height it is given. Docks call this at the end of their layout; for one
        that does not, it happens when Qt polishes the widget, before it is first shown.
        """
        if self._scroll is None:
            self._scroll = scroll_body(self)

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Polish:
            self.make_scrollable()
        return super().event(event)

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self.tab_group and not self._tabbed:
            self._tabbed = True
            self._tab_with_group()

    def _tab_with_group(self) -> None:
        """Join the tabs of an open dock of the same group, and come to the front."""
        mine = dock_widget_of(self)
        window = mine.parentWidget() if mine is not None else None
        if not isinstance(window, QMainWindow):
            return
        for other in window.findChildren(QDockWidget):
            inner = other.widget()
            if (
                other is not mine
                and isinstance(inner, JobDock)
                and inner.tab_group == self.tab_group
                and not other.isFloating()
                and other.isVisible()
            ):
                window.tabifyDockWidget(other, mine)
                mine.show()
                mine.raise_()
                return

    # --- messages ----------------------------------------------------------------------------------------------
    def user_text(self, text: str) -> str:
        """A core message in the dock's words: a command-line flag (``--val-position``) becomes the label of the
        dock's field ('slab position'); flags the dock has no field for stay as they are."""
        form = getattr(self, "form", None)
        if form is None or not hasattr(form, "widgets"):
            return text

        def label(match: re.Match) -> str:
            widget = form.widgets.get(match.group(1).replace("-", "_"))
            return f"'{widget.label}'" if widget is not None and widget.label else match.group(0)

        return re.sub(r"--([a-z][a-z0-9-]*)", label, text)

    def refuse(self, err: BaseException | str) -> bool:
        """Bad input at Start: one notification line, the reason on the status line (no stale text); False."""
        if isinstance(err, str | DagmanError):
            text = self.user_text(str(err))
            notify_error(text)
        else:
            notify_error(err)  # a bug: type and message, the traceback on the console
            text = f"{type(err).__name__}: {err}"
        self.status.setText(f"not started: {text.splitlines()[0] if text else ''}")
        return False

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


def dock_widget_of(widget: QWidget) -> QDockWidget | None:
    """The QDockWidget that holds ``widget`` (None when it is not docked)."""
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def set_enabled(button: Any, enabled: bool) -> None:
    """Enable a Qt or a magicgui button."""
    if hasattr(button, "setEnabled"):
        button.setEnabled(enabled)
    else:
        button.enabled = enabled
