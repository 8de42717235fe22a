"""MiM, Mask in Mask (Zhuang et al., arXiv 2404.15580, IEEE TMI 2025), on the same Swin encoder as DAGMaN.

Multi-level masked reconstruction of one region of twice the ROI, read next to the paper and its public code
(methods.md section 1.4):

1. **Coarse level**: the region downsampled by 2 (to the ROI) is masked by octants (2 x 2 x 2 real spatial
   cubes; 2 x 2 quadrants in 2D), ``mask_ratio_coarse`` of them (0.5), and reconstructed.
2. **Middle level**: ``samples_mid`` (4) of the octants hidden at the coarse level, each an ROI-sized
   sub-volume at full resolution, masked by cells at ``mask_ratio_mid`` (0.6) and reconstructed.
3. **Fine level**: from each middle volume, ``samples_fine`` (4) of its hidden cells (16 voxels), upsampled to
   the ROI, masked at ``mask_ratio_fine`` (0.5) and reconstructed.
4. **Cross-level alignment**: the decoder features of a finer input, pooled and projected, are pulled towards
   its parent's, pooled over the region the child was cut from and projected, with BYOL's 2 - 2 cos. Two forms
   (``alignment``): ``paper``, as the code has it, a trainable projection on each side with only the parent's
   features detached; measured here (150 steps, main b4443b9) both terms fell to 0.0005 while the projections of
   different crops reached cosine 0.9999: the two projections learnt to output one constant. ``predictor``
   (default), BYOL's form: one projection per level pair serves child and parent, a predictor follows it on the
   child side, and the parent's projection is held fixed (stop-gradient). Either form takes VICReg's variance
   term on the projections of the step's crops (``variance_weight``), which forbids the constant.

Loss = w_coarse L_coarse + w_mid L_mid + w_fine L_fine + w_align_coarse_mid A(coarse, mid)
+ w_align_mid_fine A(mid, fine), every reconstruction term MAE's MSE on per-cell normalised voxels over the hidden
cells only. Weights from the paper's run script (1, 1, 1, 0.1, 0.1); the optional re-weighting of coarse vs fine
terms over training (``schedule``) is the code's cosine/sine rule, over steps instead of epochs.

Where the public code does otherwise, and why we do not copy it: its coarse cells are runs of 27 consecutive
raster-order tokens, not the cube of tokens of a sub-volume (ours are spatial octants); its coarse-to-middle
alignment compares the middle features with a projection of themselves, so the coarse features are unused (ours
compare each middle volume with its own coarse octant); its middle-to-fine term pairs volumes and patches by
a reshape that mixes samples (ours pairs each fine patch with the middle volume it came from). Departures from the
paper, because this plugin pretrains the same Swin for every method: the encoder is our Swin with a mask token
(SimMIM style: a Swin cannot drop tokens as MiM's ViT stage does) instead of MiM's hybrid ConvViT, and the decoder
is a light convolutional one on the deepest tokens instead of an 8-block transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_dagman.core.config import PretrainConfig, option
from napari_dagman.core.diversity import cross_crop_cosine
from napari_dagman.core.events import Picture
from napari_dagman.core.masking import random_mask
from napari_dagman.core.methods.base import (
    Capabilities,
    InputSpec,
    MethodOptions,
    PublishedEncoder,
    SSLMethod,
    StepOutput,
)
from napari_dagman.core.methods.losses import (
    alignment_loss,
    denormalise_cells,
    masked_cell_mse,
    predictor_agreement,
    variance_loss,
)
from napari_dagman.core.models.architecture import DEEPEST_STRIDE, Architecture
from napari_dagman.core.models.encoder import (
    SwinEncoder,
    cell_stage_token_mask,
    cell_token_mask,
    upsample_mask,
)
from napari_dagman.core.models.heads import MLPHead, ReconstructionDecoder

SCHEDULES: tuple[str, ...] = ("concurrent", "coarse-to-fine", "fine-to-coarse")
ALIGNMENTS: tuple[str, ...] = ("predictor", "paper")
LEVEL_NAMES = {
    1: "hidden at the coarse level",
    2: "hidden at the middle level",
    3: "hidden at the fine level",
}


@dataclass
class MiMOptions(MethodOptions):
    """MiM's options (defaults: the paper's run script and the code's argument defaults)."""

    levels: int = option(
        3, "2 = coarse and middle levels only, 3 = with the fine level", choices=(2, 3), group="levels"
    )
    mask_ratio_coarse: float = option(
        0.5, "share of the coarse octants hidden", minimum=0.0, maximum=1.0, group="levels"
    )
    mask_ratio_mid: float = option(
        0.6, "share of the middle level's cells hidden", minimum=0.0, maximum=1.0, group="levels"
    )
    mask_ratio_fine: float = option(
        0.5, "share of the fine level's cells hidden", minimum=0.0, maximum=1.0, group="levels"
    )
    samples_mid: int = option(
        4,
        "middle-level volumes per region, among the octants hidden at the coarse level",
        minimum=1,
        maximum=8,
        group="levels",
    )
    samples_fine: int = option(
        4,
        "fine-level patches per middle volume, among its hidden cells",
        minimum=1,
        maximum=64,
        group="levels",
    )
    w_coarse: float = option(1.0, "weight of the coarse reconstruction", minimum=0.0, group="loss")
    w_mid: float = option(1.0, "weight of the middle reconstruction", minimum=0.0, group="loss")
    w_fine: float = option(1.0, "weight of the fine reconstruction", minimum=0.0, group="loss")
    w_align_coarse_mid: float = option(
        0.1,
        "weight of the coarse-middle alignment (run script 0.1; code default 1e-3)",
        minimum=0.0,
        group="loss",
    )
    w_align_mid_fine: float = option(0.1, "weight of the middle-fine alignment", minimum=0.0, group="loss")
    schedule: str = option(
        "concurrent",
        "re-weighting over training: concurrent (none), coarse-to-fine (coarse x (1 + cos) falling 2 -> 1, fine x "
        "sin rising 0 -> 1) or fine-to-coarse (the reverse)",
        choices=SCHEDULES,
        group="loss",
    )
    align_parent: str = option(
        "region",
        "the parent feature a child is aligned with: pooled over the region the child was cut from, or over the "
        "whole parent (the code's middle-fine term)",
        choices=("region", "whole"),
        group="loss",
    )
    alignment: str = option(
        "predictor",
        "predictor = BYOL's form (a projection shared by child and parent, a predictor on the child side, the "
        "parent's projection held fixed); paper = the code's (a trainable projection per side, only the parent's "
        "features detached: collapses without the variance term)",
        choices=ALIGNMENTS,
        group="loss",
    )
    variance_weight: float = option(
        1.0,
        "weight of VICReg's variance term on the alignment projections over the step's crops (0 = none)",
        minimum=0.0,
        group="loss",
    )
    norm_pix_loss: bool = option(True, "standardise each target cell (MAE's norm_pix_loss)", group="loss")
    align_dim: int = option(256, "width of the alignment projections", minimum=8, group="loss")


@dataclass
class _Level:
    """One level's inputs, masks, reconstruction, decoder features and loss."""

    inputs: torch.Tensor
    cells: torch.Tensor
    reconstruction: torch.Tensor
    features: torch.Tensor
    loss: torch.Tensor
    #: the encoder's attention-stage tokens (N, T, C) and which of them saw their input (N, T)
    tokens: torch.Tensor | None = None
    visible: torch.Tensor | None = None


@dataclass
class MiMPlan:
    """A step's random choices: hidden octants (B, 2, 2, 2), the octants read at the middle level (B, S), the
    middle masks (B*S, *cells), the cells read at the fine level (B*S, F) and the fine masks (B*S*F, *cells)."""

    octants: torch.Tensor
    chosen: torch.Tensor
    mid_cells: torch.Tensor
    fine_choice: torch.Tensor | None
    fine_cells: torch.Tensor | None


@dataclass
class MiMLevels:
    """A step's levels, alignment terms, and the pooled coarse features the middle level was aligned with."""

    coarse: _Level
    mid: _Level
    fine: _Level | None
    align_coarse_mid: torch.Tensor
    align_mid_fine: torch.Tensor
    coarse_parent: torch.Tensor
    #: the children's alignment projections per level pair (rows: different crops)
    projections: list[torch.Tensor] = field(default_factory=list)


def pick_hidden(mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """(N, K) bool -> (N, count) indices drawn at random among the True entries (topped up with others)."""
    scores = torch.rand(mask.shape, generator=generator) + mask.float().cpu()
    return scores.argsort(dim=1, descending=True)[:, :count]


def cell_slices(index: int, grid: tuple[int, ...], size: int) -> tuple[slice, ...]:
    """The voxel slices of cell ``index`` (raster order) of a grid of cells ``size`` voxels a side."""
    coords = np.unravel_index(index, grid)
    return tuple(slice(int(c) * size, (int(c) + 1) * size) for c in coords)


class MiM(SSLMethod):
    """Mask in Mask: masked reconstruction at three levels of one region, aligned across levels."""

    Options: ClassVar[type] = MiMOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        trains_class_attention=False,
        has_teacher=False,
        reconstructs=True,
        previews=("levels", "reconstruction"),
        cell_masks=False,
    )
    preferred_encoder: ClassVar[str] = "encoder"
    inputs: ClassVar[InputSpec] = InputSpec(views=1, scale=2)
    find_unused_parameters = True  # the encoder's class attention gets no gradient

    def untrained_parameters(self) -> tuple[str, ...]:
        return ("encoder.class_attention.",)

    def __init__(self, config: PretrainConfig, options: MiMOptions, arch: Architecture) -> None:
        super().__init__(config, options, arch)
        width = arch.stage_channels(4)
        self.encoder = SwinEncoder(arch)
        self.decoder = ReconstructionDecoder(width, width, DEEPEST_STRIDE, arch.dims, arch.in_channels)
        dim = options.align_dim
        if (
            options.alignment == "predictor"
        ):  # a projection per level pair (both sides), a predictor per child
            heads = {"coarse_mid": MLPHead(width, width, dim), "mid_fine": MLPHead(width, width, dim)}
            heads |= {
                "coarse_mid_predictor": MLPHead(dim, dim, dim),
                "mid_fine_predictor": MLPHead(dim, dim, dim),
            }
        else:
            heads = {
                name: MLPHead(width, width, dim)
                for name in ("mid_child", "coarse_parent", "fine_child", "mid_parent")
            }
        self.align = nn.ModuleDict(heads)
        self.roi, self.cell = config.roi, config.mask_cell
        self.total_steps = int(config.steps or 1)

    # --- the contract -----------------------------------------------------------------------------------------
    def trained_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder, "align": self.align}

    def published_encoders(self) -> list[PublishedEncoder]:
        return [
            PublishedEncoder("encoder", "encoder", class_attention_trained=False, description="MiM's encoder")
        ]

    # --- pieces -----------------------------------------------------------------------------------------------
    def level(self, inputs: torch.Tensor, cells: torch.Tensor) -> _Level:
        """Encode with the hidden cells behind the mask token, decode, and the masked reconstruction loss."""
        tokens = cell_token_mask(cells, self.cell, self.arch.patch_size, self.dims).to(inputs.device)
        out = self.network("encoder")(inputs, tokens, class_attention=False)
        reconstruction, features = self.network("decoder")(out.stages[4])
        loss = masked_cell_mse(
            inputs, reconstruction, cells.to(inputs.device), self.cell, normalise=self.options.norm_pix_loss
        )
        visible = ~cell_stage_token_mask(cells, self.cell, self.arch.attention_stride, self.dims).to(
            inputs.device
        )
        return _Level(inputs, cells, reconstruction, features, loss, out.tokens, visible)

    def weights(self, step: int) -> tuple[float, float]:
        """(coarse, fine) reconstruction weight factors of the schedule at ``step``."""
        t = math.pi * min(step / max(1, self.total_steps), 1.0) / 2.0
        falling, rising = math.cos(t) + 1.0, math.sin(t)
        return {
            "concurrent": (1.0, 1.0),
            "coarse-to-fine": (falling, rising),
            "fine-to-coarse": (rising, falling),
        }[self.options.schedule]

    def pooled(self, features: torch.Tensor, region: tuple[slice, ...] | None) -> torch.Tensor:
        """Decoder features (N, D, *tokens) averaged over a voxel region of the input (None: everything)."""
        if region is None or self.options.align_parent == "whole":
            return features.flatten(2).mean(-1)
        per_cell = DEEPEST_STRIDE // self.cell
        cellwise = features
        for axis in range(2, features.ndim):  # tokens -> cells (exact: a token covers whole cells)
            cellwise = cellwise.repeat_interleave(per_cell, dim=axis)
        cells = tuple(slice(s.start // self.cell, s.stop // self.cell) for s in region)
        return cellwise[(slice(None), slice(None), *cells)].flatten(2).mean(-1)

    # --- one step ---------------------------------------------------------------------------------------------
    def plan(self, batch: int, generator: torch.Generator) -> MiMPlan:
        """Every random choice of a step, drawn first (a pure function of the generator's seed)."""
        o, d = self.options, self.dims
        octants = random_mask(batch, (2,) * d, o.mask_ratio_coarse, generator)
        chosen = pick_hidden(octants.flatten(1), min(o.samples_mid, 2**d), generator)
        mid_cells = random_mask(chosen.numel(), self.cells, o.mask_ratio_mid, generator)
        fine_choice = fine_cells = None
        if o.levels == 3:
            fine_choice = pick_hidden(mid_cells.flatten(1), o.samples_fine, generator)
            fine_cells = random_mask(fine_choice.numel(), self.cells, o.mask_ratio_fine, generator)
        return MiMPlan(octants, chosen, mid_cells, fine_choice, fine_cells)

    def run(self, views: torch.Tensor, plan: MiMPlan) -> MiMLevels:
        """The three levels and the two alignment terms of one step, following ``plan``."""
        d, roi, cell = self.dims, self.roi, self.cell
        pool = F.avg_pool3d if d == 3 else F.avg_pool2d  # an anti-aliased 2x downsample of the region
        coarse = self.level(pool(views, 2), upsample_mask(plan.octants, roi // 2 // cell, d))
        owners = np.repeat(np.arange(views.shape[0]), plan.chosen.shape[1])
        regions = [cell_slices(int(i), (2,) * d, roi) for i in plan.chosen.flatten()]
        mid_in = torch.stack([views[b][(slice(None), *r)] for b, r in zip(owners, regions, strict=True)])
        mid = self.level(mid_in, plan.mid_cells)
        halves = [tuple(slice(s.start // 2, s.stop // 2) for s in r) for r in regions]  # in the coarse input
        parent = torch.stack(
            [self.pooled(coarse.features[b : b + 1], h)[0] for b, h in zip(owners, halves, strict=True)]
        )
        child = mid.features.flatten(2).mean(-1)
        # the parent side is detached: the alignment moves the child's features, not the parent's
        align_cm, projected = self.align_pair("coarse_mid", child, parent)
        levels = MiMLevels(
            coarse, mid, None, align_cm, torch.zeros((), device=views.device), parent, [projected]
        )
        if plan.fine_choice is None:
            return levels
        fine_owners = np.repeat(np.arange(mid_in.shape[0]), plan.fine_choice.shape[1])
        patches = [cell_slices(int(i), self.cells, cell) for i in plan.fine_choice.flatten()]
        mode = "trilinear" if d == 3 else "bilinear"
        fine_in = torch.cat(
            [
                F.interpolate(mid_in[m : m + 1][(slice(None), slice(None), *p)], size=(roi,) * d, mode=mode)
                for m, p in zip(fine_owners, patches, strict=True)
            ]
        )
        levels.fine = self.level(fine_in, plan.fine_cells)
        parent_m = torch.stack(
            [self.pooled(mid.features[m : m + 1], p)[0] for m, p in zip(fine_owners, patches, strict=True)]
        )
        child_f = levels.fine.features.flatten(2).mean(-1)
        levels.align_mid_fine, projected_f = self.align_pair("mid_fine", child_f, parent_m)
        levels.projections.append(projected_f)
        return levels

    def probe_outputs(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """The alignment projections of the crops as the objective sees a child: masked at the middle level's
        ratio (a fixed draw, the same at every probe), pooled, projected (each level pair's child side)."""
        cells = random_mask(
            crops.shape[0], self.cells, self.options.mask_ratio_mid, torch.Generator().manual_seed(0)
        )
        tokens = cell_token_mask(cells, self.cell, self.arch.patch_size, self.dims).to(crops.device)
        out = self.network("encoder")(crops, tokens, class_attention=False)
        pooled = self.network("decoder")(out.stages[4])[1].flatten(2).mean(-1)
        align = self.network("align")
        if self.options.alignment == "predictor":
            names = {"coarse_mid": "coarse_mid", "mid_fine": "mid_fine"}
        else:
            names = {"coarse_mid": "mid_child", "mid_fine": "fine_child"}
        if self.options.levels == 2:
            names.pop("mid_fine")
        return {pair: align[head](pooled) for pair, head in names.items()}

    def align_pair(
        self, pair: str, child: torch.Tensor, parent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(alignment loss, the children's projections) of one level pair (``coarse_mid`` or ``mid_fine``)."""
        align = self.network("align")
        if self.options.alignment == "predictor":
            projected = align[pair](child)
            with torch.no_grad():  # the parent's projection is the fixed target
                target = align[pair](parent.detach())
            return predictor_agreement(align[f"{pair}_predictor"](projected), target), projected
        child_head, parent_head = {
            "coarse_mid": ("mid_child", "coarse_parent"),
            "mid_fine": ("fine_child", "mid_parent"),
        }[pair]
        projected = align[child_head](child)
        return alignment_loss(projected, align[parent_head](parent.detach())), projected

    def forward_step(self, views: torch.Tensor, step: int, generator: torch.Generator) -> StepOutput:
        o = self.options
        plan = self.plan(views.shape[0], generator)
        levels = self.run(views, plan)
        coarse, mid, fine = levels.coarse, levels.mid, levels.fine
        w_c, w_f = self.weights(step)
        loss = (
            w_c * o.w_coarse * coarse.loss
            + o.w_mid * mid.loss
            + o.w_align_coarse_mid * levels.align_coarse_mid
        )
        terms = {
            "coarse": coarse.loss.item(),
            "mid": mid.loss.item(),
            "align_coarse_mid": levels.align_coarse_mid.item(),
        }
        if fine is not None:
            loss = loss + w_f * o.w_fine * fine.loss + o.w_align_mid_fine * levels.align_mid_fine
            terms |= {"fine": fine.loss.item(), "align_mid_fine": levels.align_mid_fine.item()}
        variance = torch.stack([variance_loss(z) for z in levels.projections]).mean()
        loss = loss + o.variance_weight * variance
        terms["variance"] = variance.item()
        cosines = [cross_crop_cosine(z) for z in levels.projections]
        return StepOutput(
            loss=loss,
            terms=terms,
            # on the region's cells: the coarse level's hidden octants
            mask=upsample_mask(plan.octants, self.roi // self.cell, self.dims),
            reconstruction=coarse.reconstruction.detach(),
            extras={
                "coarse_weight": w_c,
                "fine_weight": w_f,
                # the alignment projections of different crops alike = the alignment has collapsed
                "output_cosine": max(cosines),
                "token_cosine": cross_crop_cosine(mid.tokens, mid.visible),
            },
            pictures=self.pictures(plan, levels),
        )

    # --- what the preview shows -------------------------------------------------------------------------------
    def level_map(self, plan: MiMPlan, first: int = 0) -> np.ndarray:
        """Region ``first``'s voxels labelled by the deepest level that hid them (nested by construction)."""
        d, roi, cell = self.dims, self.roi, self.cell
        out = upsample_mask(plan.octants[first : first + 1].cpu(), roi, d)[0].numpy().astype(np.uint8)
        per_region = plan.chosen.shape[1]
        n_fine = 0 if plan.fine_choice is None else plan.fine_choice.shape[1]
        for j, octant in enumerate(plan.chosen[first].tolist()):
            k = first * per_region + j  # the middle volume
            view = out[cell_slices(octant, (2,) * d, roi)]
            view[upsample_mask(plan.mid_cells[k : k + 1].cpu(), cell, d)[0].numpy()] = 2
            for i in range(n_fine):
                patch = cell_slices(int(plan.fine_choice[k, i]), self.cells, cell)
                sub = (
                    plan.fine_cells[k * n_fine + i : k * n_fine + i + 1].cpu().float()
                )  # over the upsampled patch
                # the fine cells shrink back onto the patch's own voxels
                hidden = F.interpolate(sub[None], size=(cell,) * d, mode="nearest")[0, 0].numpy() > 0.5
                view[patch][hidden] = 3
        return out

    def pictures(self, plan: MiMPlan, levels: MiMLevels) -> list[Picture]:
        level_map = self.level_map(plan)
        coarse = levels.coarse
        recon = coarse.reconstruction[:1].detach()
        if self.options.norm_pix_loss:  # norm-pix predictions put back into intensities, as MAE shows them
            recon = denormalise_cells(recon, coarse.inputs[:1].detach(), self.cell)
        recon = recon[0, 0].float().cpu().numpy()
        if self.dims == 2:
            level_map, recon = level_map[None], recon[None]
        factor = (2, 2, 2) if self.dims == 3 else (1, 2, 2)
        return [
            Picture(
                "levels",
                level_map,
                kind="labels",
                description="MiM's masks, nested: coarse, middle, fine",
                names=LEVEL_NAMES,
            ),
            Picture(
                "reconstruction (coarse level)",
                recon,
                factor=factor,
                description="the coarse input as reconstructed",
            ),
        ]
