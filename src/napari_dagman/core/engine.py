"""The pretraining loop as a generator of typed events.

``run_pretraining(config)`` yields `LogEvent`, `StepEvent`, `PreviewEvent`, `CheckpointEvent` and finally a
`FinishedEvent`. The GUI runs it in a napari worker, the CLI with a progress bar, ``torchrun`` on several
processes (DistributedDataParallel). Stopping it - a `CancelToken`, or closing the generator - saves a
resumable checkpoint at the current step first.

Exact resume: every random draw of step ``k`` (crops, masks, teacher noise, stochastic depth) comes from
generators seeded by ``(seed, k, rank)``, and the learning rate, EMA momentum and teacher temperature are
functions of ``k``; a checkpoint stores weights, method buffers (distillation centres) and optimiser state. A
run resumed at step ``k`` therefore repeats the uninterrupted run's steps ``k+1...`` bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_dagman.core.checkpoint import (
    BEST_FILE,
    MODEL_FILE,
    RESUME_FILE,
    SNAPSHOT_DIR,
    RunFolder,
    check_state_fits,
    load_optimizer_state,
    load_tensors,
    optimizer_tensors,
    prefixed,
    save_tensors,
    strip_prefix,
)
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.data import PreparedVolume, ViewSampler, prepare_volume
from napari_dagman.core.devices import resolve_device
from napari_dagman.core.errors import CheckpointError, DagmanError, DagmanInputError
from napari_dagman.core.events import (
    CancelToken,
    CheckpointEvent,
    FinishedEvent,
    LogEvent,
    PreviewEvent,
    StepEvent,
)
from napari_dagman.core.methods.base import SSLMethod
from napari_dagman.core.methods.losses import learning_rate
from napari_dagman.core.methods.registry import get_method
from napari_dagman.core.models.architecture import Architecture, architecture_for
from napari_dagman.core.models.encoder import set_fused_window_attention
from napari_dagman.core.probes import PROBE_FILE, probe_crops, probe_head_diversity
from napari_dagman.core.volume import Volume, grid_placement

Event = Any  # one of the dataclasses in core.events

#: Keys of a pretraining config that shape the network or the method: a resumed run must keep them.
ARCHITECTURE_KEYS = ("method", "preset", "dims", "roi", "mask_cell", "attention_stage", "out_dim")


# --- configuration ------------------------------------------------------------------------------------------
def resolve_config(config: PretrainConfig, num_volumes: int) -> PretrainConfig:
    """Fill every "default" (None) field: method defaults from the registry, step counts and schedules."""
    spec = get_method(config.method)
    data = config.to_dict()
    for key, value in spec.defaults.items():
        if data.get(key) is None:
            data[key] = value
    for key, value in (("w_global", 0.1), ("w_patch", 0.1), ("w_rec", 1.0)):
        if data[key] is None:
            data[key] = value
    steps = config.total_steps(num_volumes)
    data["steps"], data["epochs"] = steps, None
    if data["lr"] is None:
        data["lr"] = 1e-4 * config.batch_size
    if data["warmup_steps"] is None:
        data["warmup_steps"] = int(round(0.1 * steps))
    if data["mask_warmup_steps"] is None:
        data["mask_warmup_steps"] = int(round(0.1 * steps))
    if data["teacher_temp_warmup"] is None:
        data["teacher_temp_warmup"] = int(round(0.3 * steps))
    if data["freeze_last_layer_steps"] is None:
        data["freeze_last_layer_steps"] = int(round(0.01 * steps))
    for key, value in (("masking_prob", 1.0), ("mask_ratio_jitter", 0.0)):
        if data[key] is None:
            data[key] = value
    return PretrainConfig.from_dict(data)


def build_architecture(config: PretrainConfig) -> Architecture:
    return architecture_for(
        config.preset,
        config.dims,
        drop_path=config.drop_path,
        attention_stage=config.attention_stage,
        out_dim=config.out_dim,
    )


def build_method(config: PretrainConfig, arch: Architecture | None = None) -> SSLMethod:
    """Instantiate the registered method for a resolved config (seeded initialisation)."""
    arch = arch or build_architecture(config)
    torch.manual_seed(config.seed)
    return get_method(config.method).load()(config, arch)


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed for one (run seed, step, process, stream): independent streams, reproducible."""
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


# --- distributed ----------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and not device_name.startswith(("cpu", "mps"))
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        return cls(rank, world, local, owns)

    def device(self, name: str) -> torch.device:
        if self.world_size > 1 and torch.cuda.is_available() and not name.startswith(("cpu", "mps")):
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return resolve_device(name)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --- checkpoints --------------------------------------------------------------------------------------------
def model_state(method: SSLMethod) -> dict[str, torch.Tensor]:
    """Weights to publish: student.* and (when the method has one) teacher.*."""
    state = prefixed(method.student_network.state_dict(), "student")
    if method.teacher is not None:
        state.update(prefixed(method.teacher.state_dict(), "teacher"))
    return state


def _buffers(method: SSLMethod) -> dict[str, torch.Tensor]:
    """Method-level state outside the networks (e.g. distillation centres)."""
    return {k: v for k, v in method.state_dict().items() if not k.startswith(("student.", "teacher."))}


def _metadata(config: PretrainConfig, arch: Architecture, step: int, **extra: Any) -> dict[str, str]:
    return {
        "architecture": arch.to_json(),
        "method": config.method,
        "step": str(step),
        "job": "pretrain",
        **{k: json.dumps(v) for k, v in extra.items()},
    }


def save_weights(
    path: Path, method: SSLMethod, config: PretrainConfig, arch: Architecture, step: int
) -> None:
    save_tensors(path, model_state(method), _metadata(config, arch, step))


def save_resume(
    path: Path,
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    config: PretrainConfig,
    arch: Architecture,
    step: int,
    tracker: dict[str, float],
) -> None:
    opt_tensors, opt_json = optimizer_tensors(optimizer)
    tensors = {**model_state(method), **prefixed(_buffers(method), "buffers"), **opt_tensors}
    save_tensors(path, tensors, _metadata(config, arch, step, tracker=tracker) | {"optimizer": opt_json})


def load_resume(
    path: Path, method: SSLMethod, optimizer: torch.optim.Optimizer, arch: Architecture
) -> tuple[int, dict[str, float]]:
    """Restore a resumable checkpoint; returns (step, loss tracker)."""
    tensors, meta = load_tensors(path)
    saved_arch = Architecture.from_dict(json.loads(meta["architecture"]))
    diff = arch.differences(saved_arch)
    if diff:
        raise CheckpointError(f"{path.name} was trained with another architecture: {'; '.join(diff)}")
    student = strip_prefix(tensors, "student")
    check_state_fits(method.student_network, student, path.name)
    method.student_network.load_state_dict(student)
    if method.teacher is not None:
        teacher = strip_prefix(tensors, "teacher")
        check_state_fits(method.teacher, teacher, path.name)
        method.teacher.load_state_dict(teacher)
    buffers = strip_prefix(tensors, "buffers")
    if buffers:
        method.load_state_dict(buffers, strict=False)
    load_optimizer_state(optimizer, tensors, meta["optimizer"])
    return int(meta["step"]), json.loads(meta.get("tracker", "{}"))


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and tokens (1-D parameters), as DINO/iBOT/SMIT do."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_step(
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    views: torch.Tensor,
    step: int,
    generator: torch.Generator,
    *,
    grad_clip: float,
    use_amp: bool,
) -> tuple[Any, float]:
    """One optimiser step (forward, finite-loss check, backward, clipping, update); the EMA is the caller's.

    Returns the method's `StepOutput` and the gradient norm before clipping (NaN when clipping is off).
    """
    method.train()
    autocast = (
        torch.autocast(views.device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    )
    with autocast:
        out = method.forward_step(views, step, generator)
    if not torch.isfinite(out.loss):
        raise DagmanError(
            f"the loss became {float(out.loss)} at step {step + 1}; the last good checkpoint is kept. "
            "Lower --lr or check the input intensities"
        )
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    method.after_backward(step)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else math.nan
    optimizer.step()
    return out, grad_norm


# --- inputs ---------------------------------------------------------------------------------------------------
def load_inputs(config: PretrainConfig, volumes: Sequence[Volume] | None) -> list[Volume]:
    """The volumes to train on: given ones, or every path in ``config.images`` (all checked before any write)."""
    if volumes:
        return list(volumes)
    if not config.images:
        raise DagmanInputError("no images given: pass image files or DICOM folders")
    from napari_dagman.core.io import read_volumes

    out: list[Volume] = []
    for path in config.images:
        try:
            out.extend(read_volumes(path))
        except DagmanInputError as err:
            raise DagmanInputError(f"cannot use {path}: {err}") from None
    return out


def prepare_inputs(config: PretrainConfig, volumes: Sequence[Volume]) -> list[PreparedVolume]:
    prepared = []
    for i, volume in enumerate(volumes):
        name = str(volume.metadata.get("name") or f"volume {i}")
        prepared.append(
            prepare_volume(
                volume,
                roi=config.roi,
                dims=config.dims,
                spacing=config.spacing,
                hu_range=(config.hu_min, config.hu_max),
                name=name,
            )
        )
    return prepared


def _preview(
    out,
    views: torch.Tensor,
    crops,
    prepared: list[PreparedVolume],
    config: PretrainConfig,
    arch: Architecture,
    step: int,
) -> PreviewEvent:
    """The first view of the batch, its class attention and its mask, placed in physical space."""
    crop = crops[0]
    pv = prepared[crop.volume]
    origin = pv.index_to_physical(crop.start)
    spacing = pv.spacing
    image = views[0, 0].detach().float().cpu().numpy()
    mask = out.mask[0].cpu().numpy().astype(np.uint8)
    unseen = None if out.unseen is None else out.unseen[0].cpu().numpy().astype(np.uint8)
    attention = None
    if out.attention is not None and out.attention.numel():
        attention = out.attention[0].float().cpu().numpy().reshape(out.attention.shape[1], *out.grid)
    if config.dims == 2:  # a slice: add the z axis back so it overlays the volume at its z
        image, mask = image[None], mask[None]
        unseen = None if unseen is None else unseen[None]
        attention = attention[:, None] if attention is not None else None
        cell_factor, token_factor = (
            (1, config.mask_cell, config.mask_cell),
            (1, arch.attention_stride, arch.attention_stride),
        )
    else:
        cell_factor, token_factor = config.mask_cell, arch.attention_stride
    mask_scale, mask_translate = grid_placement(origin, spacing, cell_factor)
    att_scale, att_translate = grid_placement(origin, spacing, token_factor)
    return PreviewEvent(
        step=step,
        image=image,
        image_scale=list(spacing),
        image_translate=[float(o) for o in origin],
        mask=mask,
        mask_scale=mask_scale,
        mask_translate=mask_translate,
        unseen=unseen,
        attention=attention,
        attention_scale=att_scale,
        attention_translate=att_translate,
        volume_name=pv.name,
        volume_index=crop.volume,
    )


# --- the loop -------------------------------------------------------------------------------------------------
def run_pretraining(
    config: PretrainConfig,
    volumes: Sequence[Volume] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str | None = None,
) -> Generator[Event, None, FinishedEvent]:
    """Pretrain and yield events; returns (and yields last) the `FinishedEvent`.

    Parameters
    ----------
    config
        The job; ``config.out`` is the run folder.
    volumes
        In-memory volumes (the GUI's layers); when None, ``config.images`` are read.
    resume
        Continue the run in ``config.out`` from its resumable checkpoint.
    cancel
        Checked before every step; when set, the run saves a checkpoint and finishes as cancelled.
    command
        What started the run, recorded in run.json.
    """
    config.validate()
    if not config.out:
        raise DagmanInputError("no run folder given (--out)")
    run = RunFolder(config.out)
    dist = DistContext.from_env(config.device)
    method: SSLMethod | None = None
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        device = dist.device(config.device)

        # everything that can be wrong with the inputs is found before the run folder is touched
        if resume:
            if not run.file(RESUME_FILE).is_file():
                raise CheckpointError(f"nothing to resume in {run.path}: no {RESUME_FILE}")
            saved = PretrainConfig.from_dict(run.config_dict(), strict=False)
            changed = [k for k in ARCHITECTURE_KEYS if getattr(saved, k) != getattr(config, k)]
            if changed:
                details = ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in changed)
                raise CheckpointError(f"cannot resume {run.path} with a different model: {details}")
            if not config.images and not volumes:
                config = config.replace(images=saved.images)
        elif run.has_checkpoint():
            raise DagmanInputError(
                f"{run.path} already holds a run; pass --resume to continue it or choose a new --out"
            )

        raw = load_inputs(config, volumes)
        prepared = prepare_inputs(config, raw)
        config = resolve_config(config, len(prepared))
        arch = build_architecture(config)
        total = int(config.steps or 1)

        method = build_method(config, arch).to(device)
        set_fused_window_attention(method, config.fused_attention)
        optimizer = torch.optim.AdamW(
            parameter_groups(method.student, config.weight_decay), lr=config.lr, betas=(0.9, 0.999)
        )
        start, tracker = 0, {"running_loss": math.inf, "best_loss": math.inf}
        if resume:
            start, tracker = load_resume(run.file(RESUME_FILE), method, optimizer, arch)
            if start >= total:
                raise DagmanInputError(
                    f"{run.path} already finished {start} of {total} steps; pass more --steps to continue"
                )

        if dist.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_config({**config.to_dict(), "architecture": arch.to_dict(), "job": "pretrain"})
            if resume:
                run.truncate_metrics(start)
            run.begin_run_info(
                "pretrain",
                resume_step=start if resume else None,
                command=command,
                data=[
                    {
                        "name": p.name,
                        "sha256": p.source_hash,
                        "shape": list(p.array.shape),
                        "spacing": list(p.spacing),
                    }
                    for p in prepared
                ],
                device=device,
                total_steps=total,
                method=config.method,
                seed=config.seed,
                world_size=dist.world_size,
            )
        dist.barrier()

        for pv in prepared:
            for note in pv.notes:
                yield LogEvent(note, "warning")
        yield LogEvent(
            f"{config.method} on {len(prepared)} volume(s), preset {config.preset} {config.dims}D, ROI {config.roi}, "
            f"{total} steps on {device}" + (f" (resuming at step {start})" if resume else "")
        )

        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            method.student = DistributedDataParallel(
                method.student,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=method.find_unused_parameters,
            )

        sampler = ViewSampler(
            prepared,
            roi=config.roi,
            dims=config.dims,
            batch_size=config.batch_size,
            seed=config.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        probes = None
        if config.probe_every and dist.is_main and method.attention_encoders():
            probes = probe_crops(run.file(PROBE_FILE), sampler, config.probe_crops, config.seed)
        use_amp = config.amp and device.type == "cuda"
        step = start
        saved_step = start
        params = [p for g in optimizer.param_groups for p in g["params"]]
        steps_per_epoch = max(1, -(-len(prepared) // (config.batch_size * dist.world_size)))

        def save(kind: str) -> list[CheckpointEvent]:
            """Write the resumable state and the weights; 'best' and snapshots when due (main process only)."""
            nonlocal saved_step
            events: list[CheckpointEvent] = []
            if not dist.is_main:
                return events
            save_resume(run.file(RESUME_FILE), method, optimizer, config, arch, step, tracker)
            save_weights(run.file(MODEL_FILE), method, config, arch, step)
            events.append(CheckpointEvent(step, str(run.file(MODEL_FILE)), "last"))
            if tracker["running_loss"] < tracker["best_loss"]:
                tracker["best_loss"] = tracker["running_loss"]
                save_weights(run.file(BEST_FILE), method, config, arch, step)
                events.append(CheckpointEvent(step, str(run.file(BEST_FILE)), "best"))
            if kind == "snapshot":
                path = run.file(SNAPSHOT_DIR) / f"step_{step:06d}.safetensors"
                save_weights(path, method, config, arch, step)
                events.append(CheckpointEvent(step, str(path), "snapshot"))
            saved_step = step
            return events

        cancelled = False
        try:
            while step < total:
                if cancel is not None and cancel.cancelled:
                    cancelled = True
                    break
                t0 = time.perf_counter()
                lr = learning_rate(
                    step, total, peak=config.lr, warmup=config.warmup_steps or 0, final=config.min_lr
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(step_seed(config.seed, step, dist.rank, 0))
                generator = torch.Generator().manual_seed(step_seed(config.seed, step, dist.rank, 1))
                views_np, crops = sampler.sample(step)
                views = torch.from_numpy(views_np).to(device, non_blocking=True)

                out, grad_norm = train_step(
                    method,
                    optimizer,
                    params,
                    views,
                    step,
                    generator,
                    grad_clip=config.grad_clip,
                    use_amp=use_amp,
                )
                extras = {**out.extras, **method.after_optimizer_step(step)}
                step += 1
                if probes is not None and (step % config.probe_every == 0 or step in (1, total)):
                    extras.update(probe_head_diversity(method.attention_encoders(), probes, device))
                for warning in out.warnings:
                    yield LogEvent(warning, "warning")
                seconds = time.perf_counter() - t0
                loss = float(out.loss.detach())
                tracker["running_loss"] = (
                    loss
                    if not math.isfinite(tracker["running_loss"])
                    else (0.9 * tracker["running_loss"] + 0.1 * loss)
                )

                event = StepEvent(
                    step=step,
                    total_steps=total,
                    loss=loss,
                    terms=out.terms,
                    lr=lr,
                    seconds_per_step=seconds,
                    samples_per_second=views.shape[0] * dist.world_size / max(seconds, 1e-9),
                    extras={**extras, "grad_norm": grad_norm},
                    epoch=step / steps_per_epoch,
                )
                if dist.is_main and (step % config.log_every == 0 or step == total):
                    run.append_metrics(
                        {
                            "step": step,
                            "loss": loss,
                            **out.terms,
                            "lr": lr,
                            "seconds": seconds,
                            **event.extras,
                            "time": time.time(),
                        }
                    )
                yield event
                if config.preview_every and (step % config.preview_every == 0 or step == 1):
                    yield _preview(out, views, crops, prepared, config, arch, step)
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    yield from save("snapshot")
                elif step % config.save_every == 0 or step == total:
                    yield from save("last")
        except GeneratorExit:
            # the consumer closed us (GUI cancel, Ctrl-C in the CLI): keep the progress, then stop
            if step > saved_step:
                save("last")
            _finish_run_info(run, dist, "cancelled", step)
            raise

        if step > saved_step:
            yield from save("last")
        status = "cancelled" if cancelled else "completed"
        _finish_run_info(run, dist, status, step, tracker)
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
            summary={"best_loss": tracker["best_loss"], "final_running_loss": tracker["running_loss"]},
        )
        yield finished
        return finished
    except DagmanError as err:
        _finish_run_info(run, dist, f"failed: {err}", None)
        raise
    finally:
        if method is not None:
            del method
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        dist.close()


def _finish_run_info(
    run: RunFolder, dist: DistContext, status: str, step: int | None, tracker: dict[str, float] | None = None
) -> None:
    if dist.is_main:
        run.finish_run_info(status, step, **({"best_running_loss": tracker["best_loss"]} if tracker else {}))


def consume(events: Generator[Event, None, FinishedEvent]) -> FinishedEvent:
    """Run a job generator to the end, returning its `FinishedEvent` (for scripts and tests)."""
    finished = None
    for event in events:
        if isinstance(event, FinishedEvent):
            finished = event
    if finished is None:
        raise DagmanError("the job ended without finishing")
    return finished
