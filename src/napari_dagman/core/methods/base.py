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
from napari_dagman.core.masking import attention_to_cells, get_strategy, make_mask
from napari_dagman.core.methods.losses import masked_l1
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.encoder import cell_stage_token_mask, cell_token_mask, upsample_mask


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
    #: (2B, *cells) cells the noisy teacher dropped from its input (None without input dropout)
    unseen: torch.Tensor | None = None
    #: messages for the user (e.g. a collapse alarm), each said once by the method
    warnings: list[str] = field(default_factory=list)


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

    def train(self, mode: bool = True) -> SSLMethod:
        """Train the student; a teacher always runs in eval mode (no drop path, no dropout), as in DINO/iBOT."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # --- shared helpers -------------------------------------------------------------------------------------
    @property
    def student_network(self) -> nn.Module:
        return unwrap(self.student)

    def attention_encoders(self) -> dict[str, nn.Module]:
        """Encoders whose class attention this method trains, by name (probed for head diversity)."""
        return {}

    def after_backward(self, step: int) -> None:
        """Called between backward and the optimiser step: the projection heads' last layer stays frozen for
        the first ``freeze_last_layer_steps`` steps (DINO's ``cancel_gradients_last_layer``)."""
        if step >= (self.config.freeze_last_layer_steps or 0):
            return
        for name, p in self.student_network.named_parameters():
            if ".last_layer." in name:
                p.grad = None

    def token_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        """Cell mask (B, *cells) -> patch-embedding token mask (B, *roi/patch)."""
        return cell_token_mask(cell_mask, self.config.mask_cell, self.arch.patch_size, self.dims)

    def voxel_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        return upsample_mask(cell_mask, self.config.mask_cell, self.dims)

    def stage_token_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        """Cell mask -> (B, N) mask on the attention-stage tokens (a token counts as hidden when >= half is)."""
        return cell_stage_token_mask(cell_mask, self.config.mask_cell, self.arch.attention_stride, self.dims)

    def choose_mask(
        self,
        batch: int,
        step: int,
        attention: torch.Tensor | None,
        grid: tuple[int, ...],
        generator: torch.Generator,
        unseen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step's cell mask: the configured strategy, or random masks during the mask warm-up.

        ``attention`` (B, heads, N) on the token ``grid``; ``unseen`` (B, *cells) cells the attention did not
        see (see `core.masking`). With ``masking_prob`` < 1 an image is left whole with that chance, and with
        ``mask_ratio_jitter`` each image draws its ratio from ``mask_ratio +- jitter`` (AttMask / iBOT).
        """
        cfg = self.config
        assert cfg.mask_strategy is not None and cfg.mask_ratio is not None, "config must be resolved"
        strategy = cfg.mask_strategy
        if get_strategy(strategy).needs_attention and (
            attention is None or step < (cfg.mask_warmup_steps or 0)
        ):
            strategy = "random"
        cell_attention = None
        if get_strategy(strategy).needs_attention:
            mean = attention.float().mean(dim=1).reshape(batch, *grid).cpu()
            cell_attention = attention_to_cells(mean, self.cells)
        options = {"hint_fraction": cfg.hint_fraction, "hint_pool": cfg.hint_pool}
        prob = 1.0 if cfg.masking_prob is None else cfg.masking_prob
        jitter = cfg.mask_ratio_jitter or 0.0
        if prob >= 1.0 and jitter == 0.0:
            return make_mask(
                strategy,
                batch=batch,
                grid=self.cells,
                ratio=cfg.mask_ratio,
                attention=cell_attention,
                generator=generator,
                unseen=unseen,
                **options,
            )
        masks = []
        for b in range(batch):
            masked = float(torch.rand((), generator=generator)) < prob
            ratio = cfg.mask_ratio + (2.0 * float(torch.rand((), generator=generator)) - 1.0) * jitter
            if not masked:
                masks.append(torch.zeros(1, *self.cells, dtype=torch.bool))
                continue
            masks.append(
                make_mask(
                    strategy,
                    batch=1,
                    grid=self.cells,
                    ratio=min(1.0, max(0.0, ratio)),
                    attention=None if cell_attention is None else cell_attention[b : b + 1],
                    generator=generator,
                    unseen=None if unseen is None else unseen[b : b + 1],
                    **options,
                )
            )
        return torch.cat(masks)

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
