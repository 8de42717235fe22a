"""SimMIM on the same Swin: random masks, no teacher, L1 reconstruction of the hidden voxels only.

The baseline without distillation (Xie et al., CVPR 2022; the reconstruction branch of SMIT). The class
attention module exists (same encoder, so checkpoints are interchangeable) but is not trained, which the
published encoder says, so the attention explorer does not present it as attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.methods.base import (
    Capabilities,
    MaskedMethod,
    MaskingOptions,
    PublishedEncoder,
    StepOutput,
)
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.pretrain import PretrainNetwork


class SimMIM(MaskedMethod):
    """Masked image modelling by reconstruction alone."""

    Options: ClassVar[type] = MaskingOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        trains_class_attention=False,
        has_teacher=False,
        reconstructs=True,
        previews=("mask", "reconstruction"),
    )
    preferred_encoder: ClassVar[str] = "student"
    find_unused_parameters = True  # the class attention module gets no gradient

    def untrained_parameters(self) -> tuple[str, ...]:
        return ("student.encoder.class_attention.",)

    def __init__(self, config: PretrainConfig, options: MaskingOptions, arch: Architecture) -> None:
        super().__init__(config, options, arch)
        self.student = PretrainNetwork(arch, heads=False, decoder=True)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def published_encoders(self) -> list[PublishedEncoder]:
        return [
            PublishedEncoder(
                "student",
                "student.encoder",
                class_attention_trained=False,
                description="the reconstructing encoder",
            )
        ]

    def forward_step(
        self, views: torch.Tensor, step: int, generator: torch.Generator, **_: object
    ) -> StepOutput:
        batch = views.shape[0]
        cell_mask = self.choose_mask(batch, step, None, (), generator)
        out = self.student(views, self.token_mask(cell_mask).to(views.device))
        loss = self.reconstruction_loss(views, out.reconstruction, cell_mask)
        return StepOutput(
            loss=loss,
            terms={"reconstruction": loss.item()},
            mask=cell_mask,
            reconstruction=out.reconstruction.detach(),
            extras={"token_cosine": self.token_cosine(out.encoder.tokens, cell_mask)},
        )
