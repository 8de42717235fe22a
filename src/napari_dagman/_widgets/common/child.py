"""The child interpreter of a background job: its own entry point, ``python -m napari_dagman._widgets.common.child``.

Why not `multiprocessing`'s spawn: spawn re-imports the parent's ``__main__`` in the child, so a user script
that opens napari and starts pretraining without an ``if __name__ == "__main__":`` guard ran again in the child
(it opened napari there, and the run never started). This module is the child's main module instead, so the
user's script is never imported; the parent hands over its ``sys.path`` (a method registered from user code
can still be imported by its module name).

Two pipes link the processes, both carrying length-prefixed pickles:

* the child's stdin: first the job (the parent's ``sys.path``, the pickled target and its arguments, the nice
  value), then control words ("cancel", "pause", "resume"); end of file means the parent is gone, which
  cancels the job (it saves and finishes instead of training orphaned);
* the child's original stdout: ``("event", e)``, then ``("return", value)`` or ``("error", ChildFailure)``.
  Anything else that writes to stdout in the child (a library's print) is sent to stderr, so it cannot
  corrupt the stream.

Qt-free: the parent side (`ChildProcess`) runs in a job runner's worker thread.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import IO, Any

_HEADER = struct.Struct(">Q")


@dataclass
class ChildFailure:
    """An exception raised in the child, in a form that always pickles."""

    type_name: str
    message: str
    traceback: str
    exception: BaseException | None  # the original when it pickles (DagmanError subclasses always do)


def write_frame(stream: IO[bytes], obj: Any) -> None:
    """One pickled object, preceded by its length."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """The next object written by `write_frame`; EOFError at the end of the stream."""
    header = _read_exactly(stream, _HEADER.size)
    return pickle.loads(_read_exactly(stream, _HEADER.unpack(header)[0]))


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("stream closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _picklable(err: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return None
    return err


# --- parent side ---------------------------------------------------------------------------------------------
def child_environment() -> dict[str, str]:
    """napari's environment, with OpenMP threads that sleep while they wait (unless the user chose otherwise).

    PyTorch's OpenMP threads spin for a while at the end of each parallel region. Beside another training run on
    a 2-core machine both then burned the cores spinning: the dock's run did 0.11 steps/s and the other 0.19,
    against 0.91 alone; with passive waiting 0.61 and 0.60 (`benchmarks/ui_latency.py --competitor`,
    docs/pretraining.md#responsiveness).
    """
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class ChildProcess:
    """A job running in its own interpreter; its messages arrive on a queue (`get`).

    Parameters
    ----------
    target
        A module-level generator function (pickled by reference) taking ``cancel=`` as a keyword.
    args, kwargs
        Its arguments (pickled into the child).
    nice
        Added to the child's Unix nice value (0 keeps napari's priority).
    name
        What the process is called in messages.
    """

    def __init__(
        self,
        target: Callable[..., Generator[Any, None, Any]],
        args: tuple,
        kwargs: dict[str, Any],
        *,
        nice: int = 0,
        name: str = "napari-dagman job",
    ) -> None:
        self.name = name
        # pickled here, so that an argument that does not pickle fails in napari with its own message
        job = pickle.dumps((target, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=os.getcwd(),
            env=child_environment(),
        )
        self.pid = self.popen.pid
        self._send_lock = threading.Lock()
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{name} reader")
        self._reader.start()
        self._send({"sys_path": list(sys.path), "job": job, "nice": int(nice)})

    def _read(self) -> None:
        """Move the child's messages onto the queue; ("eof", None) once its stream ends."""
        try:
            while True:
                self.messages.put(read_frame(self.popen.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        finally:
            self.messages.put(("eof", None))

    def _send(self, obj: Any) -> None:
        # a closed pipe: the child has exited (or is exiting)
        with self._send_lock, contextlib.suppress(BrokenPipeError, OSError, ValueError):
            write_frame(self.popen.stdin, obj)

    def control(self, word: str) -> None:
        """Send "cancel", "pause" or "resume" (ignored once the child has exited)."""
        if self.is_alive():
            self._send(word)

    def get(self, timeout: float) -> tuple[str, Any]:
        """The next message; raises `queue.Empty` when none came within ``timeout`` seconds."""
        return self.messages.get(timeout=timeout)

    # the process ----------------------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            self.popen.terminate()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            self.popen.kill()

    def close(self) -> None:
        """Close the pipes (the child, if still running, reads end of file and cancels)."""
        for stream in (self.popen.stdin, self.popen.stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()


# --- child side ----------------------------------------------------------------------------------------------
def _follow_controls(control: IO[bytes], cancel: Any, pause: threading.Event) -> None:
    """Apply the parent's control words; the end of the stream (the parent is gone) cancels."""
    try:
        while True:
            word = read_frame(control)
            if word == "cancel":
                cancel.cancel()
                pause.clear()
            elif word == "pause":
                pause.set()
            elif word == "resume":
                pause.clear()
    except (EOFError, OSError, pickle.UnpicklingError):
        cancel.cancel()  # napari closed or crashed: stop at the next step, saving first
        pause.clear()


def _run(job: Generator[Any, None, Any], channel: IO[bytes], cancel: Any, pause: threading.Event) -> None:
    """Send the job's events, then what it returns; pausing between events pauses the job."""
    while True:
        while pause.is_set() and not cancel.cancelled:
            time.sleep(0.05)
        try:
            event = next(job)
        except StopIteration as stop:
            write_frame(channel, ("return", stop.value))
            return
        write_frame(channel, ("event", event))


def main() -> int:
    """Entry point of the child: read the job from stdin, run it, stream its messages to the parent."""
    # our channel is the original stdout; whatever else writes to stdout (print, C libraries) goes to stderr
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # unbuffered: a daemon thread blocked in a buffered read would abort the interpreter's shutdown
    control = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115 (lives as long as we do)
    # Ctrl-C in the terminal reaches the whole process group: let the parent decide (it cancels cleanly)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        boot = read_frame(control)
    except EOFError:
        return 1  # the parent went away before handing over a job
    sys.path[:] = boot["sys_path"]
    if boot.get("nice") and hasattr(os, "nice"):
        with contextlib.suppress(OSError):  # not allowed here: run at the normal priority
            os.nice(boot["nice"])
    # run as ``-m``, this module is ``__main__`` here: import it by name, so the failure pickles as
    # ``napari_dagman._widgets.common.child.ChildFailure``, a class the parent knows
    from napari_dagman._widgets.common.child import ChildFailure as Failure
    from napari_dagman.core.events import CancelToken

    cancel, pause = CancelToken(), threading.Event()
    threading.Thread(target=_follow_controls, args=(control, cancel, pause), daemon=True).start()
    try:
        target, args, kwargs = pickle.loads(boot["job"])
        _run(target(*args, cancel=cancel, **kwargs), channel, cancel, pause)
    except BaseException as err:  # everything goes back to the parent, which reports it once
        failure = Failure(type(err).__name__, str(err), traceback.format_exc(), _picklable(err))
        with contextlib.suppress(OSError):
            write_frame(channel, ("error", failure))
        return 1
    finally:
        with contextlib.suppress(OSError):
            channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
