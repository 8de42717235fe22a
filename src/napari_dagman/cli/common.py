"""Helpers shared by the subcommands: driving a job generator with a progress bar."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_dagman.core.errors import DagmanError
from napari_dagman.core.events import (
    CancelToken,
    CheckpointEvent,
    FinishedEvent,
    LogEvent,
    PreviewEvent,
    ProgressEvent,
    StepEvent,
)

if TYPE_CHECKING:
    from napari_dagman.core.volume import Volume


def read_input(path: str) -> Volume:
    """Read one volume for a subcommand; what the reader had to say (slices interpolated) is printed as warnings."""
    from napari_dagman.core.io import read_volume

    volume = read_volume(path)
    for note in volume.metadata.get("notes", []):
        say(f"warning: {note}", err=True)
    return volume


def is_cohort(source: str) -> bool:
    """A folder that is not one DICOM series, a dataset.json, or a .csv/.json list of cases."""
    from napari_dagman.core.io import folder_has_dicom

    path = Path(source)
    if path.is_dir():
        return not folder_has_dicom(path)
    return path.suffix.lower() in (".json", ".csv")


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (they stay quiet)."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str, *, err: bool = False) -> None:
    if is_main_process():
        print(message, file=sys.stderr if err else sys.stdout, flush=True)


class SignalStop(CancelToken):
    """A cancel token that Ctrl-C (SIGINT) or SIGTERM sets; ``signum`` says which came first."""

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None

    @property
    def exit_status(self) -> int:
        """The shell's convention for a job stopped by a signal (130 Ctrl-C, 143 SIGTERM); 0 if none came."""
        return 128 + self.signum if self.signum is not None else 0


@contextmanager
def stop_on_signals() -> Iterator[SignalStop]:
    """Ctrl-C or SIGTERM (a batch scheduler's pre-emption) let a training job finish its step, save, and stop.

    Python would raise KeyboardInterrupt wherever the loop happens to be, often between the optimiser step and
    the EMA update, where no consistent state exists to save; a token checked between steps always has one. A
    second signal aborts at once. SIGINT that the caller ignores (a background job of a script) stays ignored.
    """
    stop = SignalStop()
    # signals can only be caught in the main thread; under torchrun every rank would have to stop at the same
    # step (a flag set at different steps leaves the others waiting in an all-reduce): there, a signal stops the
    # job at once and --resume continues from the last periodic save
    if (
        threading.current_thread() is not threading.main_thread()
        or int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        yield stop
        return

    def handle(signum: int, frame: object) -> None:
        if stop.cancelled:
            raise KeyboardInterrupt
        stop.signum = signum
        stop.cancel()
        say(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving (send it again to stop at once)",
            err=True,
        )

    wanted = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        wanted.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, handle) for sig in wanted}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_training(
    job: Callable[..., Generator[Any, None, Any]], config: Any, *, resume: bool, name: str, quiet: bool
) -> tuple[FinishedEvent, int]:
    """Run a training job (``run_pretraining``, ``run_finetuning``) for a subcommand and say how it ended.

    Progress bar, Ctrl-C/SIGTERM stop at a step boundary (`stop_on_signals`), the end line and, when stopped,
    the ``--resume`` command. Returns the `FinishedEvent` and the exit status (0, or 130/143 after a signal).
    """
    command = "napari-dagman " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with stop_on_signals() as stop:
        finished = drive(job(config, resume=resume, cancel=stop, command=command), desc=name, quiet=quiet)
    state = "cancelled" if finished.cancelled else "done"
    say(f"{state}: {finished.steps_done}/{finished.total_steps} steps; run folder {finished.run_dir}")
    if not finished.cancelled:
        return finished, 0
    say(f"continue it with: napari-dagman {name} --out {shlex.quote(finished.run_dir)} --resume")
    return finished, stop.exit_status


def drive(events: Generator[Any, None, Any], *, desc: str, quiet: bool = False) -> FinishedEvent:
    """Run a job generator with a tqdm bar; Ctrl-C closes it (the job saves its state) and re-raises."""
    from tqdm import tqdm

    show = is_main_process() and not quiet
    bar = None
    finished: FinishedEvent | None = None
    try:
        for event in events:
            if isinstance(event, ProgressEvent) and bar is not None and bar.unit == "step":
                # progress inside the training (validation over cases): on the steps' bar, which stays
                bar.set_postfix_str(f"{event.stage} {event.done}/{event.total}")
            elif isinstance(event, StepEvent | ProgressEvent):
                total = event.total_steps if isinstance(event, StepEvent) else event.total
                done = event.step if isinstance(event, StepEvent) else event.done
                kind = "step" if isinstance(event, StepEvent) else "it"
                if bar is not None and (bar.unit != kind or bar.total != total):  # the files, then the steps
                    bar.close()
                    bar = None
                if bar is None and show:
                    bar = tqdm(
                        total=total,
                        initial=done - 1 if isinstance(event, StepEvent) else 0,
                        desc=desc,
                        unit=kind,
                        dynamic_ncols=True,
                        file=sys.stderr,
                    )
                if bar is not None:
                    bar.n = done
                    if isinstance(event, StepEvent):
                        bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
                    elif event.stage:
                        bar.set_postfix_str(event.stage, refresh=False)
                    bar.refresh()
            elif isinstance(event, LogEvent):
                if bar is not None:
                    bar.write(
                        ("warning: " if event.level == "warning" else "") + event.message, file=sys.stderr
                    )
                else:
                    say(("warning: " if event.level == "warning" else "") + event.message, err=True)
            elif isinstance(event, FinishedEvent):
                finished = event
            elif isinstance(event, CheckpointEvent | PreviewEvent):
                pass
    except KeyboardInterrupt:
        events.close()
        if bar is not None:
            bar.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    if finished is None:
        raise DagmanError(f"{desc} ended without a result")
    return finished


def drive_result(events: Generator[Any, None, Any], *, desc: str, quiet: bool = False) -> Any:
    """Run a generator of `ProgressEvent`/`LogEvent` with a progress bar and return its return value."""
    from tqdm import tqdm

    bar = None
    try:
        while True:
            event = next(events)
            if isinstance(event, ProgressEvent) and is_main_process() and not quiet:
                if bar is None:
                    bar = tqdm(total=event.total, desc=desc, dynamic_ncols=True, file=sys.stderr)
                elif bar.total != event.total:  # a job of stages (the demo): each stage counts on its own total
                    bar.reset(total=event.total)
                if event.stage:
                    bar.set_description(f"{desc}: {event.stage}", refresh=False)
                bar.n = event.done
                bar.refresh()
            elif isinstance(event, LogEvent):
                say(("warning: " if event.level == "warning" else "") + event.message, err=True)
    except StopIteration as stop:
        return stop.value
    except KeyboardInterrupt:
        events.close()
        raise
    finally:
        if bar is not None:
            bar.close()
