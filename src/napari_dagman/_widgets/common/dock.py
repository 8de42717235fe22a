"""`JobDock`, the base of every dock that runs a job: one cancel contract, a scrolling body, tabs with the
plugin's other docks, bad input as one line in the dock's own words."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from qtpy.QtCore import QEvent
from qtpy.QtWidgets import (
    QDockWidget,
    QLabel,
    QMainWindow,
    QScrollArea,
    QWidget,
)

from napari_dagman._widgets.common.child_process import DEFAULT_NICE
from napari_dagman._widgets.common.layout import scroll_body
from napari_dagman._widgets.common.notify import (
    guard_notification_timers,
    notify,
    notify_error,
    notify_warning,
)
from napari_dagman._widgets.common.runner import JobRunner, stop_jobs_with
from napari_dagman._widgets.common.settings import Settings
from napari_dagman._widgets.common.turns import Turns
from napari_dagman.core.errors import DagmanError, LabelMapAsCTError

if TYPE_CHECKING:
    import napari

# --- docks ------------------------------------------------------------------------------------------------------


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
        #: drawing a result piece by piece, one event-loop turn each (`Turns`): napari repaints between pieces
        self.drawing = Turns(self)
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
        if not self._tabbed:
            self._tabbed = True
            tab_with_open_docks(self)

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
        if isinstance(err, LabelMapAsCTError) and err.layer_name:
            text = self.user_text(str(err))
            notify(text, "error", [("It is a CT", lambda *_: self._read_as_ct(err.layer_name))])
        elif isinstance(err, str | DagmanError):
            text = self.user_text(str(err))
            notify_error(text)
        else:
            notify_error(err)  # a bug: type and message, the traceback on the console
            text = f"{type(err).__name__}: {err}"
        self.status.setText(f"not started: {text.splitlines()[0] if text else ''}")
        return False

    def _read_as_ct(self, layer_name: str) -> None:
        """The user says a layer refused as a label map is a CT: mark it (`core.io.label_map_message` honours the
        mark; the CT window dock's 'it is a CT' shows it) and say what to do next."""
        if layer_name not in self._viewer.layers:
            return
        self._viewer.layers[layer_name].metadata["is_ct"] = True
        notify(f"'{layer_name}' will be read as a CT: press Start again", "info")
        self.status.setText(f"'{layer_name}' is marked as a CT; start again")

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
        """Process events until the job ends and its result is drawn (tests and scripts)."""
        return self._runner.wait(timeout) and self.drawing.finish()

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


def tab_with_open_docks(widget: QWidget) -> None:
    """Dock ``widget`` as a tab of this plugin's docks already open (and bring it to the front).

    napari's Plugins menu docks each widget below the others: five docks became slivers a few rows high. The
    window dock (`WindowWidget`) is a strip meant to stay above, so it is neither tabbed nor tabbed with.
    """
    from napari_dagman._widgets.common.loading import DeferredDock

    mine = dock_widget_of(widget)
    window = mine.parentWidget() if mine is not None else None
    if not isinstance(window, QMainWindow):
        return
    for other in window.findChildren(QDockWidget):
        if (
            other is not mine
            and isinstance(other.widget(), JobDock | DeferredDock)
            and not other.isFloating()
            and other.isVisible()
            and window.dockWidgetArea(other) == window.dockWidgetArea(mine)
        ):
            window.tabifyDockWidget(other, mine)
            mine.show()
            mine.raise_()
            return


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
