"""The one cancel contract every dock shares (`_common.JobDock`): start, Cancel, the stopped state, closing."""

from __future__ import annotations

import time

from magicgui.widgets import PushButton
from qtpy.QtWidgets import QPushButton

from napari_dagman._widgets.clusters.dock import ClustersWidget
from napari_dagman._widgets.common import JobDock
from napari_dagman._widgets.results.dock import SegmentationResultsWidget
from napari_dagman._widgets.training.finetune import FinetuneWidget
from napari_dagman._widgets.training.pretrain import PretrainWidget
from napari_dagman.core.events import ProgressEvent


def endless_job(cancel=None):
    """Yields until cancelled, then returns what it did (a job with a partial result)."""
    done = 0
    while not cancel.cancelled:
        done += 1
        yield ProgressEvent(done, 0, "work")
        time.sleep(0.01)
    return done


class Dock(JobDock):
    run_kind = "test job"

    def __init__(self, viewer) -> None:
        super().__init__(viewer, settings_group="test", description="test")
        self.toggle = QPushButton("Go")
        self.other = PushButton(text="Other")  # a magicgui button that also starts jobs
        self.stop_button = QPushButton("Stop")
        self._toggle = (self.toggle, "Go")
        self._start_buttons.append(self.other)
        self._cancel_buttons.append(self.stop_button)
        self._set_running(False)
        self.results: list = []

    def start(self) -> bool:
        if self._busy():
            return False
        self._launch(endless_job, status="working")
        return True

    def _on_done(self, result) -> None:
        self.results.append(result)


def test_start_cancel_and_the_stopped_state(make_napari_viewer, notifications):
    dock = Dock(make_napari_viewer())
    assert not dock.stop_button.isEnabled() and dock.other.enabled
    assert dock.start() and dock.running
    assert dock.toggle.text() == "Cancel" and dock.stop_button.isEnabled() and not dock.other.enabled
    assert dock.status.text() == "working"
    assert not dock.start()  # one job at a time, said in a warning
    assert "a test job is already running" in notifications[-1][1]
    dock.start_or_cancel()  # the toggle, running: cancels
    assert not dock.toggle.isEnabled() and dock.status.text() == dock.cancelling_text
    assert dock.wait(30)
    assert len(dock.results) == 1 and dock.status.text() == "cancelled"  # the partial result arrives
    assert dock.toggle.text() == "Go" and dock.toggle.isEnabled() and dock.other.enabled
    assert not dock.stop_button.isEnabled()


def test_closing_the_dock_stops_its_job(make_napari_viewer):
    viewer = make_napari_viewer()
    dock = Dock(viewer)
    viewer.window.add_dock_widget(dock, name="test")
    assert dock.start()
    viewer.window.remove_dock_widget(dock)
    assert not dock.running


def test_every_dock_is_on_the_shared_base(make_napari_viewer):
    viewer = make_napari_viewer()
    for cls in (PretrainWidget, FinetuneWidget, SegmentationResultsWidget, ClustersWidget):
        dock = cls(viewer)
        assert isinstance(dock, JobDock) and not dock.running
        assert dock._toggle is not None or dock._cancel_buttons, cls.__name__


def test_a_toast_shown_while_napari_is_inactive_does_not_spin_the_event_loop(make_napari_viewer, qtbot):
    """napari's toast shown while its window is not active (the user is elsewhere as a job ends; always under
    Xvfb) kept a bare repeating 0 ms timer, which the next ``timer_start`` (another toast closing, the mouse
    leaving it) set firing on every turn of the event loop: napari at 100 % of a core, training at a fifth of
    its speed. With a dock open the timer is the dismiss timer and the toast fades out."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    viewer = make_napari_viewer(show=True)
    Dock(viewer)  # every dock installs the guard
    canvas = viewer.window._qt_viewer.canvas.native
    assert not canvas.window().isActiveWindow()  # no window manager: the inactive-window path of show()
    toast = NapariQtNotification("done", "info", parent=canvas)
    toast.DISMISS_AFTER = 100
    toast.show()
    assert not toast.timer.isActive()  # show() left it as napari does when the window is inactive
    toast.timer_start()  # what closing the toast above it does
    assert toast.timer.isSingleShot() and toast.timer.interval() == 100  # was: repeating, 0 ms
    closed: list[bool] = []
    toast.destroyed.connect(lambda *_: closed.append(True))  # closing deletes it (WA_DeleteOnClose)
    qtbot.waitUntil(lambda: bool(closed), timeout=5000)  # dismissed: faded out and closed
