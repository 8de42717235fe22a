"""CASS, Cross-Architectural Self-Supervision (Singh et al., arXiv 2206.04170), with our Swin as the transformer.

A CNN (MONAI's ResNet, ``cnn_depth``) and the Swin encoder see the same crop and are taught to agree: their
outputs, pooled and projected, are pulled together. Two forms of the agreement (``agreement``):

* ``paper``: the paper's and its notebook's L = mean(2 - 2 cos(z_transformer, z_cnn)), both networks trained
  through both sides, no predictor, no stop-gradient. The paper argues that the difference between the two
  architectures keeps the pair from collapsing. Measured here (tiny, ROI 32, 200 steps, main b4443b9): it does not;
  the loss fell from 1.99 to 0.0004 and the projections of 8 *different* crops reached cosine 1.0000 (Swin) and
  0.9994 (CNN): both networks output a constant.
* ``predictor`` (default): BYOL/SimSiam across architectures: each side has a predictor and is pulled towards the
  other side's projection held fixed (stop-gradient), L = 1/2 [D(q_t(z_t), sg(z_c)) + D(q_c(z_c), sg(z_t))].

Both forms take VICReg's variance term on the projections (``variance_weight``, default 1): over the batch, each
dimension of the sqrt(D)-scaled unit projections keeps a standard deviation of at least 1, so different crops
cannot all be mapped to one direction (the predictor alone delays collapse, the variance term forbids it). With the
paper's form and ``variance_weight`` 0 the method is the paper's, collapse included.

The Swin's output is its class-attention token by default (``transformer_pooling``): CASS uses the ViT's [CLS]
output, and the class-attention token is its counterpart on a Swin; so the class attention is trained and the
explorer's maps are attention. ``mean`` pools the deepest stage instead (the class attention is then untrained,
and the run says so). The run publishes both networks: ``transformer`` (fine-tuning, embeddings, attention) and
``cnn`` (embeddings). The gradients are zeroed every step by the training loop (the public notebook never zeroes
them, so its gradients accumulate over the whole run; we do not copy that).

Departures: the paper starts both networks from ImageNet weights (timm ResNet-50 and ViT-B/16) and trains them
with Adam (lr 1e-3) under stochastic weight averaging; this plugin downloads nothing, so both start from scratch,
and it trains them with the loop's AdamW and schedule like every other method. The notebook's natural-image
augmentations (colour jitter, perspective, flips) become the CT augmentations of `core.augment`, drawn once per
crop: both networks see the same augmented crop, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from napari_dagman.core.config import PretrainConfig, option
from napari_dagman.core.diversity import cross_crop_cosine
from napari_dagman.core.methods.base import (
    Capabilities,
    InputSpec,
    MethodOptions,
    PublishedEncoder,
    SSLMethod,
    StepOutput,
)
from napari_dagman.core.methods.losses import alignment_loss, predictor_agreement, variance_loss
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.cnn import RESNET_LAYERS, CNNArchitecture, CNNEncoder
from napari_dagman.core.models.encoder import EncoderOutput, SwinEncoder
from napari_dagman.core.models.heads import MLPHead

AGREEMENTS: tuple[str, ...] = ("predictor", "paper")


@dataclass
class CASSOptions(MethodOptions):
    """CASS's options: the CNN, the projection, how the transformer's output is pooled."""

    cnn_depth: int = option(18, "depth of the ResNet", choices=tuple(RESNET_LAYERS), group="cnn")
    cnn_width: float = option(
        1.0, "width factor of the ResNet (1 = 64..512 channels)", minimum=0.125, maximum=2.0, group="cnn"
    )
    projection_dim: int = option(256, "width of both projections the loss compares", minimum=8, group="loss")
    agreement: str = option(
        "predictor",
        "predictor = BYOL/SimSiam across architectures (a predictor per side, the other side held fixed); paper = "
        "the paper's symmetric 2 - 2 cos with both sides trained (collapses without the variance term)",
        choices=AGREEMENTS,
        group="loss",
    )
    variance_weight: float = option(
        1.0,
        "weight of VICReg's variance term on the projections over the batch (0 = none: the paper's form)",
        minimum=0.0,
        group="loss",
    )
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
        trains_class_attention=True,
        has_teacher=False,
        reconstructs=False,
        previews=("attention",),
        cell_masks=False,
    )
    preferred_encoder: ClassVar[str] = "transformer"
    inputs: ClassVar[InputSpec] = InputSpec(views=1)
    find_unused_parameters = (
        True  # nothing masks CASS's input; with mean pooling the class attention is unused
    )

    def untrained_parameters(self) -> tuple[str, ...]:
        unused = ("transformer.mask_token",)
        # the class-attention token reads stage 3, so the Swin's stage 4 gets no gradient in that mode (it stays at
        # its initialisation in the published transformer); mean pooling reads stage 4 and leaves the class attention
        if self.uses_class_attention:
            return (*unused, "transformer.swin.layers4.")
        return (*unused, "transformer.class_attention.")

    @classmethod
    def capabilities_for(cls, options: CASSOptions) -> Capabilities:
        if options.transformer_pooling == "class-attention":
            return cls.capabilities
        return Capabilities(
            trains_class_attention=False, has_teacher=False, reconstructs=False, previews=(), cell_masks=False
        )

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
        if options.agreement == "predictor":
            self.transformer_predictor = MLPHead(dim, dim, dim)
            self.cnn_predictor = MLPHead(dim, dim, dim)

    @property
    def uses_class_attention(self) -> bool:
        return self.options.transformer_pooling == "class-attention"

    def trained_modules(self) -> dict[str, nn.Module]:
        modules = {
            "transformer": self.transformer,
            "transformer_head": self.transformer_head,
            "cnn": self.cnn,
            "cnn_head": self.cnn_head,
        }
        if self.options.agreement == "predictor":
            modules |= {
                "transformer_predictor": self.transformer_predictor,
                "cnn_predictor": self.cnn_predictor,
            }
        return modules

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

    def project(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, EncoderOutput]:
        """(the transformer's projection, the CNN's projection, the transformer's encoder output) of ``views``."""
        out = self.network("transformer")(views, class_attention=self.uses_class_attention)
        pooled = out.global_token if self.uses_class_attention else out.stages[4].flatten(2).mean(-1)
        z_t = self.network("transformer_head")(pooled)
        z_c = self.network("cnn_head")(self.network("cnn")(views).pooled)
        return z_t, z_c, out

    def probe_outputs(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        z_t, z_c, _ = self.project(crops)
        return {"transformer": z_t, "cnn": z_c}

    def forward_step(
        self, views: torch.Tensor, step: int, generator: torch.Generator, **_: object
    ) -> StepOutput:
        o = self.options
        z_t, z_c, out = self.project(views)
        if o.agreement == "predictor":
            agreement = 0.5 * (
                predictor_agreement(self.network("transformer_predictor")(z_t), z_c)
                + predictor_agreement(self.network("cnn_predictor")(z_c), z_t)
            )
        else:
            agreement = alignment_loss(z_t, z_c)  # the paper's: symmetric, both sides keep their gradient
        variance = 0.5 * (variance_loss(z_t) + variance_loss(z_c))
        loss = agreement + o.variance_weight * variance
        mask = torch.zeros(views.shape[0], *self.cells, dtype=torch.bool)
        attention = out.attention.detach() if self.uses_class_attention else None
        return StepOutput(
            loss=loss,
            terms={"agreement": agreement.item(), "variance": variance.item()},
            mask=mask,
            attention=attention,
            grid=out.grid,
            extras={
                # different crops alike = collapse; both projections are watched, the alarm reads the larger
                "output_cosine": max(cross_crop_cosine(z_t), cross_crop_cosine(z_c)),
                "output_cosine_transformer": cross_crop_cosine(z_t),
                "output_cosine_cnn": cross_crop_cosine(z_c),
                "token_cosine": cross_crop_cosine(out.tokens),
            },
        )
