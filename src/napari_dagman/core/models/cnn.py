"""A CNN encoder for CASS: MONAI's ResNet (2D or 3D), seen through the same interface as the Swin encoder.

`CNNEncoder` returns its five feature maps (the stem and the four residual stages, strides 2, 4, 8, 16 and 32,
like the Swin's five stage outputs), so embeddings and pooling work on either network. Its `CNNArchitecture`
is stored with the run (in the published encoder's entry), so a checkpoint rebuilds it from data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.models.architecture import Architecture

#: residual blocks per stage of MONAI's ResNet variants
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
}
RESNET_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class CNNArchitecture:
    """What rebuilds a `CNNEncoder`: depth, width factor, dimensions, input channels (group norm, 8 groups)."""

    depth: int = 18
    width: float = 1.0
    dims: int = 3
    in_channels: int = 1

    def __post_init__(self) -> None:
        if self.depth not in RESNET_LAYERS:
            raise DagmanInputError(f"ResNet depth must be one of {', '.join(map(str, RESNET_LAYERS))}")
        if int(RESNET_WIDTHS[0] * self.width) % 8:
            raise DagmanInputError(f"the ResNet width factor {self.width} must give channels divisible by 8")

    @property
    def bottleneck(self) -> bool:
        return self.depth >= 50

    def stage_channels(self, stage: int) -> int:
        """Channels of feature map ``stage`` (0 = stem, 4 = deepest)."""
        expansion = 4 if self.bottleneck else 1
        widths = [int(w * self.width) for w in RESNET_WIDTHS]
        return widths[0] if stage == 0 else widths[stage - 1] * expansion

    def stage_stride(self, stage: int) -> int:
        return 2 ** (stage + 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CNNOutput:
    stages: list[torch.Tensor]
    pooled: torch.Tensor


class CNNEncoder(nn.Module):
    """MONAI ResNet (no classifier) with its stage outputs exposed."""

    def __init__(self, arch: CNNArchitecture) -> None:
        super().__init__()
        from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck

        self.arch = arch
        self.net = ResNet(
            block=ResNetBottleneck if arch.bottleneck else ResNetBlock,
            layers=list(RESNET_LAYERS[arch.depth]),
            block_inplanes=list(RESNET_WIDTHS),
            spatial_dims=arch.dims,
            n_input_channels=arch.in_channels,
            conv1_t_stride=2,  # MONAI's default keeps the first axis at full resolution: isotropic here
            widen_factor=arch.width,
            feed_forward=False,
        )
        # CT batches are 1-4 crops, where batch statistics are noise (and a 1-voxel deepest map has none): group
        # normalisation instead of the ResNet's batch normalisation (MONAI 1.6 passes its `norm` argument to
        # the stem only, so the layers are converted here)
        _to_group_norm(self.net)

    def forward(self, x: torch.Tensor, *_: Any, class_attention: bool = False, **__: Any) -> CNNOutput:
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        stages = [x]
        x = net.maxpool(x) if not net.no_max_pool else x
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            stages.append(x)
        return CNNOutput(stages, stages[-1].flatten(2).mean(-1))


def _to_group_norm(module: nn.Module, groups: int = 8) -> None:
    """Replace every batch normalisation inside ``module`` by a group normalisation of the same width."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.GroupNorm(groups, child.num_features))
        else:
            _to_group_norm(child, groups)


def build_cnn_encoder(_: Architecture, description: dict[str, Any]) -> nn.Module:
    """The published ``resnet`` kind (see `core.models.published`)."""
    return CNNEncoder(CNNArchitecture(**description))
