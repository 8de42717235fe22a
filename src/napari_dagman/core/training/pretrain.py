"""Self-supervised pretraining as a task on the training loop: any registered method, on CT volumes.

``run_pretraining(config)`` is the job the CLI, the pretraining dock and ``torchrun`` run. The task reads and
prepares the volumes, builds the method from the registry (its options from ``config.options``), draws paired
views per step, asks the method for its loss, keeps fixed probe crops for head-diversity measurements, and
turns a step's output into a preview (the crop, the attention, the mask) placed on the CT.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dagman.core.augment import Augmentation
from napari_dagman.core.checkpoint import RunFolder
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.data import PreparedVolume, ViewSampler
from napari_dagman.core.devices import resolve_device
from napari_dagman.core.diversity import CollapseAlarm
from napari_dagman.core.errors import CheckpointError, DagmanInputError, LabelMapAsCTError
from napari_dagman.core.events import CancelToken, FinishedEvent, PreviewEvent
from napari_dagman.core.io import label_map_message
from napari_dagman.core.memory import check_training_memory
from napari_dagman.core.methods.base import InputSpec, SSLMethod, StepOutput
from napari_dagman.core.methods.registry import get_method
from napari_dagman.core.models.architecture import Architecture, architecture_for
from napari_dagman.core.models.encoder import set_fused_window_attention
from napari_dagman.core.probes import PROBE_FILE, probe_collapse, probe_crops, probe_head_diversity
from napari_dagman.core.resident_volumes import ResidentVolumes
from napari_dagman.core.training.distributed import DistContext
from napari_dagman.core.training.inputs import PrepareSettings, prepare_one, prepare_sources
from napari_dagman.core.training.loop import run_training
from napari_dagman.core.training.task import StepResult, TrainingTask
from napari_dagman.core.volume import Volume, grid_placement
from napari_dagman.core.volume_cache import VolumeCache

#: Keys of a pretraining config that shape the network or the method: a resumed run must keep them.
ARCHITECTURE_KEYS = ("method", "preset", "dims", "roi", "mask_cell", "attention_stage", "out_dim")


# --- configuration ------------------------------------------------------------------------------------------
def resolve_config(config: PretrainConfig, num_volumes: int) -> PretrainConfig:
    """Fill every default: the method's options (preset, then step-dependent), steps, learning rate, warm-up."""
    steps = config.total_steps(num_volumes)
    options = config.method_options().resolve(steps)
    data = config.to_dict()
    data[config.method] = options.to_dict()
    data["steps"], data["epochs"] = steps, None
    if data["lr"] is None:
        data["lr"] = 1e-4 * config.batch_size
    if data["warmup_steps"] is None:
        data["warmup_steps"] = int(round(0.1 * steps))
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
    options = config.method_options().resolve(int(config.steps or 1))
    torch.manual_seed(config.seed)
    method = get_method(config.method).load()(config, options, arch)
    if config.class_attention_init == "pytorch":
        reset_class_attention(method, config.seed)
    return method


def reset_class_attention(module: nn.Module, seed: int = 0) -> None:
    """PyTorch's default initialisation for every class-attention linear layer in ``module``. Each block draws from
    a stream seeded by its path below the network that holds it, so an EMA teacher's block gets the same weights as
    its student's (it still starts as a copy) while the blocks of one encoder differ."""
    import zlib

    from napari_dagman.core.models.encoder import ClassAttentionBlock

    with torch.random.fork_rng(devices=[]):
        for name, block in module.named_modules():
            if not isinstance(block, ClassAttentionBlock):
                continue
            inside = name.split(".", 1)[
                -1
            ]  # "student.encoder.class_attention.blocks.0" -> "encoder.class_..."
            torch.manual_seed(seed + zlib.crc32(inside.encode()))
            for layer in block.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()


# --- inputs ---------------------------------------------------------------------------------------------------
def prepare_inputs(config: PretrainConfig, volumes: Sequence[Volume], scale: int = 1) -> list[PreparedVolume]:
    """Model-ready volumes (in memory), each padded so that one crop of ``scale`` x the ROI fits."""
    settings = PrepareSettings(
        dims=config.dims, spacing=config.spacing, hu_range=(config.hu_min, config.hu_max), roi=config.roi * scale
    )
    return [
        prepare_one(v, settings, str(v.metadata.get("name") or f"volume {i}"))["volume"] for i, v in enumerate(volumes)
    ]


# --- the task -----------------------------------------------------------------------------------------------------
class PretrainTask(TrainingTask):
    """Pretraining of one registered method (see `core.methods.base.SSLMethod`)."""

    job = "pretrain"

    def __init__(
        self, config: PretrainConfig, volumes: Sequence[Volume] | None = None, *, with_images: bool = False
    ) -> None:
        super().__init__(config)
        self.volumes = volumes
        #: read ``config.images`` besides ``volumes`` (the dock: layers and files); without volumes they always are
        self.with_images = with_images
        #: where the files' prepared volumes came from (run.json): the cache folder, found / prepared counts
        self.cache_record: dict[str, Any] | None = None
        self.method: SSLMethod | None = None
        self.arch: Architecture | None = None
        self.prepared: list[PreparedVolume] = []
        self.sampler: ViewSampler | None = None
        self.probes: torch.Tensor | None = None
        self.spec = InputSpec()
        self.high_res: list[PreparedVolume] | None = None
        self.rank, self.world_size = 0, 1
        self._views: torch.Tensor | None = None
        self._crops: list[Any] = []
        #: the loader thread (`loader_thread`) and the step it is drawing ahead
        self._loader: Any = None
        self._prefetched: dict[int, Any] = {}
        #: says once when the step's figures show collapse (every method; see `core.diversity.CollapseAlarm`)
        self.alarm = CollapseAlarm()

    # --- before anything is written ---------------------------------------------------------------------------
    def prepare(self, run: RunFolder, resume: bool) -> None:
        for _ in self.preparing(run, resume):
            pass

    def preparing(
        self, run: RunFolder, resume: bool, dist: DistContext | None = None, cancel: CancelToken | None = None
    ) -> Iterator[Any]:
        """Read and prepare the layers in memory and the files through the prepared-volume cache (one at a time,
        only the first ``torchrun`` process); yields the progress."""
        config = self.config
        if resume:
            saved = PretrainConfig.from_dict(run.config_dict(), strict=False)
            changed = [k for k in ARCHITECTURE_KEYS if getattr(saved, k) != getattr(config, k)]
            if changed:
                details = ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in changed)
                raise CheckpointError(f"cannot resume {run.path} with a different model: {details}")
            if not config.images and not self.volumes:
                config = config.replace(images=saved.images)
        layers = list(self.volumes or [])
        files = list(config.images) if (self.with_images or not layers) else []
        if not layers and not files:
            raise DagmanInputError("no images given: pass image files or DICOM folders")
        looks = [m for m in (label_map_message(v) for v in layers) if m]
        if looks:  # label maps given as CTs (a folder holding the segmentations too): refused before any work
            more = f" (and {len(looks) - 1} more)" if len(looks) > 1 else ""
            raise LabelMapAsCTError(looks[0] + more)
        self.spec = get_method(config.method).load().input_spec(config.method_options(), config.roi)
        settings = PrepareSettings(
            dims=config.dims,
            spacing=config.spacing,
            hu_range=(config.hu_min, config.hu_max),
            roi=config.roi * self.spec.scale,
            high_res=self.spec.high_res,
        )

        def check_memory(volumes: Sequence[Volume]) -> None:
            check_training_memory(
                volumes,
                spacing=config.spacing,
                roi=settings.roi,
                dims=config.dims,
                crops=2 * int(config.batch_size or 1),
                batch=int(config.batch_size or 1),
                embed_dim=build_architecture(config).embed_dim,
                device=resolve_device(config.device).type,
                what=f"pretraining on {len(layers) + len(files)} volume(s) at {config.spacing or 'their own'} mm, "
                f"ROI {config.roi}",
            )

        check_memory(layers)  # the layers are prepared in memory; files one at a time (or mapped from the cache)
        records = [
            prepare_one(v, settings, str(v.metadata.get("name") or f"volume {i}")) for i, v in enumerate(layers)
        ]
        self.prepared = [r["volume"] for r in records]
        high_res = [r["high_res"] for r in records if r["high_res"] is not None]
        if files:
            dist = dist or DistContext()
            cache = VolumeCache(config.cache_dir) if config.cache else None
            found = yield from prepare_sources(
                files,
                settings,
                cache=cache,
                is_main=dist.local_rank == 0,  # once per node: the first process of each machine prepares
                barrier=dist.barrier,
                cancel=cancel,
                check_memory=lambda v: check_memory([v]),
            )
            self.prepared += found.volumes
            high_res += found.high_res
            if cache is not None:
                self.cache_record = {"folder": str(cache.root), "found": found.cached, "prepared": found.built}
        self.high_res = high_res if self.spec.high_res > 1 else None
        self.config = resolve_config(config, len(self.prepared))
        # the alarm judges from the end of the learning-rate warm-up (and never the first 10 steps)
        self.alarm = CollapseAlarm(from_step=max(10, int(self.config.warmup_steps or 0)))
        self.arch = build_architecture(self.config)
        self.total_steps = int(self.config.steps or 1)
        self.notes = [note for p in self.prepared for note in p.notes]
        self.data_records = [
            {
                "name": p.name,
                "sha256": p.source_hash,
                "shape": list(p.array.shape),
                "spacing": list(p.spacing),
            }
            for p in self.prepared
        ]

    def build(self, device: torch.device, dist: DistContext) -> None:
        config = self.config
        self.rank, self.world_size = dist.rank, dist.world_size
        self.method = build_method(config, self.arch).to(device)
        set_fused_window_attention(self.method, config.fused_attention)
        self.find_unused_parameters = self.method.find_unused_parameters
        self.sampler = make_sampler(
            config, self.spec, self.prepared, self.high_res, self.rank, self.world_size
        )
        if config.loader_thread:
            from concurrent.futures import ThreadPoolExecutor

            self._loader = ThreadPoolExecutor(1, thread_name_prefix="napari-dagman-loader")

    # --- modules ---------------------------------------------------------------------------------------------
    def trained_modules(self) -> dict[str, nn.Module]:
        return self.method.trained_modules()

    def ema_modules(self) -> dict[str, nn.Module]:
        return self.method.ema_modules()

    def state_modules(self) -> dict[str, nn.Module]:
        return self.method.state_modules()

    def wrap_trained(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        self.method.wrap_trained(wrapper)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Method-level buffers outside its networks (e.g. distillation centres)."""
        modules = tuple(f"{name}." for name in self.state_modules())
        return {k: v for k, v in self.method.state_dict().items() if not k.startswith(modules)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.method.load_state_dict(tensors, strict=False)

    # --- records -----------------------------------------------------------------------------------------------
    def published(self) -> dict[str, Any]:
        method = self.method
        preferred, reason = method.preferred()
        return {
            "encoders": {e.name: e.to_dict() for e in method.published_encoders()},
            "preferred_encoder": preferred,
            "preferred_reason": reason,
            "capabilities": type(method).capabilities_for(method.options).to_dict(),
        }

    def weights_metadata(self) -> dict[str, Any]:
        return {"architecture": self.arch.to_json(), "method": self.config.method, **self.published()}

    def run_config(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "architecture": self.arch.to_dict(),
            "job": "pretrain",
            **self.published(),
        }

    def run_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"method": self.config.method}
        if self.cache_record is not None:
            info["volume_cache"] = self.cache_record
        return info

    def start_messages(self, start: int, resume: bool) -> list[str]:
        c, spec = self.config, self.spec
        views = f"{spec.views} view(s)" + (
            f" + {spec.local_views} local crops of {spec.local_roi}" if spec.local_views else ""
        )
        augment = "augmented per view" if c.augment_settings() is not None else "not augmented"
        return [
            f"{c.method} on {len(self.prepared)} volume(s), preset {c.preset} {c.dims}D, ROI {c.roi}, "
            f"{self.total_steps} steps on {next(self.method.parameters()).device}"
            + (f" (resuming at step {start})" if resume else ""),
            f"each sample: {views} from a region {c.view_region:g} x the ROI, {augment}",
        ] + self._resident_message()

    def _resident_message(self) -> list[str]:
        resident = self.sampler.resident if self.sampler is not None else None
        if resident is None:
            return []
        return [
            f"memory cache: {resident.size} of {len(self.prepared)} volumes held in RAM, {resident.replace} swapped "
            f"every {resident.size} samples; every sample is drawn from those held"
        ]

    def begin(self, run: RunFolder, is_main: bool, start: int) -> None:
        config = self.config
        if config.probe_every and is_main:  # at the model's own ROI (MiM's sampler reads a larger region)
            self.probes = probe_crops(
                run.file(PROBE_FILE), self.sampler, config.probe_crops, config.seed, side=config.roi
            )

    def finish_info(self, tracker: dict[str, Any] | None) -> dict[str, Any]:
        return {"best_running_loss": tracker["best_loss"]} if tracker else {}

    def steps_per_epoch(self, world_size: int) -> int:
        return max(1, -(-len(self.prepared) // (self.config.batch_size * world_size)))

    def samples(self) -> int:
        return self.spec.views * self.config.batch_size

    # --- steps -----------------------------------------------------------------------------------------------------
    def _load(self, step: int) -> tuple[Any, np.ndarray | None]:
        """A step's views (and MIRAM's high-resolution targets): a pure function of the seed and the step."""
        batch = self.sampler.sample(step)
        high_res = self.sampler.high_res_views(batch.crops, batch.seeds) if self.spec.high_res > 1 else None
        return batch, high_res

    def _batch(self, step: int) -> tuple[Any, np.ndarray | None]:
        """The step's inputs, drawn ahead by the loader thread when there is one; then it starts on the next step's
        while this one trains (only that thread uses the sampler and its augmentation from here on)."""
        future = self._prefetched.pop(step, None)
        loaded = future.result() if future is not None else self._load(step)
        self._prefetched.clear()  # a step other than the one drawn ahead (never in the loop; a caller's own order)
        if self._loader is not None and step + 1 < self.total_steps:
            self._prefetched[step + 1] = self._loader.submit(self._load, step + 1)
        return loaded

    def step(self, step: int, generator: torch.Generator, device: torch.device) -> StepResult:
        batch, high_res = self._batch(step)
        views = torch.from_numpy(batch.views).to(device, non_blocking=True)
        self._views, self._crops = views, batch.crops
        inputs: dict[str, torch.Tensor] = {}
        if high_res is not None:
            inputs["high_res"] = torch.from_numpy(high_res).to(device, non_blocking=True)
        if batch.local is not None:
            inputs["local"] = torch.from_numpy(batch.local).to(device, non_blocking=True)
        self.method.train()
        out = self.method.forward_step(views, step, generator, **inputs)
        return StepResult(out.loss, out.terms, dict(out.extras), list(out.warnings), out)

    def after_backward(self, step: int) -> None:
        self.method.after_backward(step)

    def after_optimizer_step(self, step: int, device: torch.device) -> dict[str, float]:
        extras = dict(self.method.after_optimizer_step(step))
        done = step + 1
        every = self.config.probe_every
        if self.probes is not None and (done % every == 0 or done in (1, self.total_steps)):
            extras.update(probe_head_diversity(self.method.attention_encoders(), self.probes, device))
            extras.update(probe_collapse(self.method, self.probes, device))
        return extras

    def after_step(self, step: int, extras: dict[str, float]) -> list[str]:
        """The collapse alarm on the step's figures (the loss terms' and the probes'), said once per run."""
        warning = self.alarm.update(step, extras)
        return [warning] if warning else []

    def events_after_step(self, step: int, result: StepResult) -> Iterator[Any]:
        every = self.config.preview_every
        if every and (step % every == 0 or step == 1):
            yield preview_event(
                result.output, self._views, self._crops, self.prepared, self.config, self.arch, step
            )

    def release(self) -> None:
        if self._loader is not None:  # a view drawn ahead for a step that will not run is dropped
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None
        self._prefetched.clear()
        self.method = None
        self._views = None


def make_sampler(
    config: PretrainConfig,
    spec: InputSpec,
    prepared: list[PreparedVolume],
    high_res: list[PreparedVolume] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ViewSampler:
    """The view sampler of a run: the method's input spec, the config's views and augmentation."""
    settings = config.augment_settings()
    return ViewSampler(
        prepared,
        roi=config.roi * spec.scale,
        dims=config.dims,
        batch_size=config.batch_size,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        region_scale=config.view_region,
        views=spec.views,
        local_views=spec.local_views,
        local_roi=spec.local_roi,
        augmentation=Augmentation(settings, config.dims) if settings is not None else None,
        high_res=high_res,
        high_res_factor=spec.high_res,
        resident=(
            ResidentVolumes(prepared, config.memory_cache, config.memory_replace, config.seed)
            if 0 < config.memory_cache < len(prepared)
            else None
        ),
    )


def preview_event(
    out: StepOutput,
    views: torch.Tensor,
    crops: list[Any],
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
        cell_factor = (1, config.mask_cell, config.mask_cell)
        token_factor = (1, arch.attention_stride, arch.attention_stride)
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
        pictures=list(out.pictures),
    )


def run_pretraining(
    config: PretrainConfig,
    volumes: Sequence[Volume] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str | None = None,
    with_images: bool = False,
) -> Generator[Any, None, FinishedEvent]:
    """Pretrain and yield events; returns (and yields last) the `FinishedEvent`.

    ``config.out`` is the run folder; ``volumes`` are in-memory volumes (the GUI's layers), else
    ``config.images`` are read; ``resume`` continues the run in ``config.out``; ``cancel`` is checked before
    every step (the run saves and finishes as cancelled); ``command`` is recorded in run.json; ``with_images``
    reads ``config.images`` besides ``volumes``.
    """
    task = PretrainTask(config, volumes, with_images=with_images)
    return run_training(task, resume=resume, cancel=cancel, command=command)


def describe_method(name: str) -> dict[str, Any]:
    """A registered method's summary, paper, capabilities and default options (for `methods` and the dock)."""
    spec = get_method(name)
    cls = spec.load()
    return {
        "name": spec.name,
        "title": spec.title,
        "summary": spec.summary,
        "paper": spec.paper,
        "capabilities": spec.capabilities.to_dict(),
        "preferred_encoder": cls.preferred_encoder,
        "options": spec.default_options(),
    }


__all__ = [
    "ARCHITECTURE_KEYS",
    "PretrainTask",
    "build_architecture",
    "build_method",
    "describe_method",
    "prepare_inputs",
    "preview_event",
    "resolve_config",
    "run_pretraining",
]
