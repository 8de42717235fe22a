"""Run a core job generator in a child process and stream its events back (Qt-free).

Why a process and not a thread: the training loop is Python code between torch kernels, so a thread in the
napari process competes with the GUI for the GIL and for the cores, and the Qt event loop stutters (the
figures are in ``benchmarks/ui_latency.py`` and ``docs/pretraining.md``). A child process has its own
interpreter, can run at a lower scheduling priority than the GUI, frees every byte of GPU memory when it
exits, and cannot take napari down if it crashes.

The child is a fresh interpreter whose main module is `child` (never ``fork``: the parent holds Qt and OpenMP
threads; never multiprocessing's spawn: it would re-import the user's script) and runs
``target(*args, cancel=token, **kwargs)``, a generator function of the core (or a thin wrapper around one).
Every value it yields is pickled onto a pipe; the parent-side generator `ChildProcessJob.events` yields them
again, so a `JobRunner` consumes a child job exactly like a job in a thread.

Stopping is cooperative first: `CancelToken` in the parent -> a "cancel" word to the child -> the core job's
own token, so a training run saves its checkpoint at the next step boundary and finishes. Only when the child
does not finish within a grace period is it terminated; checkpoint files are written atomically, so even then
the last good checkpoint stays intact. When napari's process ends, the child reads the end of its control pipe
and cancels itself the same way.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Callable, Generator
from typing import Any

from napari_dagman._widgets.common.child import ChildFailure, ChildProcess
from napari_dagman.core.errors import DagmanError
from napari_dagman.core.events import CancelToken, JobCancelled

#: How long a child may take to stop by itself (finish its step, save) before it is terminated.
DEFAULT_GRACE_S = 60.0
#: Scheduling priority of the child (Unix nice value). Beside a command-line run on a 2-core machine (docs/
#: pretraining.md#beside-another-run): nice 10 starved the dock's run (< 0.05 steps/s against the other's 0.71),
#: nice 0 took twice the other's share (0.50 vs 0.28) and let napari stall up to 1.1 s; nice 2 comes closest to
#: fair (0.34 vs 0.47) with napari's p99 lateness 19 ms.
DEFAULT_NICE = 2

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_NICE", "ChildFailure", "ChildProcessJob"]


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
        self._cancelled = False
        self._paused = False
        self.process: ChildProcess | None = None
        self.exitcode: int | None = None

    # control (any thread) ------------------------------------------------------------------------------------
    def _control(self, word: str) -> None:
        if self.process is not None:
            self.process.control(word)

    def pause(self) -> None:
        self._paused = True
        self._control("pause")

    def resume(self) -> None:
        self._paused = False
        self._control("resume")

    @property
    def paused(self) -> bool:
        return self._paused

    def cancel(self) -> None:
        self._cancelled, self._paused = True, False
        self._control("cancel")

    @property
    def cancelled(self) -> bool:
        return self._cancelled

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

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the child to exit (no Qt events needed); True when it has."""
        if self.process is None:
            return True
        self.process.join(timeout)
        return not self.process.is_alive()

    # the stream (worker thread) -----------------------------------------------------------------------------
    def events(self, cancel: CancelToken | None = None) -> Generator[Any, None, Any]:
        """Start the child and yield its events; returns what the job returns, raises what it raises.

        ``cancel`` (the runner's token) is forwarded to the child. Closing this generator early cancels the
        child, waits ``grace_s`` for it to finish and then terminates it.
        """
        process = self.process = ChildProcess(
            self.target,
            self.args,
            self.kwargs,
            nice=self.nice,
            name=f"napari-dagman {getattr(self.target, '__name__', 'job')}",
        )
        if self._paused:  # paused or cancelled before the child was there
            self._control("pause")
        if self._cancelled:
            self._control("cancel")
        finished = False
        try:
            while True:
                if cancel is not None and cancel.cancelled and not self._cancelled:
                    self.cancel()
                try:
                    kind, payload = process.get(timeout=0.1)
                except queue.Empty:
                    continue
                if kind == "event":
                    yield payload
                elif kind == "return":
                    finished = True
                    return payload
                elif kind == "error":
                    finished = True
                    raise self._rebuild(payload)
                else:  # the stream ended without an answer: the child died
                    process.join(2.0)
                    self.exitcode = process.exitcode
                    raise DagmanError(
                        f"the background process stopped unexpectedly (exit code {self.exitcode}, "
                        "e.g. out of memory); checkpoints written so far are intact"
                    )
        finally:
            if not finished:
                self.cancel()
            process.join(self.grace_s if not finished else 10.0)
            if process.is_alive():
                self.terminate()
            self.exitcode = process.exitcode
            process.close()

    @staticmethod
    def _rebuild(failure: ChildFailure) -> BaseException:
        if isinstance(failure.exception, DagmanError | JobCancelled):
            # a user error: its one-line message is all the user needs; a cancel (napari closed while the job
            # ran) is not an error at all, and printed nothing until it printed a traceback here
            return failure.exception
        # a bug: the child's traceback is the useful one; the parent only reports the one-line summary
        print(f"napari-dagman background process failed:\n{failure.traceback}", file=sys.stderr)
        if failure.exception is not None:
            return failure.exception
        return RuntimeError(f"{failure.type_name}: {failure.message}")
