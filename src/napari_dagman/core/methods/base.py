"""The contract every self-supervised method implements, and the pieces methods share.

A method is one file in this package and one `MethodSpec` in the registry. It declares:

* its **options**: a small dataclass (`MethodOptions` subclass) whose fields carry default, limits, help and
  group; the CLI shows them under ``pretrain --method X --help``, the pretraining dock when X is chosen, and the
  run's config.json stores them under the method's name;
* the modules it **trains** (`trained_modules`: the optimiser, gradient clipping, DDP and checkpoints cover
  exactly these) and the ones it keeps by **EMA** (`ema_modules`: saved, never optimised, always in eval mode);
* the encoders it **publishes** for downstream use (`published_encoders`, by name: ``teacher``, ``student``,
  ``cnn``...), which fine-tuning, embeddings and the attention explorer read by name;
* its **capabilities** (`Capabilities`): trains the class attention, has a teacher, reconstructs, which
  pictures its previews hold. The GUI and the explorer read these instead of testing method names.

Per step it turns a batch of paired views into a loss (`forward_step`); the training loop owns the optimiser,
schedules, devices, precision, checkpoints and events (`core.training`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from napari_dagman.core.config import ConfigBase, PretrainConfig, option
from napari_dagman.core.diversity import cross_crop_cosine
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import Picture
from napari_dagman.core.masking import (
    MaskRecipe,
    attention_to_cells,
    draw_masks,
    get_strategy,
    strategy_names,
)
from napari_dagman.core.methods.losses import masked_l1
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.encoder import cell_stage_token_mask, cell_token_mask, upsample_mask


# --- options --------------------------------------------------------------------------------------------------
@dataclass
class MethodOptions(ConfigBase):
    """Base of every method's options. ``None`` fields are filled by `resolve` once the run length is known."""

    kind: ClassVar[str] = "method"

    def resolve(self, steps: int) -> MethodOptions:
        """Fill the defaults that depend on the number of steps (warm-ups); returns a new, complete object."""
        return self


def fraction_of(steps: int, fraction: float) -> int:
    """A step count that is a fraction of the run (warm-ups default to one)."""
    return int(round(fraction * steps))


@dataclass
class MaskingOptions(MethodOptions):
    """How a masked-image-modelling method hides cells (the strategies of `core.masking`)."""

    mask_strategy: str = option(
        "random", "mask strategy (see core/masking.py)", choices=strategy_names, group="masking"
    )
    mask_ratio: float = option(
        0.6, "fraction of mask cells hidden", minimum=0.0, maximum=1.0, group="masking"
    )
    mask_warmup_steps: int | None = option(
        None,
        "random masks for the first N steps: an untrained teacher's attention is noise (default 10% of the steps)",
        minimum=0,
        group="masking",
    )
    hint_fraction: float = option(
        0.1,
        "attention-hint: reveal this fraction x ratio of the cells",
        minimum=0.0,
        maximum=1.0,
        group="masking",
    )
    hint_pool: float = option(
        0.1,
        "attention-hint: hints come from this top fraction of attention",
        minimum=0.0,
        maximum=1.0,
        group="masking",
    )
    masking_prob: float = option(
        1.0,
        "share of the images that are masked at all; the others are shown whole (AttMask: 0.5)",
        minimum=0.0,
        maximum=1.0,
        group="masking",
    )
    mask_ratio_jitter: float = option(
        0.0,
        "each image's ratio is drawn uniformly from ratio +- this (AttMask/iBOT: 0.3 +- 0.2)",
        minimum=0.0,
        maximum=0.5,
        group="masking",
    )

    def resolve(self, steps: int) -> MaskingOptions:
        if self.mask_warmup_steps is None:
            return self.replace(mask_warmup_steps=fraction_of(steps, 0.1))
        return self


# --- what a method declares ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    """What a method does, for the GUI, the explorer and the CLI (never test a method's name).

    ``previews`` names the pictures its `StepOutput` carries for the live preview: ``attention`` (class
    attention), ``mask`` (hidden cells), ``unseen`` (cells a noisy teacher dropped), ``reconstruction``,
    ``levels`` (masks per level), ``error`` (reconstruction error per cell).
    """

    trains_class_attention: bool
    has_teacher: bool
    reconstructs: bool
    previews: tuple[str, ...] = ("mask",)
    #: the explorer's mask strategies (random, block, attention-*) describe this method's masks
    cell_masks: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "trains_class_attention": self.trains_class_attention,
            "has_teacher": self.has_teacher,
            "reconstructs": self.reconstructs,
            "previews": list(self.previews),
            "cell_masks": self.cell_masks,
        }


@dataclass(frozen=True)
class PublishedEncoder:
    """An encoder a run offers for downstream use: its weights are the keys under ``prefix`` in the run's files.

    ``kind`` says how to rebuild it: ``swin`` is the run's `SwinEncoder` (class attention included; whether
    the method trained that module is ``class_attention_trained``); other kinds (a CNN) carry their own
    ``architecture`` description.
    """

    name: str
    prefix: str
    kind: str = "swin"
    class_attention_trained: bool = True
    architecture: dict[str, Any] | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "kind": self.kind,
            "class_attention_trained": self.class_attention_trained,
            "architecture": self.architecture,
            "description": self.description,
        }


@dataclass(frozen=True)
class InputSpec:
    """What a method reads per sample: ``views`` crops (2 = a pair for cross-view losses), each ``scale`` x the
    ROI a side (MiM reads a region twice the ROI), with ``high_res`` > 1 also the same regions on a grid that
    many times finer (MIRAM's high-resolution target, passed to `forward_step` as ``high_res``), and
    ``local_views`` small crops of ``local_roi`` voxels from the same region (DINO/iBOT multi-crop, passed as
    ``local``)."""

    views: int = 2
    scale: int = 1
    high_res: int = 1
    local_views: int = 0
    local_roi: int = 0


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
    #: the method's own pictures of the first sample (masks per level, reconstructions) for the live preview
    pictures: list[Picture] = field(default_factory=list)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or compiled) wrapper, or the module itself."""
    inner = getattr(module, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    original = getattr(module, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else module


class SSLMethod(nn.Module):
    """Base class of every self-supervised method (see the module docstring for the contract)."""

    #: the options dataclass this method reads (``self.options``)
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    capabilities: ClassVar[Capabilities] = Capabilities(False, False, False)
    #: the published encoder that downstream jobs use when asked for ``auto``
    preferred_encoder: ClassVar[str] = "student"
    #: DDP must look for parameters without gradient (true whenever `untrained_parameters` names any).
    find_unused_parameters: bool = False
    #: what one sample is (see `input_spec`)
    inputs: ClassVar[InputSpec] = InputSpec()

    @classmethod
    def input_spec(cls, options: MethodOptions, roi: int) -> InputSpec:
        """What the method reads per sample, for these options and the run's ROI (the task prepares and samples
        accordingly)."""
        return cls.inputs

    @classmethod
    def capabilities_for(cls, options: MethodOptions) -> Capabilities:
        """The capabilities with these options (a method whose options change what it trains overrides this)."""
        return cls.capabilities

    def __init__(self, config: PretrainConfig, options: MethodOptions, arch: Architecture) -> None:
        super().__init__()
        self.config = config
        self.options = options
        self.arch = arch
        self.dims = arch.dims
        self.cells = (config.roi // config.mask_cell,) * arch.dims

    # --- the contract -----------------------------------------------------------------------------------------
    @abstractmethod
    def trained_modules(self) -> dict[str, nn.Module]:
        """Attribute name -> module for every module the optimiser updates (DDP wraps each of them)."""

    def ema_modules(self) -> dict[str, nn.Module]:
        """Attribute name -> module for modules kept by EMA (saved, not optimised, always in eval mode)."""
        return {}

    @abstractmethod
    def published_encoders(self) -> list[PublishedEncoder]:
        """The encoders this method offers downstream, preferred one included (`preferred_encoder`)."""

    @abstractmethod
    def forward_step(
        self, views: torch.Tensor, step: int, generator: torch.Generator, **inputs: Any
    ) -> StepOutput:
        """Views (V*B, C, *crop): the B first views, then (V = 2) the B second views of the same samples.

        ``inputs`` holds what `input_spec` asks for beyond the views: ``high_res`` (the same crops on a finer
        grid) and ``local`` (L*B small crops of the same regions, the B first ones first).
        """

    def after_backward(self, step: int) -> None:
        """Called between backward and the optimiser step (e.g. freeze a layer's gradient)."""

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """Called after each optimiser step (e.g. the EMA update); returns values to log."""
        return {}

    def untrained_parameters(self) -> tuple[str, ...]:
        """Name prefixes (as in ``self.named_parameters()``) of trained modules' parameters that no loss reaches by
        design (e.g. a class attention the method does not use, a mask token of a method that masks nothing). The
        conformance suite checks that every other trained parameter gets a gradient."""
        return ()

    def attention_encoders(self) -> dict[str, nn.Module]:
        """Encoders whose class attention this method trains, by name (probed for head diversity)."""
        return {}

    def published_module(self, name: str) -> nn.Module:
        """The module of a published encoder (by name), unwrapped from DDP or compilation."""
        for encoder in self.published_encoders():
            if encoder.name == name:
                head, _, rest = encoder.prefix.partition(".")
                module = self.network(head)
                return unwrap(module.get_submodule(rest)) if rest else module
        raise KeyError(f"{type(self).__name__} publishes no encoder '{name}'")

    def probe_outputs(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs the method's objective compares, one row per crop, by name (collapse probes; eval mode,
        no gradient). Methods whose objective compares projections (CASS, MiM) return them."""
        return {}

    def preferred(self) -> tuple[str, str]:
        """(the published encoder downstream jobs use for ``auto``, why): recorded in the run's config.json."""
        return self.preferred_encoder, "the encoder this method trains"

    # --- what the loop uses ---------------------------------------------------------------------------------
    def wrap_trained(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each trained module by ``wrapper(module)`` (DistributedDataParallel)."""
        for name, module in self.trained_modules().items():
            setattr(self, name, wrapper(module))

    def network(self, name: str) -> nn.Module:
        """A trained or EMA module by attribute name, unwrapped."""
        return unwrap(getattr(self, name))

    def state_modules(self) -> dict[str, nn.Module]:
        """Every module whose weights a checkpoint holds (trained, then EMA), unwrapped."""
        names = [*self.trained_modules(), *self.ema_modules()]
        return {name: self.network(name) for name in names}

    def train(self, mode: bool = True) -> SSLMethod:
        """Train the trained modules; EMA modules always run in eval mode (no drop path, no dropout)."""
        super().train(mode)
        for module in self.ema_modules().values():
            module.eval()
        return self

    # --- shared helpers -------------------------------------------------------------------------------------
    def token_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        """Cell mask (B, *cells) -> patch-embedding token mask (B, *roi/patch)."""
        return cell_token_mask(cell_mask, self.config.mask_cell, self.arch.patch_size, self.dims)

    def voxel_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        return upsample_mask(cell_mask, self.config.mask_cell, self.dims)

    def stage_token_mask(self, cell_mask: torch.Tensor) -> torch.Tensor:
        """Cell mask -> (B, N) mask on the attention-stage tokens (a token counts as hidden when >= half is)."""
        return cell_stage_token_mask(cell_mask, self.config.mask_cell, self.arch.attention_stride, self.dims)

    def token_cosine(self, tokens: torch.Tensor, cell_mask: torch.Tensor | None = None) -> float:
        """Mean cosine of the attention-stage tokens of different crops, over the tokens whose input was seen
        (hidden tokens all carry the mask token): near 1 = every crop described alike (a collapse figure)."""
        visible = None if cell_mask is None else ~self.stage_token_mask(cell_mask).to(tokens.device)
        return cross_crop_cosine(tokens, visible)

    def reconstruction_loss(
        self, views: torch.Tensor, reconstruction: torch.Tensor, cell_mask: torch.Tensor
    ) -> torch.Tensor:
        return masked_l1(views, reconstruction, self.voxel_mask(cell_mask).to(views.device))


class MaskedMethod(SSLMethod):
    """A method that hides cells of its input with the strategies of `core.masking` (options: `MaskingOptions`)."""

    Options: ClassVar[type[MethodOptions]] = MaskingOptions

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
        o = self.options
        strategy = o.mask_strategy
        if get_strategy(strategy).needs_attention and (
            attention is None or step < (o.mask_warmup_steps or 0)
        ):
            strategy = "random"
        cell_attention = None
        if get_strategy(strategy).needs_attention:
            mean = attention.float().mean(dim=1).reshape(batch, *grid).cpu()
            cell_attention = attention_to_cells(mean, self.cells)
        recipe = replace(MaskRecipe.from_options(o), strategy=strategy)
        return draw_masks(
            recipe, batch=batch, grid=self.cells, attention=cell_attention, generator=generator, unseen=unseen
        )


def check_ratio(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise DagmanInputError(f"{name} must be within [0, 1], got {value}")
