"""Weights and resumable state of a training task, as safetensors files (no pickle, written atomically).

A weights file holds ``<module>.<parameter>`` for every module of `TrainingTask.state_modules` (e.g.
``student.*`` and ``teacher.*``, or ``model.*``); a resumable file adds ``buffers.*`` (`extra_state`) and the
optimiser state. Non-finite weights are never written: a checkpoint on disk is always a usable one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from napari_dagman.core.checkpoint import (
    check_state_fits,
    load_optimizer_state,
    load_tensors,
    optimizer_tensors,
    prefixed,
    save_tensors,
    strip_prefix,
)
from napari_dagman.core.errors import CheckpointError, DagmanError
from napari_dagman.core.training.task import TrainingTask


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def task_weights(task: TrainingTask) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, module in task.state_modules().items():
        out.update(prefixed(module.state_dict(), name))
    return out


def _metadata(task: TrainingTask, step: int, **extra: Any) -> dict[str, str]:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in task.weights_metadata().items()}
    meta["step"] = str(step)
    meta["job"] = task.job
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    return meta


def _checked(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    bad = non_finite_tensors(tensors)
    if bad:
        raise DagmanError(
            f"not writing {path.name}: {len(bad)} tensors hold NaN or infinity (e.g. {bad[0]}); the last "
            "checkpoint on disk is kept"
        )
    return tensors


def save_weights(path: Path, task: TrainingTask, step: int) -> None:
    save_tensors(path, _checked(task_weights(task), path), _metadata(task, step))


def save_resume(
    path: Path, task: TrainingTask, optimizer: torch.optim.Optimizer, step: int, tracker: dict[str, Any]
) -> None:
    opt_tensors, opt_json = optimizer_tensors(optimizer)
    tensors = {**task_weights(task), **prefixed(task.extra_state(), "buffers"), **opt_tensors}
    meta = _metadata(task, step, tracker=tracker) | {"optimizer": opt_json}
    save_tensors(path, _checked(tensors, path), meta)


def load_resume(
    path: Path, task: TrainingTask, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    """Restore a resumable checkpoint into ``task`` and ``optimizer``; returns (step, tracker)."""
    tensors, meta = load_tensors(path)
    if meta.get("job", task.job) != task.job:
        raise CheckpointError(f"{path.name} is a {meta.get('job')} checkpoint, not a {task.job} one")
    task.check_checkpoint(meta, path.name)
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{path.name} holds NaN or infinity (e.g. {bad[0]}); it cannot be resumed")
    for name, module in task.state_modules().items():
        state = strip_prefix(tensors, name)
        check_state_fits(module, state, path.name)
        module.load_state_dict(state)
    buffers = strip_prefix(tensors, "buffers")
    if buffers:
        task.load_extra_state(buffers)
    if "optimizer" not in meta:
        raise CheckpointError(f"{path.name} holds no optimiser state: it is not a resumable checkpoint")
    load_optimizer_state(optimizer, tensors, meta["optimizer"])
    try:
        step = int(meta["step"])
        tracker = json.loads(meta.get("tracker", "{}"))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path.name} has unreadable metadata ({err})") from None
    if step < 0 or not isinstance(tracker, dict):
        raise CheckpointError(f"{path.name} has unreadable metadata (step {step})")
    return step, tracker
