"""CASS, Cross-Architectural Self-Supervision (Singh et al., arXiv 2206.04170), with our Swin as the transformer.

A CNN (MONAI's ResNet, ``cnn_depth``) and the Swin encoder see the same crop; each output, pooled and projected,
is pulled towards the other's: L = mean(2 - 2 cos(z_transformer, z_cnn)). Both networks are trained, with no
momentum encoder and no stop-gradient: the difference between the two architectures is what keeps the pair from
collapsing (the paper's argument). The gradients are zeroed every step by the training loop (the public notebook
never zeroes them, so its gradients accumulate over the whole run; we do not copy that).

The Swin's output is its class-attention token by default (``transformer_pooling``): CASS uses the ViT's
[CLS] output, and the class-attention token is its counterpart on a Swin; so the class attention is trained and the
explorer's maps are attention. ``mean`` pools the deepest stage instead (the class attention is then untrained,
and the run says so). The run publishes both networks: ``transformer`` (fine-tuning, embeddings, attention) and
``cnn`` (embeddings).

Departures: the paper starts both networks from ImageNet weights (timm ResNet-50 and ViT-B/16) and trains them
with Adam (lr 1e-3) under stochastic weight averaging; this plugin downloads nothing, so both start from scratch,
and it trains them with the loop's AdamW and schedule like every other method. The notebook's augmentations
(colour jitter, perspective, flips of natural images) are left out: both networks see the same random crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from napari_dagman.core.config import PretrainConfig, option
from napari_dagman.core.methods.base import (
    Capabilities,
    InputSpec,
    MethodOptions,
    PublishedEncoder,
    SSLMethod,
    StepOutput,
)
from napari_dagman.core.methods.losses import alignment_loss
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.cnn import RESNET_LAYERS, CNNArchitecture, CNNEncoder
from napari_dagman.core.models.encoder import SwinEncoder
from napari_dagman.core.models.heads import MLPHead


@dataclass
class CASSOptions(MethodOptions):
    """CASS's options: the CNN, the projection, how the transformer's output is pooled."""

    cnn_depth: int = option(18, "depth of the ResNet", choices=tuple(RESNET_LAYERS), group="cnn")
    cnn_width: float = option(
        1.0, "width factor of the ResNet (1 = 64..512 channels)", minimum=0.125, maximum=2.0, group="cnn"
    )
    projection_dim: int = option(256, "width of both projections the loss compares", minimum=8, group="loss")
    transformer_pooling: str = option(
        "class-attention",
        "the transformer's output: its class-attention token (CASS's [CLS]) or the mean of its deepest stage",
        choices=("class-attention", "mean"),
        group="loss",
    )


class CASS(SSLMethod):
    """A CNN and a transformer taught to agree on the same crop."""

    Options: ClassVar[type] = CASSOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        trains_class_attention=True, has_teacher=False, reconstructs=False, previews=("attention",), cell_masks=False
    )
    preferred_encoder: ClassVar[str] = "transformer"
    inputs: ClassVar[InputSpec] = InputSpec(views=1)
    find_unused_parameters = True  # with mean pooling the class attention gets no gradient

    @classmethod
    def capabilities_for(cls, options: CASSOptions) -> Capabilities:
        if options.transformer_pooling == "class-attention":
            return cls.capabilities
        return Capabilities(trains_class_attention=False, has_teacher=False, reconstructs=False, previews=(), cell_masks=False)

    def __init__(self, config: PretrainConfig, options: CASSOptions, arch: Architecture) -> None:
        super().__init__(config, options, arch)
        self.cnn_arch = CNNArchitecture(options.cnn_depth, options.cnn_width, arch.dims, arch.in_channels)
        self.transformer = SwinEncoder(arch)
        self.cnn = CNNEncoder(self.cnn_arch)
        width_t = arch.stage_channels(arch.attention_stage if self.uses_class_attention else 4)
        width_c = self.cnn_arch.stage_channels(4)
        dim = options.projection_dim
        self.transformer_head = MLPHead(width_t, max(width_t, dim), dim)
        self.cnn_head = MLPHead(width_c, max(width_c, dim), dim)

    @property
    def uses_class_attention(self) -> bool:
        return self.options.transformer_pooling == "class-attention"

    def trained_modules(self) -> dict[str, nn.Module]:
        return {
            "transformer": self.transformer,
            "transformer_head": self.transformer_head,
            "cnn": self.cnn,
            "cnn_head": self.cnn_head,
        }

    def published_encoders(self) -> list[PublishedEncoder]:
        return [
            PublishedEncoder(
                "transformer",
                "transformer",
                class_attention_trained=self.uses_class_attention,
                description="CASS's transformer (the Swin)",
            ),
            PublishedEncoder(
                "cnn",
                "cnn",
                kind="resnet",
                class_attention_trained=False,
                architecture=self.cnn_arch.to_dict(),
                description=f"CASS's CNN (ResNet-{self.cnn_arch.depth})",
            ),
        ]

    def attention_encoders(self) -> dict[str, nn.Module]:
        return {"transformer": self.network("transformer")} if self.uses_class_attention else {}

    def forward_step(self, views: torch.Tensor, step: int, generator: torch.Generator) -> StepOutput:
        out = self.network("transformer")(views, class_attention=self.uses_class_attention)
        pooled = out.global_token if self.uses_class_attention else out.stages[4].flatten(2).mean(-1)
        z_t = self.network("transformer_head")(pooled)
        z_c = self.network("cnn_head")(self.network("cnn")(views).pooled)
        loss = alignment_loss(z_t, z_c)  # symmetric; both sides keep their gradient
        mask = torch.zeros(views.shape[0], *self.cells, dtype=torch.bool)
        attention = out.attention.detach() if self.uses_class_attention else None
        return StepOutput(
            loss=loss,
            terms={"agreement": loss.item()},
            mask=mask,
            attention=attention,
            grid=out.grid,
        )
