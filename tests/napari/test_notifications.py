"""napari's toasts as the plugin shows them (issue 27): stacked, not drawn one over another, and without napari's
"Source: <napari.utils.notifications.NotificationManager object ...>" line."""

from __future__ import annotations

import time


def spin(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def test_three_messages_at_once_stack_and_close_back_down(make_napari_viewer):
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from napari.utils.notifications import show_info

    from napari_dagman._widgets.common.notify import guard_notification_timers, notify, notify_error

    viewer = make_napari_viewer(show=True)
    guard_notification_timers()  # what every dock does when it is made
    spin(0.2)
    notify("the run folder exists", "info", [("Open", lambda *_: None)])
    notify_error("'seg' looks like a label map")
    show_info("napari's own message")  # napari's toasts are stacked too
    spin(0.6)
    window = viewer.window._qt_window

    def shown() -> list:
        return [t for t in window.findChildren(NapariQtNotification) if t.isVisible()]

    toasts = shown()
    assert [t.message.text() for t in toasts][-3:] == [
        "the run folder exists",
        "'seg' looks like a label map",
        "napari's own message",
    ]
    rects = [t.geometry() for t in toasts]
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert not a.intersects(b), (a, b)
    assert all(r.top() < s.top() for r, s in zip(rects, rects[1:], strict=False))  # the newest lowest
    assert not [t for t in toasts if "NotificationManager object" in t.source_label.text()]
    # the newest closed: the one above it comes down to the bottom right
    bottom = rects[-1].bottom()
    toasts[-1].close()
    spin(0.2)
    assert shown()[-1].geometry().bottom() == bottom
