"""Helpers shared by the subcommands: driving a job generator with a progress bar."""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from typing import Any

from napari_dagman.core.errors import DagmanError
from napari_dagman.core.events import (
    CheckpointEvent,
    FinishedEvent,
    LogEvent,
    PreviewEvent,
    ProgressEvent,
    StepEvent,
)


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (they stay quiet)."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str, *, err: bool = False) -> None:
    if is_main_process():
        print(message, file=sys.stderr if err else sys.stdout, flush=True)


def drive(events: Generator[Any, None, Any], *, desc: str, quiet: bool = False) -> FinishedEvent:
    """Run a job generator with a tqdm bar; Ctrl-C closes it (the job saves its state) and re-raises."""
    from tqdm import tqdm

    show = is_main_process() and not quiet
    bar = None
    finished: FinishedEvent | None = None
    try:
        for event in events:
            if isinstance(event, StepEvent | ProgressEvent):
                total = event.total_steps if isinstance(event, StepEvent) else event.total
                done = event.step if isinstance(event, StepEvent) else event.done
                if bar is None and show:
                    bar = tqdm(
                        total=total,
                        initial=done - 1 if isinstance(event, StepEvent) else 0,
                        desc=desc,
                        unit="step" if isinstance(event, StepEvent) else "it",
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
