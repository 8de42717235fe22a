"""The pretraining network: encoder + global and patch projection heads + reconstruction decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from napari_dagman.core.models.architecture import DEEPEST_STRIDE, Architecture
from napari_dagman.core.models.encoder import EncoderOutput, SwinEncoder
from napari_dagman.core.models.heads import PixelShuffleDecoder, ProjectionHead


@dataclass
class PretrainOutput:
    encoder: EncoderOutput
    global_logits: torch.Tensor | None
    patch_logits: torch.Tensor | None
    reconstruction: torch.Tensor | None
    #: global logits of the local crops (multi-crop), or None
    local_global_logits: torch.Tensor | None = None


class PretrainNetwork(nn.Module):
    """Student or teacher. Heads read the class-attention global token and the attention-stage tokens
    (SMIT's separate, unshared global and patch heads); the decoder reads the deepest stage (SimMIM)."""

    def __init__(self, arch: Architecture, *, heads: bool = True, decoder: bool = True) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = SwinEncoder(arch)
        width = arch.stage_channels(arch.attention_stage)
        self.global_head = (
            ProjectionHead(width, arch.out_dim, arch.head_hidden, arch.head_bottleneck) if heads else None
        )
        self.patch_head = (
            ProjectionHead(width, arch.out_dim, arch.head_hidden, arch.head_bottleneck) if heads else None
        )
        self.decoder = (
            PixelShuffleDecoder(arch.stage_channels(4), DEEPEST_STRIDE, arch.dims, arch.in_channels)
            if decoder
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
        attention_ignore: torch.Tensor | None = None,
        local: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """Encode ``x`` (hidden tokens behind the mask token) and apply the heads and the decoder.

        ``local`` are small crops (DINO/iBOT multi-crop) that only the global head sees, unmasked, in the same
        call (so one forward serves DistributedDataParallel); their logits are ``local_global_logits``.
        """
        enc = self.encoder(
            x,
            token_mask,
            noise_std,
            generator,
            class_attention=self.global_head is not None,
            attention_ignore=attention_ignore,
        )
        global_logits = self.global_head(enc.global_token) if self.global_head is not None else None
        patch_logits = self.patch_head(enc.tokens) if self.patch_head is not None else None
        recon = self.decoder(enc.stages[4]) if self.decoder is not None else None
        local_logits = None
        if local is not None and self.global_head is not None:
            local_logits = self.global_head(self.encoder(local).global_token)
        return PretrainOutput(enc, global_logits, patch_logits, recon, local_logits)
