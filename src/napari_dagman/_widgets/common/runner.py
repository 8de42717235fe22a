"""Running a core job in the background (a worker thread or a child process) for a dock, and stopping it
whatever way napari ends: the dock is closed, its window is deleted, napari quits, or the interpreter exits.

A job that is still running when the interpreter exits (a script called ``viewer.close()`` and returned) is
cancelled and waited for, so it saves its checkpoint and records itself as cancelled instead of being killed
half-way with its run folder saying "running".
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget

from napari_dagman._widgets.common.notify import notify_error
from napari_dagman.core.errors import DagmanError, DagmanInputError

if TYPE_CHECKING:
    import napari

#: How long the interpreter's exit waits for running jobs to save and end (a CPU step can take a while).
EXIT_GRACE_S = 120.0
#: The runners whose job is running (the interpreter's exit cancels and waits for them).
_ACTIVE: set[JobRunner] = set()
_EXIT_HOOKED = False


def _finish_jobs_at_exit(timeout: float = EXIT_GRACE_S) -> None:
    """Cancel every running job and wait for it to end (checkpoint saved, run recorded as cancelled).

    Runs at interpreter exit, without Qt's event loop: the jobs' threads (and child processes) end by
    themselves once cancelled; nothing is drawn any more.
    """
    runners = list(_ACTIVE)
    for runner in runners:
        runner.detach()
        runner.cancel()
    end = time.monotonic() + timeout
    for runner in runners:
        runner.thread_ended.wait(max(0.0, end - time.monotonic()))
        if not runner.thread_ended.is_set() and runner.process_job is not None:
            runner.process_job.terminate()  # it did not stop in time: the last checkpoint on disk stays
    if runners:
        # the job's generator has ended, but its worker still emits "returned" and "finished": Qt's objects torn
        # down under it raised "wrapped C/C++ object ... has been deleted" in that thread, and the process aborted
        # (signal 6) when the thread pool was destroyed with the thread still in it
        from qtpy.QtCore import QThreadPool

        QThreadPool.globalInstance().waitForDone(int(1000 * max(1.0, end - time.monotonic())))


def _hook_exit() -> None:
    global _EXIT_HOOKED
    if not _EXIT_HOOKED:
        atexit.register(_finish_jobs_at_exit)  # registered after napari's: runs before them
        _EXIT_HOOKED = True


class JobRunner:
    """Runs a core job generator in the background; its events arrive in the main thread.

    ``start(factory)`` calls ``factory(cancel_token)`` in a worker thread and iterates the generator it
    returns. ``start_in_process(target, *args)`` runs ``target(*args, cancel=token)`` in a child process
    instead (see `common.child_process`): the choice for long CPU/GPU work such as pretraining, because a thread
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
        describe: Callable[[str], str] | None = None,
    ) -> None:
        self.on_event, self.on_done, self.on_error, self.on_stopped = on_event, on_done, on_error, on_stopped
        #: Puts a user error's message in the dock's words (e.g. a command-line flag as the field's label).
        self.describe = describe or (lambda text: text)
        self.description = description
        self.worker = None
        self.token = None
        self.process_job: Any = None
        self._progress = None
        self._quit_hooked = False
        self._detached = False
        #: Set once the job's generator has ended in its thread (the child process, if any, has exited).
        self.thread_ended = threading.Event()
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

        ended = self.thread_ended = threading.Event()

        def work() -> Generator[Any, None, Any]:
            try:
                result = yield from factory(token)
            finally:
                ended.set()
                _ACTIVE.discard(self)
            return result

        # superqt's worker (not napari's notifying one): errors are reported once, as one line, by us
        worker = GeneratorWorker(work)
        worker.yielded.connect(partial(self._deliver, self._on_yield))
        worker.returned.connect(partial(self._deliver, self._on_returned))
        worker.errored.connect(partial(self._deliver, self._on_errored))
        worker.finished.connect(partial(self._deliver, self._on_finished))
        self.worker = worker
        self._detached = False
        _ACTIVE.add(self)
        _hook_exit()
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
        from napari_dagman._widgets.common.child_process import ChildProcessJob

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
        """Stop delivering events and notifications (the dock that drew them is gone, or napari is); the job
        itself is not touched."""
        self._detached = True
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

        if self._detached:  # napari's activity dock may be gone with its window
            return
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
        if self._detached:  # nobody is there to read it (napari's window is gone)
            return
        from napari_dagman.core.memory import out_of_memory, out_of_memory_message

        if isinstance(err, DagmanError):
            notify_error(self.describe(str(err)))
        elif out_of_memory(err):  # a prediction or the explorer on too large an input: one line, as in the CLI
            notify_error(self.describe(out_of_memory_message(err)))
        else:
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


def _abandon(runners: list[JobRunner], *_: Any) -> None:
    for runner in runners:
        runner.detach()
        runner.cancel()


class _JobGuard(QObject):
    """Stops a dock's jobs when the dock is closed (napari unparents its widget) or the widget is deleted."""

    def __init__(self, widget: QWidget, timeout: float) -> None:
        super().__init__(widget)
        self.runners: list[JobRunner] = []
        self.timeout = timeout
        widget.installEventFilter(self)
        # napari deletes the docks with its window: cancel (the job saves and ends by itself), draw nothing more
        widget.destroyed.connect(partial(_abandon, self.runners))

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
            for runner in self.runners:
                if runner.running:
                    runner.stop(self.timeout)
        return False


def stop_jobs_with(widget: QWidget, *runners: JobRunner, timeout: float = 60.0) -> None:
    """Tie ``runners`` to a dock ``widget``: closing the dock stops them cleanly (cancel, wait up to
    ``timeout`` s, then end a child process); deleting the widget (napari's window closed) cancels them.

    Called again for the same widget (a dock base ties its runner, the dock adds its own), it adds the runners
    not tied yet and the latest ``timeout`` applies.
    """
    guard = widget.__dict__.get("_dagman_job_guard")
    if guard is None:
        guard = widget.__dict__["_dagman_job_guard"] = _JobGuard(widget, timeout)
    guard.timeout = timeout
    guard.runners.extend([runner for runner in runners if runner not in guard.runners])
