"""Projection heads and decoders shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.utils import pixelshuffle
from torch import nn


class ProjectionHead(nn.Module):
    """DINO/iBOT projection head: 3-layer MLP, L2-normalised bottleneck, weight-normalised prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        last = nn.Linear(bottleneck, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        # norm_last_layer=True (DINO's default): the direction is learnt, the scale stays 1
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class PixelShuffleDecoder(nn.Module):
    """SimMIM's decoder: a 1x1 convolution to ``stride**dims`` channels and a pixel shuffle to voxels."""

    def __init__(self, in_channels: int, stride: int, dims: int, out_channels: int = 1) -> None:
        super().__init__()
        self.stride, self.dims, self.out_channels = stride, dims, out_channels
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(in_channels, out_channels * stride**dims, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixelshuffle(self.conv(x), self.dims, self.stride)
