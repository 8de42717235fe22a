"""A toy self-supervised method written outside the package: the proof that a method is one file + one entry.

BYOL-like: an online Swin encoder and a predictor (two trained modules) predict, across views, the pooled
deepest features of an EMA target encoder (an EMA module). Its own option ``toy_scale`` weighs the loss. It
publishes the online encoder (preferred) and the target. Nothing in ``src/`` knows about it: tests register it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_dagman.core.config import option
from napari_dagman.core.methods.base import (
    Capabilities,
    MethodOptions,
    PublishedEncoder,
    SSLMethod,
    StepOutput,
)
from napari_dagman.core.methods.losses import ema_update
from napari_dagman.core.methods.registry import MethodSpec, register
from napari_dagman.core.models.encoder import SwinEncoder


@dataclass
class ToyOptions(MethodOptions):
    toy_scale: float = option(
        0.5, "weight of the toy's prediction loss", minimum=0.0, maximum=10.0, group="toy"
    )
    toy_momentum: float = option(
        0.99, "EMA momentum of the toy's target", minimum=0.0, maximum=1.0, group="toy"
    )


class ToyMethod(SSLMethod):
    Options: ClassVar[type] = ToyOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        trains_class_attention=False,
        has_teacher=True,
        reconstructs=False,
        previews=("mask",),
        cell_masks=False,
    )
    preferred_encoder: ClassVar[str] = "online"
    find_unused_parameters = True  # the class attention of the encoders is not used

    def __init__(self, config, options, arch) -> None:
        super().__init__(config, options, arch)
        self.online = SwinEncoder(arch)
        width = arch.stage_channels(4)
        self.predictor = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"online": self.online, "predictor": self.predictor}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def untrained_parameters(self) -> tuple[str, ...]:
        return ("online.class_attention.", "online.mask_token")

    def published_encoders(self) -> list[PublishedEncoder]:
        return [
            PublishedEncoder("online", "online", class_attention_trained=False),
            PublishedEncoder("target", "target", class_attention_trained=False),
        ]

    def forward_step(
        self, views: torch.Tensor, step: int, generator: torch.Generator, **_: object
    ) -> StepOutput:
        batch = views.shape[0] // 2
        pooled = self.online(views, class_attention=False).stages[4].flatten(2).mean(-1)
        prediction = self.predictor(pooled)
        with torch.no_grad():
            target = self.target(views, class_attention=False).stages[4].flatten(2).mean(-1)
        swapped = torch.cat([target[batch:], target[:batch]])  # view 1 predicts view 2 and back
        loss = self.options.toy_scale * (2 - 2 * F.cosine_similarity(prediction, swapped, dim=-1)).mean()
        mask = torch.zeros(views.shape[0], *self.cells, dtype=torch.bool)
        return StepOutput(loss=loss, terms={"prediction": float(loss.detach())}, mask=mask)

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        ema_update(self.target, self.network("online"), self.options.toy_momentum)
        return {"momentum": self.options.toy_momentum}


TOY = register(
    MethodSpec(
        name="toy",
        title="Toy (tests)",
        summary="A BYOL-like toy defined in the tests: two trained modules and an EMA target.",
        module=__name__,
        class_name="ToyMethod",
    )
)
