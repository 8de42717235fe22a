"""The one training loop, as a generator of typed events, for every task (pretraining, fine-tuning).

``run_training(task)`` yields `LogEvent`, `StepEvent`, the task's own events (previews, validations),
`CheckpointEvent` and finally a `FinishedEvent`. The GUI runs it in a worker or a child process, the CLI with a
progress bar, ``torchrun`` on several processes (DistributedDataParallel over every trained module).

Exact resume: every random draw of step ``k`` (crops, masks, noise, stochastic depth) comes from generators
seeded by ``(seed, k, rank)``, and every schedule is a function of ``k``; a checkpoint stores weights, task
buffers and optimiser state. A run resumed at ``k`` therefore repeats the uninterrupted run's steps ``k+1...``
bit for bit on CPU.

Finite checks: a step whose loss or gradient is not finite, or that leaves a parameter non-finite, stops the
run with one line; checkpoints are only written from finite weights, so the last one on disk is usable.

Cancel contract (the same for every job): a `CancelToken`, checked before every step, or closing the
generator, stops the run at a step boundary; a training job then saves a resumable checkpoint and finishes with
``cancelled=True``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Iterable
from typing import Any

import torch
from torch import nn

from napari_dagman.core.checkpoint import BEST_FILE, MODEL_FILE, RESUME_FILE, SNAPSHOT_DIR, RunFolder, RunLock
from napari_dagman.core.errors import CheckpointError, DagmanError, DagmanInputError, first_line
from napari_dagman.core.events import CancelToken, CheckpointEvent, FinishedEvent, LogEvent, StepEvent
from napari_dagman.core.io import check_output_folder
from napari_dagman.core.memory import out_of_memory
from napari_dagman.core.methods.losses import learning_rate
from napari_dagman.core.training.distributed import DistContext, step_seed
from napari_dagman.core.training.precision import autocast_for, compile_modules, speed_settings
from napari_dagman.core.training.state import load_resume, save_resume, save_weights
from napari_dagman.core.training.task import StepResult, TrainingTask, new_tracker
from napari_dagman.core.training.tensorboard import TensorBoardWriter, require_tensorboard, tee_events

Event = Any  # one of the dataclasses in core.events


def parameter_groups(modules: nn.Module | Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms (1-D parameters) and learnt tokens (the class token, the mask token), as
    DINO/iBOT/SMIT/CaiT do: decay would pull a token towards zero, which carries no regularising meaning."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(modules: list[nn.Module], config: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``modules``, as every training job uses it; fused into one kernel where torch has one (CPU,
    CUDA): about 5x faster than the per-tensor update, which counts for decoders with millions of weights."""
    groups = parameter_groups(modules, config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))


def parameters_finite(params: list[torch.Tensor]) -> bool:
    """True when every parameter is finite (one fused reduction, not one check per tensor)."""
    if not params:
        return True
    norms = torch._foreach_norm([p.detach() for p in params])
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def optimizer_step(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    step: int,
    generator: torch.Generator,
    device: torch.device,
    *,
    grad_clip: float,
    precision: str = "fp32",
) -> tuple[StepResult, float]:
    """One optimiser step: forward (in ``precision``: fp32 or bf16 autocast), finite checks, backward, clipping,
    update. Returns (result, grad norm)."""
    with autocast_for(device, precision):
        result = task.step(step, generator, device)
    if not torch.isfinite(result.loss):
        raise DagmanError(
            f"the loss became {float(result.loss)} at step {step + 1}; the last good checkpoint is kept. "
            "Lower --lr or check the input intensities"
        )
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    task.after_backward(step)
    # the norm is computed even without clipping (an infinite limit clips nothing): it is the gradient check
    limit = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    if not math.isfinite(grad_norm):
        raise DagmanError(
            f"the gradients became non-finite at step {step + 1}; the last good checkpoint is kept. Lower --lr"
        )
    optimizer.step()
    if not parameters_finite(params):
        raise DagmanError(
            f"step {step + 1} made weights non-finite (NaN or infinity); the run stops with the last finite "
            "checkpoint on disk. Lower --lr"
        )
    return result, grad_norm if grad_clip > 0 else math.nan


def run_training(
    task: TrainingTask,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str | None = None,
) -> Generator[Event, None, FinishedEvent]:
    """Train ``task`` and yield events; returns (and yields last) the `FinishedEvent`.

    ``resume`` continues the run in ``task.config.out`` from its resumable checkpoint; ``cancel`` is checked
    before every step; ``command`` is recorded in run.json.
    """
    config = task.config
    config.validate()
    if not config.out:
        raise DagmanInputError("no run folder given (--out)")
    if getattr(config, "tensorboard", False):
        require_tensorboard()  # one line now, not a traceback after the data are read
    run = RunFolder(config.out)
    dist = DistContext.from_env(config.device)
    lock = RunLock(run.path)
    notes: list[str] = []
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        device = dist.device(config.device)

        # everything that can be wrong with the inputs is found before the run folder is touched; a folder
        # that exists is locked first, so that a job running there is named rather than its half-written run
        check_output_folder(run.path, "run folder")
        if dist.is_main and run.exists:
            notes += _take(lock, run, command)
        _check_start(run, resume)
        yield from task.preparing(run, resume, dist, cancel)
        config = task.config
        total = task.total_steps
        task.build(device, dist)
        speed = speed_settings(getattr(config, "precision", "fp32"), bool(getattr(config, "compile", False)), device)
        task.precision = speed.precision
        notes += speed.notes
        if speed.compiled:
            compile_modules([*task.trained_modules().values(), *task.ema_modules().values()])
        optimizer = make_optimizer(list(task.trained_modules().values()), config, device)
        start, tracker = 0, new_tracker()
        if resume:
            start, saved_tracker = load_resume(run.file(RESUME_FILE), task, optimizer)
            tracker.update(saved_tracker)
            if start >= total:
                raise DagmanInputError(
                    f"{run.path} already finished {start} of {total} steps; pass more --steps to continue"
                )

        if dist.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            if not lock.held:  # a new folder: another job may have started in it while this one prepared
                notes += _take(lock, run, command)
                _check_start(run, resume)
            run.write_config(task.run_config())
            if resume:
                run.truncate_metrics(start)
            run.begin_run_info(
                task.job,
                resume_step=start if resume else None,
                command=command,
                data=task.data_records,
                device=device,
                total_steps=total,
                seed=config.seed,
                world_size=dist.world_size,
                **task.run_info(),
                **speed.record(),
            )
        dist.barrier()
        task.begin(run, dist.is_main, start)

        for note in [*notes, *task.notes]:
            yield LogEvent(note, "warning")
        for message in task.start_messages(start, resume):
            yield LogEvent(message)

        wrapper = dist.wrapper(device, task.find_unused_parameters)
        if wrapper is not None:
            task.wrap_trained(wrapper)
        steps = _steps(task, run, dist, optimizer, device, start, total, tracker, cancel)
        if getattr(config, "tensorboard", False) and dist.is_main:
            steps = tee_events(steps, TensorBoardWriter(run.path, start_step=start))
        return (yield from steps)
    except Exception as err:  # a bug too: run.json must not say "running" after the job has ended
        failure = _record_failure(run, dist.is_main, err)
        if failure is not err:
            raise failure from None
        raise
    finally:
        lock.release()
        task.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        dist.close()


def _record_failure(run: RunFolder, is_main: bool, err: Exception) -> Exception:
    """Mark the run failed, with the reason; returns what to raise: an out-of-memory while the data were prepared
    or the model built becomes one line, anything else is raised as it is."""
    failure: Exception = err
    if out_of_memory(err) and not isinstance(err, DagmanError):
        failure = DagmanInputError(
            f"out of memory before the first step ({first_line(err)}): use a coarser --spacing, a smaller --roi "
            "or fewer volumes"
        )
    if is_main:
        reason = str(failure) if isinstance(failure, DagmanError) else f"{type(err).__name__}: {err}"
        run.finish_run_info(f"failed: {reason}", None)
    return failure


def _out_of_memory_in_step(err: BaseException, step: int, total: int, saved_step: int) -> DagmanInputError:
    """One line for an allocation that failed in a step: the step's tensors are gone with the exception, and
    what is on disk is whole and resumable."""
    kept = (
        f"the run keeps step {saved_step}: continue it with --resume"
        if saved_step
        else "nothing was saved yet: start again"
    )
    return DagmanInputError(
        f"out of memory at step {step} of {total} ({first_line(err)}); {kept} after lowering --roi or --batch-size"
    )


def _take(lock: RunLock, run: RunFolder, command: str | None) -> list[str]:
    """Lock the run folder for this job, and clean up after a job that was killed there (what to tell)."""
    lock.acquire(command)
    return run.recover()


def _check_start(run: RunFolder, resume: bool) -> None:
    """Refuse to resume nothing, and to start a new run over an existing one."""
    if resume and not run.file(RESUME_FILE).is_file():
        raise CheckpointError(f"nothing to resume in {run.path}: no {RESUME_FILE}")
    if not resume and run.has_checkpoint():
        raise DagmanInputError(
            f"{run.path} already holds a run; pass --resume to continue it or choose a new --out"
        )


class _Saver:
    """When and what the loop writes: the resumable state and 'last' weights, 'best', snapshots (main process)."""

    def __init__(
        self,
        task: TrainingTask,
        run: RunFolder,
        optimizer: torch.optim.Optimizer,
        dist: DistContext,
        tracker: dict[str, Any],
        start: int,
    ) -> None:
        self.task, self.run, self.optimizer, self.dist, self.tracker = task, run, optimizer, dist, tracker
        self.saved_step = start

    def save(self, step: int, kind: str) -> list[CheckpointEvent]:
        """The resumable state and the weights; 'best' (by running loss, without validation) and snapshots."""
        events: list[CheckpointEvent] = []
        if not self.dist.is_main:
            return events
        task, run, tracker = self.task, self.run, self.tracker
        try:
            save_resume(run.file(RESUME_FILE), task, self.optimizer, step, tracker)
        except DagmanError as err:  # a full disk: every file on disk is still whole, and says which step
            kept = f"the checkpoint of step {self.saved_step} is kept" if self.saved_step else "no checkpoint yet"
            raise type(err)(f"{err}; {kept}") from None
        save_weights(run.file(MODEL_FILE), task, step)
        events.append(CheckpointEvent(step, str(run.file(MODEL_FILE)), "last"))
        if not task.validates and tracker["running_loss"] < tracker["best_loss"]:
            tracker.update(best_loss=tracker["running_loss"], best_step=step)
            save_weights(run.file(BEST_FILE), task, step)
            events.append(CheckpointEvent(step, str(run.file(BEST_FILE)), "best"))
        if kind == "snapshot":
            path = run.file(SNAPSHOT_DIR) / f"step_{step:06d}.safetensors"
            save_weights(path, task, step)
            events.append(CheckpointEvent(step, str(path), "snapshot"))
        self.saved_step = step
        return events

    def validation(self, step: int, device: torch.device) -> Generator[Event, None, None]:
        """Validate, yielding its progress and then its events; a better score saves 'best'."""
        task, run, tracker = self.task, self.run, self.tracker
        events, score = yield from task.validate(step, device, tracker)
        record = task.validation_record(tracker)
        if self.dist.is_main and record is not None:
            run.append_metrics({**record, "time": time.time()})
        if self.dist.is_main and math.isfinite(score) and score > tracker["best_score"]:
            tracker.update(best_score=score, best_step=step)
            save_weights(run.file(BEST_FILE), task, step)
            events.append(CheckpointEvent(step, str(run.file(BEST_FILE)), "best"))
        yield from events


def metrics_record(event: StepEvent) -> dict[str, Any]:
    """The metrics.jsonl line of a step."""
    return {
        "step": event.step,
        "kind": "train",
        "loss": event.loss,
        **event.terms,
        "lr": event.lr,
        "seconds": event.seconds_per_step,
        **event.extras,
        "time": time.time(),
    }


def _steps(
    task: TrainingTask,
    run: RunFolder,
    dist: DistContext,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    start: int,
    total: int,
    tracker: dict[str, Any],
    cancel: CancelToken | None,
) -> Generator[Event, None, FinishedEvent]:
    config = task.config
    params = [p for g in optimizer.param_groups for p in g["params"]]
    steps_per_epoch = task.steps_per_epoch(dist.world_size)
    checkpoint_every = int(config.checkpoint_every or 0)
    step = start
    saver = _Saver(task, run, optimizer, dist, tracker, start)
    cancelled = False
    try:
        while step < total:
            if cancel is not None and cancel.cancelled:
                cancelled = True
                break
            t0 = time.perf_counter()
            lr = learning_rate(step, total, peak=config.lr, warmup=config.warmup_steps or 0, final=config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(step_seed(config.seed, step, dist.rank, 0))
            generator = torch.Generator().manual_seed(step_seed(config.seed, step, dist.rank, 1))
            result, grad_norm = optimizer_step(
                task, optimizer, params, step, generator, device, grad_clip=config.grad_clip, precision=task.precision
            )
            extras = {**result.extras, **task.after_optimizer_step(step, device), "grad_norm": grad_norm}
            step += 1
            seconds = time.perf_counter() - t0
            loss = float(result.loss.detach())
            running = tracker["running_loss"]
            tracker["running_loss"] = loss if not math.isfinite(running) else 0.9 * running + 0.1 * loss
            for warning in [*result.warnings, *task.after_step(step, extras)]:
                yield LogEvent(warning, "warning")
            event = StepEvent(
                step=step,
                total_steps=total,
                loss=loss,
                terms=result.terms,
                lr=lr,
                seconds_per_step=seconds,
                samples_per_second=task.samples() * dist.world_size / max(seconds, 1e-9),
                extras=extras,
                epoch=step / steps_per_epoch,
            )
            if dist.is_main and (step % config.log_every == 0 or step == total):
                run.append_metrics(metrics_record(event))
            yield event
            yield from task.events_after_step(step, result)
            if task.validates and task.validation_due(step):
                yield from saver.validation(step, device)
            if checkpoint_every and step % checkpoint_every == 0:
                yield from saver.save(step, "snapshot")
            elif step % config.save_every == 0 or step == total:
                yield from saver.save(step, "last")
    except Exception as err:
        if not out_of_memory(err):
            raise
        raise _out_of_memory_in_step(err, step + 1, total, saver.saved_step) from None
    except GeneratorExit:
        # the consumer closed us (GUI cancel, Ctrl-C in the CLI): keep the progress, then stop
        if step > saver.saved_step:
            saver.save(step, "last")
        if dist.is_main:
            run.finish_run_info("cancelled", step, **task.finish_info(tracker))
        raise

    if step > saver.saved_step:
        yield from saver.save(step, "last")
    if dist.is_main and not run.file(BEST_FILE).is_file():  # stopped before the first validation
        save_weights(run.file(BEST_FILE), task, step)
    if dist.is_main:
        run.finish_run_info("cancelled" if cancelled else "completed", step, **task.finish_info(tracker))
    finished = FinishedEvent(
        run_dir=str(run.path),
        steps_done=step,
        total_steps=total,
        cancelled=cancelled,
        paths={
            "last": str(run.file(MODEL_FILE)),
            "best": str(run.file(BEST_FILE)),
            "resume": str(run.file(RESUME_FILE)),
        },
        summary=task.summary(tracker),
    )
    yield finished
    return finished


def consume(events: Generator[Event, None, FinishedEvent]) -> FinishedEvent:
    """Run a job generator to the end, returning its `FinishedEvent` (for scripts and tests)."""
    finished = None
    for event in events:
        if isinstance(event, FinishedEvent):
            finished = event
    if finished is None:
        raise DagmanError("the job ended without finishing")
    return finished
