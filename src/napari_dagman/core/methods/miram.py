"""MIRAM, Masked Image Reconstruction Across Multiple Scales (Vo et al., arXiv 2503.07157), on our Swin.

Random masking (MAE: ``mask_ratio`` 0.75 of the cells); the encoder sees the crop with the hidden cells behind
the mask token; one decoder reconstructs the crop at its own scale, a second one reconstructs it at ``scale`` times
the resolution from the first decoder's tokens interpolated onto the finer token grid (MIRAM's "token
interpolation"). The high-resolution target is the same region resampled from the CT at the run's spacing divided
by ``scale``: where the CT is finer than the run's spacing that is real detail the model input does not have;
where it is not, it is an interpolation of the input (said in docs/methods.md). Both losses are MAE's MSE on
per-cell normalised voxels over the hidden cells only (the hidden cells scaled onto the finer grid):
L = w_low L_low + w_high L_high (lambda = 1 [ours: the paper's value was not retrievable]).

Departures, because this plugin pretrains the same Swin for every method: MIRAM's encoder is a ViT that drops
the hidden patches (MAE) and its decoders are transformers (a linear-attention one at high resolution in its
later versions); ours is the Swin with a mask token (SimMIM style) and two light convolutional decoders.
It runs in 2D (mammography-like images, CT slices; in-plane refinement) and in 3D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_dagman.core.config import PretrainConfig, option
from napari_dagman.core.events import Picture
from napari_dagman.core.methods.base import (
    Capabilities,
    InputSpec,
    MaskedMethod,
    MaskingOptions,
    PublishedEncoder,
    StepOutput,
)
from napari_dagman.core.methods.losses import denormalise_cells, masked_cell_mse
from napari_dagman.core.models.architecture import DEEPEST_STRIDE, Architecture
from napari_dagman.core.models.encoder import SwinEncoder
from napari_dagman.core.models.heads import PixelShuffleDecoder, ReconstructionDecoder


@dataclass
class MIRAMOptions(MaskingOptions):
    """MIRAM's options: the masking of MAE, the scale of the second decoder, the two loss weights."""

    scale: int = option(
        2,
        "resolution factor of the second decoder's target (2 = half the voxel size)",
        choices=(2, 4),
        group="scales",
    )
    w_low: float = option(1.0, "weight of the reconstruction at the input scale", minimum=0.0, group="loss")
    w_high: float = option(1.0, "weight of the high-resolution reconstruction", minimum=0.0, group="loss")
    norm_pix_loss: bool = option(True, "standardise each target cell (MAE's norm_pix_loss)", group="loss")


class MIRAM(MaskedMethod):
    """Masked reconstruction at the input scale and at a finer one, from one encoder."""

    Options: ClassVar[type] = MIRAMOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        trains_class_attention=False,
        has_teacher=False,
        reconstructs=True,
        previews=("mask", "reconstruction"),
    )
    preferred_encoder: ClassVar[str] = "encoder"
    find_unused_parameters = True  # the encoder's class attention gets no gradient

    def untrained_parameters(self) -> tuple[str, ...]:
        return ("encoder.class_attention.",)

    @classmethod
    def input_spec(cls, options: MIRAMOptions, roi: int) -> InputSpec:
        return InputSpec(views=1, scale=1, high_res=options.scale)

    def __init__(self, config: PretrainConfig, options: MIRAMOptions, arch: Architecture) -> None:
        super().__init__(config, options, arch)
        width = arch.stage_channels(4)
        self.encoder = SwinEncoder(arch)
        self.decoder = ReconstructionDecoder(width, width, DEEPEST_STRIDE, arch.dims, arch.in_channels)
        conv = nn.Conv3d if arch.dims == 3 else nn.Conv2d
        self.decoder_high = nn.Sequential(
            conv(width, width, kernel_size=1),
            nn.GELU(),
            PixelShuffleDecoder(width, DEEPEST_STRIDE, arch.dims, arch.in_channels),
        )

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder, "decoder_high": self.decoder_high}

    def published_encoders(self) -> list[PublishedEncoder]:
        return [
            PublishedEncoder(
                "encoder", "encoder", class_attention_trained=False, description="MIRAM's encoder"
            )
        ]

    def forward_step(
        self,
        views: torch.Tensor,
        step: int,
        generator: torch.Generator,
        high_res: torch.Tensor | None = None,
        **_: object,
    ) -> StepOutput:
        o, d = self.options, self.dims
        if high_res is None:
            raise ValueError("MIRAM needs the high-resolution crops of its views")
        cells = self.choose_mask(views.shape[0], step, None, (), generator)
        out = self.network("encoder")(views, self.token_mask(cells).to(views.device), class_attention=False)
        low, features = self.network("decoder")(out.stages[4])
        # token interpolation: the decoder tokens onto a token grid `scale` times finer
        mode = "trilinear" if d == 3 else "bilinear"
        finer = F.interpolate(features, scale_factor=o.scale, mode=mode, align_corners=False)
        high = self.network("decoder_high")(finer)
        mask = cells.to(views.device)
        loss_low = masked_cell_mse(views, low, mask, self.config.mask_cell, normalise=o.norm_pix_loss)
        loss_high = masked_cell_mse(
            high_res, high, mask, self.config.mask_cell * o.scale, normalise=o.norm_pix_loss
        )
        loss = o.w_low * loss_low + o.w_high * loss_high
        return StepOutput(
            loss=loss,
            terms={"reconstruction": loss_low.item(), "reconstruction_high": loss_high.item()},
            mask=cells,
            reconstruction=low.detach(),
            pictures=self.pictures(views[:1], low[:1], high_res[:1], high[:1]),
            extras={"token_cosine": self.token_cosine(out.tokens, cells)},
        )

    def pictures(self, views, low, high_res, high) -> list[Picture]:
        """Both reconstructions of the first crop, in model intensities (norm-pix predictions put back)."""
        cell, o = self.config.mask_cell, self.options
        with torch.no_grad():
            if o.norm_pix_loss:
                low, high = (
                    denormalise_cells(low, views, cell),
                    denormalise_cells(high, high_res, cell * o.scale),
                )
        low_np, high_np = low[0, 0].float().cpu().numpy(), high[0, 0].float().cpu().numpy()
        f = 1.0 / self.options.scale
        if self.dims == 2:
            low_np, high_np = low_np[None], high_np[None]
            finer = (1.0, f, f)
        else:
            finer = (f, f, f)
        return [
            Picture("reconstruction", low_np, description="the crop as reconstructed at its own scale"),
            Picture(
                f"reconstruction x{self.options.scale}",
                high_np,
                factor=finer,
                description=f"the crop as reconstructed at {self.options.scale}x the resolution",
            ),
        ]
