"""The one registry of self-supervised methods that the engine, the CLI and the GUI read.

Entries are light (no torch import): the implementing class is imported only when a run starts. A method is
added by writing one file in this package and one `MethodSpec` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from napari_dagman.core.errors import DagmanInputError


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: where its code lives and the config defaults that make it what it is."""

    name: str
    title: str
    summary: str
    module: str
    class_name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    uses_teacher: bool = True

    def load(self) -> type:
        """Import and return the implementing class."""
        return getattr(importlib.import_module(self.module), self.class_name)


_CODISTILLATION = "napari_dagman.core.methods.dagman"

REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"method '{spec.name}' is registered twice")
    REGISTRY[spec.name] = spec
    return spec


register(
    MethodSpec(
        name="dagman",
        title="DAGMaN",
        summary="Attention-guided masks chosen by a noisy EMA teacher's semantic class attention; global + "
        "masked-patch distillation and L1 reconstruction (Jiang et al., MIDL 2025).",
        module=_CODISTILLATION,
        class_name="CoDistillation",
        defaults={"mask_strategy": "attention-high", "mask_ratio": 0.6, "teacher_noise": "input-dropout"},
    )
)
register(
    MethodSpec(
        name="attmask",
        title="AttMask (clean teacher)",
        summary="Attention-guided masks from an EMA teacher without noise, AttMask's recipe (ratio 0.3 +- 0.2, "
        "half the images masked) on Swin + class attention (Kakogeorgiou et al., ECCV 2022).",
        module=_CODISTILLATION,
        class_name="CoDistillation",
        # AttMask's recipe: ratio 0.3 +- 0.2 per image, half of the images masked at all
        defaults={
            "mask_strategy": "attention-high",
            "mask_ratio": 0.3,
            "mask_ratio_jitter": 0.2,
            "masking_prob": 0.5,
            "teacher_noise": "none",
        },
    )
)
register(
    MethodSpec(
        name="smit",
        title="SMIT",
        summary="Random masks with a clean EMA teacher: SMIT's co-distillation (Jiang et al., MICCAI 2022).",
        module=_CODISTILLATION,
        class_name="CoDistillation",
        defaults={"mask_strategy": "random", "mask_ratio": 0.7, "teacher_noise": "none"},
    )
)
register(
    MethodSpec(
        name="simmim",
        title="SimMIM",
        summary="Random masks, no teacher: L1 reconstruction of the masked voxels only (Xie et al., CVPR 2022).",
        module="napari_dagman.core.methods.simmim",
        class_name="SimMIM",
        defaults={
            "mask_strategy": "random",
            "mask_ratio": 0.6,
            "teacher_noise": "none",
            "w_global": 0.0,
            "w_patch": 0.0,
            "w_rec": 1.0,
        },
        uses_teacher=False,
    )
)


def get_method(name: str) -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DagmanInputError(f"unknown method '{name}'; choose one of {', '.join(REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)
