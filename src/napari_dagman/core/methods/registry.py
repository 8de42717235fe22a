"""The one registry of self-supervised methods that the training loop, the CLI and the GUI read.

Entries are light (no torch import): the implementing class is imported only when its options or a run need it.
A method is added by writing one file in this package (or anywhere importable) and registering one
`MethodSpec`; a preset is an entry that reuses another's class with other option defaults.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from napari_dagman.core.errors import DagmanInputError


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: where its class lives, the option defaults that make this preset, and its paper."""

    name: str
    title: str
    summary: str
    module: str
    class_name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    paper: str = ""

    def load(self) -> type:
        """Import and return the implementing class (an `SSLMethod`)."""
        try:
            return getattr(importlib.import_module(self.module), self.class_name)
        except (ImportError, AttributeError) as err:
            raise DagmanInputError(
                f"method '{self.name}' cannot be loaded from {self.module}: {err}"
            ) from None

    def options_class(self) -> type:
        return self.load().Options

    def make_options(self, values: dict[str, Any] | None = None) -> Any:
        """The method's options: the class defaults, then this preset's, then ``values`` (checked)."""
        from napari_dagman.core.config.base import unknown_options_message

        cls = self.options_class()
        values = dict(values or {})
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise DagmanInputError(unknown_options_message(f"{self.name}", unknown, cls.field_names()))
        return cls.from_dict({**self.defaults, **values})

    def default_options(self) -> dict[str, Any]:
        """This preset's option values before a run resolves them (what ``--help`` and the dock show)."""
        return self.make_options().to_dict()

    @property
    def capabilities(self) -> Any:
        """The capabilities of this preset (with its default options)."""
        return self.load().capabilities_for(self.make_options())


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method. Registering the same spec again is a no-op (a module imported twice, a child process)."""
    known = REGISTRY.get(spec.name)
    if known is not None:
        if known == spec:
            return known
        raise ValueError(f"method '{spec.name}' is registered twice, differently")
    REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DagmanInputError(f"unknown method '{name}'; choose one of {', '.join(REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


_CODISTILLATION = "napari_dagman.core.methods.dagman"

register(
    MethodSpec(
        name="dagman",
        title="DAGMaN",
        summary="Attention-guided masks chosen by a noisy EMA teacher's semantic class attention; global + "
        "masked-patch distillation and L1 reconstruction.",
        module=_CODISTILLATION,
        class_name="CoDistillation",
        defaults={"mask_strategy": "attention-high", "mask_ratio": 0.6, "teacher_noise": "input-dropout"},
        paper="Jiang, Rangnekar, Veeraraghavan: DAGMaN, MIDL 2025 (arXiv 2604.14506); SMART, arXiv 2310.01209",
    )
)
register(
    MethodSpec(
        name="attmask",
        title="AttMask (clean teacher)",
        summary="Attention-guided masks from an EMA teacher without noise, AttMask's recipe (ratio 0.3 +- 0.2, "
        "half the images masked) on Swin + class attention.",
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
        paper="Kakogeorgiou et al.: What to Hide from Your Students: Attention-Guided Masked Image Modeling, "
        "ECCV 2022",
    )
)
register(
    MethodSpec(
        name="smit",
        title="SMIT",
        summary="Random masks with a clean EMA teacher: SMIT's co-distillation.",
        module=_CODISTILLATION,
        class_name="CoDistillation",
        defaults={"mask_strategy": "random", "mask_ratio": 0.7, "teacher_noise": "none"},
        paper="Jiang et al.: Self-supervised 3D anatomy segmentation using self-distilled masked image "
        "transformer (SMIT), MICCAI 2022",
    )
)
register(
    MethodSpec(
        name="simmim",
        title="SimMIM",
        summary="Random masks, no teacher: L1 reconstruction of the masked voxels only.",
        module="napari_dagman.core.methods.simmim",
        class_name="SimMIM",
        defaults={"mask_strategy": "random", "mask_ratio": 0.6},
        paper="Xie et al.: SimMIM: A Simple Framework for Masked Image Modeling, CVPR 2022",
    )
)
register(
    MethodSpec(
        name="mim",
        title="MiM (mask in mask)",
        summary="Masked reconstruction of one region at three levels (coarse octants, middle sub-volumes, fine "
        "patches), aligned across levels; on the same Swin.",
        module="napari_dagman.core.methods.mim",
        class_name="MiM",
        paper="Zhuang et al.: MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis, "
        "IEEE TMI 2025 (arXiv 2404.15580)",
    )
)
register(
    MethodSpec(
        name="miram",
        title="MIRAM (multi-scale reconstruction)",
        summary="Random masks; one decoder reconstructs the hidden cells at the input scale, a second one at twice "
        "the resolution from interpolated decoder tokens; on the same Swin.",
        module="napari_dagman.core.methods.miram",
        class_name="MIRAM",
        defaults={"mask_strategy": "random", "mask_ratio": 0.75},
        paper="Vo et al.: MIRAM: Masked Image Reconstruction Across Multiple Scales for Breast Lesion Risk "
        "Prediction (arXiv 2503.07157)",
    )
)
register(
    MethodSpec(
        name="cass",
        title="CASS (CNN + transformer)",
        summary="A ResNet and the Swin see the same crop and are taught to agree (2 - 2 cos of their projected "
        "outputs); both trained, no teacher.",
        module="napari_dagman.core.methods.cass",
        class_name="CASS",
        paper="Singh et al.: CASS: Cross Architectural Self-Supervision for Medical Image Analysis (arXiv "
        "2206.04170)",
    )
)
