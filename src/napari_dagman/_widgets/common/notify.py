"""One-line notifications every dock uses (napari's notification manager; imported lazily)."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

from napari_dagman.core.errors import DagmanError


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
    notify(message, "info", actions)


def notify_warning(message: str, actions: Sequence[tuple[str, Callable[..., Any]]] = ()) -> None:
    """A warning notification, with optional (button text, callback) actions."""
    notify(message, "warning", actions)


def notify(message: str, severity: str, actions: Sequence[tuple[str, Callable[..., Any]]] = ()) -> None:
    from napari.utils.notifications import Notification, NotificationSeverity, notification_manager

    # Qt reads "&" in a button's text as a keyboard-shortcut marker ("Predict & inspect" showed
    # "Predict _inspect"): "&&" is a literal ampersand
    buttons = [(text.replace("&&", "&").replace("&", "&&"), callback) for text, callback in actions]
    notification_manager.dispatch(
        Notification(message, severity=NotificationSeverity(severity), actions=buttons)
    )


def guard_notification_timers() -> None:
    """Keep napari's notification toasts from spinning the event loop at 100 % CPU (napari 0.5-0.9).

    A toast shown while napari's window is not the active one (the user works in another program while a job
    finishes; always under Xvfb) returns from ``show`` before it configures its dismiss timer. That timer is
    still a bare ``QTimer()``: interval 0, repeating, connected to nothing. When the toast above it closes, or the
    mouse leaves it, napari calls ``timer_start`` on it, and from then on the timer fires on every turn of the
    event loop until the toast is closed by hand: one core busy, and training in a child process at a fifth of
    its speed (`benchmarks/ui_latency.py`: 0.2 instead of 2.0 steps/s after a run with previews and one without).
    The guard gives such a timer what ``show`` would have (single shot, ``DISMISS_AFTER``, fade out) before it
    starts. Idempotent; without napari's Qt toasts it does nothing.
    """
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # pragma: no cover - napari without its Qt toasts
        return
    start = NapariQtNotification.timer_start
    if getattr(start, "_dagman_guard", False):
        return

    def timer_start(self: Any) -> None:
        timer = getattr(self, "timer", None)
        if timer is not None and self.DISMISS_AFTER > 0 and not timer.isSingleShot():
            # never configured by show(): make it the dismiss timer (once) rather than a 0 ms repeating one
            timer.setInterval(self.DISMISS_AFTER)
            timer.setSingleShot(True)
            timer.timeout.connect(self.close_with_fade)
        start(self)

    timer_start._dagman_guard = True  # type: ignore[attr-defined]
    NapariQtNotification.timer_start = timer_start
    _stack_toasts(NapariQtNotification)


#: Space between stacked toasts, and between the lowest and the window's edge (napari's own offset).
TOAST_GAP = 8


def _stack_toasts(toast_class: Any) -> None:
    """Stack napari's toasts instead of drawing each new one over the last (napari 0.9 puts every toast at the
    same bottom-right place: three messages at Start read as one, issue 27), and drop the "Source:
    <napari.utils.notifications.NotificationManager object ...>" line napari writes on every toast it shows (the
    emitter, not where the message came from)."""
    show, close = toast_class.show, toast_class.close

    def show_stacked(self: Any) -> None:
        label = getattr(self, "source_label", None)
        if label is not None and "NotificationManager object" in label.text():
            label.setText("")
        show(self)
        parent = self.parent()
        restack_toasts(toast_class, parent)
        if parent is not None and hasattr(parent, "resized") and not getattr(parent, "_dagman_restacks", False):
            # napari moves every toast back to the bottom right when the canvas resizes (a dock opens, the
            # window settles): stack them again once its handlers have run
            from qtpy.QtCore import QTimer

            parent._dagman_restacks = True
            parent.resized.connect(lambda *_: QTimer.singleShot(0, lambda: restack_toasts(toast_class, parent)))

    def close_restacked(self: Any) -> None:
        parent = self.parent()
        close(self)
        restack_toasts(toast_class, parent)

    toast_class.show, toast_class.close = show_stacked, close_restacked


def restack_toasts(toast_class: Any, parent: Any) -> None:
    """Place the open toasts of ``parent`` one above the other from its bottom right, the newest lowest. The
    newest stays where napari's slide-in animation takes it."""
    if parent is None:
        return
    shown = [t for t in toast_class._instances if t.parent() is parent and t.isVisible()]
    if not shown:
        return
    newest = shown[-1]
    sliding = newest.geom_anim.state() == newest.geom_anim.State.Running
    if sliding:  # where it will rest
        top = newest.geom_anim.endValue().top()
    else:  # at the bottom right (the toast below it was closed)
        top = parent.height() - newest.height() - TOAST_GAP
        newest.move(parent.width() - newest.width() - TOAST_GAP, top)
    for toast in reversed(shown[:-1]):
        toast.geom_anim.stop()  # an older toast still sliding in would move itself back over the newest
        top -= toast.height() + TOAST_GAP
        toast.move(parent.width() - toast.width() - TOAST_GAP, max(0, top))
