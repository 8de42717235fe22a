"""Projection heads and decoders shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def pointwise_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution computed as a matmul over channels-last tokens: (B, C, *grid) -> (B, *grid, C').

    Same parameters and result as ``conv(x)`` (up to rounding). Why: a 1x1 convolution is a linear map per
    voxel, and the convolution kernels are slow for the decoders' shapes (a few deep tokens, tens of thousands
    of output channels: SimMIM's pixel-shuffle layer at stride 32 in 3D has 32768 x C weights); the matmul runs
    at the machine's speed, and the Swin stages already hand over channels-last tensors (no copy here).
    """
    weight = conv.weight.flatten(1)
    return F.linear(x.movedim(1, -1), weight, conv.bias)


def pixelshuffle_channels_last(y: torch.Tensor, dims: int, factor: int) -> torch.Tensor:
    """MONAI's `pixelshuffle` of the channels-first tensor ``y.movedim(-1, 1)``, read from channels-last ``y``.

    Channel ``c * factor**dims + offset`` (offsets row-major over the spatial axes) goes to voxel
    ``token * factor + offset`` of output channel ``c``, as in MONAI; one copy instead of two.
    """
    b, *grid, channels = y.shape
    out_channels = channels // factor**dims
    y = y.reshape(b, *grid, out_channels, *([factor] * dims))
    # (B, g1, .., gd, C, f1, .., fd) -> (B, C, g1, f1, g2, f2, ...)
    order = [0, dims + 1] + [i for axis in range(dims) for i in (1 + axis, dims + 2 + axis)]
    return y.permute(order).reshape(b, out_channels, *(g * factor for g in grid))


class PixelShuffleDecoder(nn.Module):
    """SimMIM's decoder: a 1x1 convolution to ``stride**dims`` channels and a pixel shuffle to voxels."""

    def __init__(self, in_channels: int, stride: int, dims: int, out_channels: int = 1) -> None:
        super().__init__()
        self.stride, self.dims, self.out_channels = stride, dims, out_channels
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(in_channels, out_channels * stride**dims, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixelshuffle_channels_last(pointwise_conv(self.conv, x), self.dims, self.stride)


class ReconstructionDecoder(nn.Module):
    """A light reconstruction decoder: a hidden layer on the deepest tokens, then a pixel shuffle to voxels.

    Returns the reconstruction and the hidden (decoder) features on the token grid, which MiM pools for its
    cross-level alignment and MIRAM interpolates onto a finer token grid for its high-resolution decoder.
    """

    def __init__(self, in_channels: int, hidden: int, stride: int, dims: int, out_channels: int = 1) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.hidden = nn.Sequential(conv(in_channels, hidden, kernel_size=1), nn.GELU())
        self.head = PixelShuffleDecoder(hidden, stride, dims, out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # channels-first view of channels-last features: the head reads them without a copy
        features = self.hidden[1](pointwise_conv(self.hidden[0], x)).movedim(-1, 1)
        return self.head(features), features


class MLPHead(nn.Module):
    """Linear, LayerNorm, GELU, Linear: a projector/predictor (BYOL-style; LayerNorm so batch 1 works)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
