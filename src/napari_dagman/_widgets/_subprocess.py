"""Run a core job generator in a child process and stream its events back (Qt-free).

Why a process and not a thread: the training loop is Python code between torch kernels, so a thread in the
napari process competes with the GUI for the GIL and for the cores, and the Qt event loop stutters (the
figures are in ``benchmarks/ui_latency.py`` and ``docs/pretraining.md``). A child process has its own
interpreter, can run at a lower scheduling priority than the GUI, frees every byte of GPU memory when it
exits, and cannot take napari down if it crashes.

The child is started with the ``spawn`` method (never ``fork``: the parent holds Qt and OpenMP threads) and
runs ``target(*args, cancel=token, **kwargs)``, a generator function of the core (or a thin wrapper around
one). Every value it yields is pickled onto a queue; the parent-side generator `ChildProcessJob.events`
yields them again, so a `JobRunner` consumes a child job exactly like a job in a thread.

Stopping is cooperative first: `CancelToken` in the parent -> an event in the child -> the core job's own
token, so a training run saves its checkpoint at the next step boundary and finishes. Only when the child
does not finish within a grace period (or the parent is closing) is it terminated; checkpoint files are
written atomically, so even then the last good checkpoint stays intact.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from napari_dagman.core.errors import DagmanError
from napari_dagman.core.events import CancelToken

#: How long a child may take to stop by itself (finish its step, save) before it is terminated.
DEFAULT_GRACE_S = 60.0
#: Scheduling priority of the child (Unix nice value): the GUI wins the CPU when both want it.
DEFAULT_NICE = 10


@dataclass
class ChildFailure:
    """An exception raised in the child, in a form that always pickles."""

    type_name: str
    message: str
    traceback: str
    exception: BaseException | None  # the original when it pickles (DagmanError subclasses always do)


class _EventToken(CancelToken):
    """A `CancelToken` backed by a multiprocessing event, so the parent can set it across the process line."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self._shared = event

    def cancel(self) -> None:
        self._shared.set()

    @property
    def cancelled(self) -> bool:
        return self._shared.is_set()


def _picklable(err: BaseException) -> BaseException | None:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return None
    return err


def _child_main(
    target: Callable[..., Generator[Any, None, Any]],
    args: tuple,
    kwargs: dict[str, Any],
    events: Any,
    cancel: Any,
    pause: Any,
    nice: int,
) -> None:
    """Entry point of the child: run the job, put ("event", e) / ("return", v) / ("error", f) on the queue."""
    # Ctrl-C in the terminal reaches the whole process group: let the parent decide (it cancels cleanly)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice and hasattr(os, "nice"):
        with contextlib.suppress(OSError):  # not allowed here: run at the normal priority
            os.nice(nice)
    parent = multiprocessing.parent_process()
    if parent is not None:
        # napari killed or crashed: stop at the next step (saving first) instead of training orphaned
        def watch_parent() -> None:
            parent.join()
            cancel.set()

        threading.Thread(target=watch_parent, daemon=True, name="dagman-parent-watch").start()
    token = _EventToken(cancel)
    try:
        job = target(*args, cancel=token, **kwargs)
        while True:
            # pausing between events pauses the job: the generator only advances when asked for a value
            while pause.is_set() and not cancel.is_set():
                time.sleep(0.05)
            try:
                event = next(job)
            except StopIteration as stop:
                events.put(("return", stop.value))
                break
            events.put(("event", event))
    except BaseException as err:  # everything goes back to the parent, which reports it once
        events.put(
            (
                "error",
                ChildFailure(type(err).__name__, str(err), traceback.format_exc(), _picklable(err)),
            )
        )
    finally:
        events.close()
        events.join_thread()  # flush the queue's feeder thread before the process exits


class ChildProcessJob:
    """One job in a child process; `events` is the parent-side generator a `JobRunner` iterates.

    Parameters
    ----------
    target
        A module-level generator function (it is pickled by reference) taking ``cancel=`` as a keyword.
    *args, **kwargs
        Its arguments (pickled into the child: numpy arrays, dataclasses and configs are fine).
    nice
        Added to the child's Unix nice value (lower priority than napari); 0 keeps the priority.
    grace_s
        How long a cancelled child may take to finish before it is terminated.
    """

    def __init__(
        self,
        target: Callable[..., Generator[Any, None, Any]],
        *args: Any,
        nice: int = DEFAULT_NICE,
        grace_s: float = DEFAULT_GRACE_S,
        **kwargs: Any,
    ) -> None:
        self.target, self.args, self.kwargs = target, args, kwargs
        self.nice, self.grace_s = nice, grace_s
        self._ctx = multiprocessing.get_context("spawn")
        self._cancel = self._ctx.Event()
        self._pause = self._ctx.Event()
        self.process: Any = None
        self.exitcode: int | None = None

    # control (any thread) ------------------------------------------------------------------------------------
    def pause(self) -> None:
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()

    @property
    def paused(self) -> bool:
        return self._pause.is_set()

    def cancel(self) -> None:
        self._cancel.set()
        self._pause.clear()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def terminate(self) -> None:
        """Stop the child now (SIGTERM, then SIGKILL); used when it does not stop by itself."""
        proc = self.process
        if proc is None or not proc.is_alive():
            return
        proc.terminate()
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)

    # the stream (worker thread) -----------------------------------------------------------------------------
    def events(self, cancel: CancelToken | None = None) -> Generator[Any, None, Any]:
        """Start the child and yield its events; returns what the job returns, raises what it raises.

        ``cancel`` (the runner's token) is forwarded to the child. Closing this generator early cancels the
        child, waits ``grace_s`` for it to finish and then terminates it.
        """
        events = self._ctx.Queue()
        self.process = self._ctx.Process(
            target=_child_main,
            args=(self.target, self.args, self.kwargs, events, self._cancel, self._pause, self.nice),
            name=f"napari-dagman {getattr(self.target, '__name__', 'job')}",
            daemon=True,  # never outlive napari, even when napari exits without cancelling
        )
        self.process.start()
        finished = False
        try:
            while True:
                if cancel is not None and cancel.cancelled and not self._cancel.is_set():
                    self.cancel()
                try:
                    kind, payload = events.get(timeout=0.1)
                except queue.Empty:
                    if self.process.is_alive():
                        continue
                    try:  # the child may have exited right after its last put
                        kind, payload = events.get(timeout=0.5)
                    except queue.Empty:
                        self.process.join(1.0)
                        self.exitcode = self.process.exitcode
                        raise DagmanError(
                            f"the background process stopped unexpectedly (exit code {self.exitcode}, "
                            "e.g. out of memory); checkpoints written so far are intact"
                        ) from None
                if kind == "event":
                    yield payload
                elif kind == "return":
                    finished = True
                    return payload
                else:
                    finished = True
                    raise self._rebuild(payload)
        finally:
            if not finished:
                self.cancel()
            self.process.join(self.grace_s if not finished else 10.0)
            if self.process.is_alive():
                self.terminate()
            self.exitcode = self.process.exitcode
            events.close()
            events.join_thread()

    @staticmethod
    def _rebuild(failure: ChildFailure) -> BaseException:
        if isinstance(failure.exception, DagmanError):
            return failure.exception  # a user error: its one-line message is all the user needs
        # a bug: the child's traceback is the useful one; the parent only reports the one-line summary
        print(f"napari-dagman background process failed:\n{failure.traceback}", file=sys.stderr)
        if failure.exception is not None:
            return failure.exception
        return RuntimeError(f"{failure.type_name}: {failure.message}")
