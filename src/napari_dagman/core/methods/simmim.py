"""SimMIM on the same Swin: random masks, no teacher, L1 reconstruction of the hidden voxels only.

The baseline without distillation (Xie et al., CVPR 2022; the reconstruction branch of SMIT). The class
attention module exists (same architecture, so checkpoints are interchangeable) but is not trained.
"""

from __future__ import annotations

import torch

from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.methods.base import SSLMethod, StepOutput
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.pretrain import PretrainNetwork


class SimMIM(SSLMethod):
    """Masked image modelling by reconstruction alone."""

    find_unused_parameters = True  # the class attention module gets no gradient

    def __init__(self, config: PretrainConfig, arch: Architecture) -> None:
        super().__init__(config, arch)
        self.student = PretrainNetwork(arch, heads=False, decoder=True)

    def forward_step(self, views: torch.Tensor, step: int, generator: torch.Generator) -> StepOutput:
        batch = views.shape[0]
        cell_mask = self.choose_mask(batch, step, None, (), generator)
        out = self.student(views, self.token_mask(cell_mask).to(views.device))
        loss_rec = self.reconstruction_loss(views, out.reconstruction, cell_mask)
        loss = self.config.w_rec * loss_rec
        return StepOutput(
            loss=loss,
            terms={"reconstruction": loss_rec.item()},
            mask=cell_mask,
            reconstruction=out.reconstruction.detach(),
        )
