"""The small interface every self-supervised method implements, and the pieces they share.

A method owns its networks (``student``, optionally ``teacher``) and turns a batch of paired views into a loss
(`forward_step`); the engine owns the optimiser, the schedule, devices, checkpoints and events.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.masking import ATTENTION_STRATEGIES, attention_to_cells, make_mask, random_mask
from napari_dagman.core.methods.losses import masked_l1
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.encoder import pool_mask, upsample_mask


@dataclass
class StepOutput:
    """One training step's loss and what the GUI previews.

    ``attention`` is the (detached) class attention that chose the mask, (2B, heads, N) on the attention-stage
    token grid ``grid``; None for methods without one. ``mask`` is (2B, *cells), True = hidden.
    """

    loss: torch.Tensor
    terms: dict[str, float]
    mask: torch.Tensor
    attention: torch.Tensor | None = None
    grid: tuple[int, ...] = ()
    reconstruction: torch.Tensor | None = None
    extras: dict[str, float] = field(default_factory=dict)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


class SSLMethod(nn.Module):
    """Base class. Subclasses build ``self.student`` (and ``self.teacher``) and implement `forward_step`."""

    #: DDP must look for parameters without gradient (e.g. modules a method does not train).
    find_unused_parameters: bool = False

    def __init__(self, config: PretrainConfig, arch: Architecture) -> None:
        super().__init__()
        self.config = config
        self.arch = arch
        self.dims = arch.dims
        self.cells = (config.roi // config.mask_cell,) * arch.dims
        self.teacher: nn.Module | None = None

    # --- shared helpers -------------------------------------------------------------------------------------
    @property
    def student_network(self) -> nn.Module:
        return unwrap(self.student)

    def token_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        """Cell mask (B, *cells) -> patch-embedding token mask (B, *roi/patch)."""
        return upsample_mask(cell_mask, self.config.mask_cell // self.arch.patch_size, self.dims)

    def voxel_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        return upsample_mask(cell_mask, self.config.mask_cell, self.dims)

    def stage_token_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        """Cell mask -> (B, N) mask on the attention-stage tokens (a token counts as hidden when >= half is)."""
        stride = self.arch.attention_stride
        voxels = self.voxel_mask(cell_mask)
        return (pool_mask(voxels, stride, self.dims) >= 0.5).flatten(1)

    def choose_mask(
        self,
        batch: int,
        step: int,
        attention: torch.Tensor | None,
        grid: tuple[int, ...],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The step's cell mask: the configured strategy, or random masks during the mask warm-up."""
        cfg = self.config
        strategy = cfg.mask_strategy
        assert strategy is not None and cfg.mask_ratio is not None, "config must be resolved"
        if strategy in ATTENTION_STRATEGIES and (attention is None or step < (cfg.mask_warmup_steps or 0)):
            return random_mask(batch, self.cells, cfg.mask_ratio, generator)
        cell_attention = None
        if attention is not None and strategy in ATTENTION_STRATEGIES:
            mean = attention.float().mean(dim=1).reshape(batch, *grid).cpu()
            cell_attention = attention_to_cells(mean, self.cells)
        return make_mask(
            strategy,
            batch=batch,
            grid=self.cells,
            ratio=cfg.mask_ratio,
            attention=cell_attention,
            generator=generator,
            hint_fraction=cfg.hint_fraction,
            hint_pool=cfg.hint_pool,
        )

    def reconstruction_loss(
        self, views: torch.Tensor, reconstruction: torch.Tensor, cell_mask: torch.Tensor
    ) -> torch.Tensor:
        return masked_l1(views, reconstruction, self.voxel_mask(cell_mask).to(views.device))

    # --- interface ------------------------------------------------------------------------------------------
    @abstractmethod
    def forward_step(self, views: torch.Tensor, step: int, generator: torch.Generator) -> StepOutput:
        """Views (2B, C, *roi): the B first-views then the B second-views of the same crops."""

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """Called after each optimiser step (EMA teacher update); returns values to log."""
        return {}
