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
