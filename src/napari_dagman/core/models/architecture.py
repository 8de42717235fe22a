"""Architecture descriptors: everything needed to rebuild a network from a checkpoint, nothing else.

An `Architecture` is stored (as JSON) in every run folder and in the metadata of every ``.safetensors`` file,
so a checkpoint is rebuilt from data, never from code, and a mismatch is refused with a clear message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from napari_dagman.core.errors import CheckpointError, DagmanInputError

#: Encoder and head sizes per preset. ``base`` is SMIT's configuration (embed 48, depths 2-2-4-2, heads 4).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 12,
        "depths": (2, 2, 2, 2),
        "num_heads": (4, 4, 4, 4),
        "drop_path": 0.0,
        "head_hidden": 256,
        "head_bottleneck": 64,
        "out_dim": 1024,
    },
    "small": {
        "embed_dim": 24,
        "depths": (2, 2, 2, 2),
        "num_heads": (4, 4, 4, 4),
        "drop_path": 0.1,
        "head_hidden": 1024,
        "head_bottleneck": 256,
        "out_dim": 4096,
    },
    "base": {
        "embed_dim": 48,
        "depths": (2, 2, 4, 2),
        "num_heads": (4, 4, 4, 4),
        "drop_path": 0.3,
        "head_hidden": 2048,
        "head_bottleneck": 256,
        "out_dim": 8192,
    },
}

PATCH_SIZE = 2
#: Total down-sampling of the deepest Swin stage (patch embedding x four patch mergings).
DEEPEST_STRIDE = 32


@dataclass(frozen=True)
class Architecture:
    """The shape of a pretraining network (encoder + heads + decoder)."""

    preset: str
    dims: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int = PATCH_SIZE
    in_channels: int = 1
    drop_path: float = 0.0
    attention_stage: int = 3
    sca_heads: int = 4
    sca_blocks: int = 2
    head_hidden: int = 2048
    head_bottleneck: int = 256
    out_dim: int = 8192

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise DagmanInputError(f"dims must be 2 or 3, got {self.dims}")
        if not 1 <= self.attention_stage <= 4:
            raise DagmanInputError(f"attention_stage must be 1..4, got {self.attention_stage}")
        if self.stage_channels(self.attention_stage) % self.sca_heads:
            raise DagmanInputError(
                f"sca_heads={self.sca_heads} must divide the attention stage width {self.stage_channels(self.attention_stage)}"
            )

    def stage_channels(self, stage: int) -> int:
        """Channels of encoder output ``stage`` (0 = patch embedding, 4 = deepest)."""
        return self.embed_dim * 2**stage

    def stage_stride(self, stage: int) -> int:
        """Voxels per token side at encoder output ``stage``."""
        return self.patch_size * 2**stage

    @property
    def attention_stride(self) -> int:
        """Voxels per side of one class-attention token."""
        return self.stage_stride(self.attention_stage)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["depths"], d["num_heads"] = list(self.depths), list(self.num_heads)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"preset", "dims", "embed_dim", "depths", "num_heads", "window_size"} - set(data)
        if missing:
            raise CheckpointError(f"architecture description lacks {', '.join(sorted(missing))}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["depths"], kwargs["num_heads"] = tuple(kwargs["depths"]), tuple(kwargs["num_heads"])
        return cls(**kwargs)

    def differences(self, other: Architecture) -> list[str]:
        """Human-readable list of fields that differ (empty when compatible)."""
        out = []
        for f in dataclasses.fields(self):
            if f.name == "drop_path":  # a training-time regulariser, not a shape
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name} {a} vs {b}")
        return out


def architecture_for(
    preset: str,
    dims: int,
    *,
    window_size: int | None = None,
    drop_path: float | None = None,
    attention_stage: int = 3,
    out_dim: int | None = None,
) -> Architecture:
    """The `Architecture` of a named preset (window 4 in 3D and 7 in 2D unless given)."""
    try:
        spec = PRESETS[preset]
    except KeyError:
        raise DagmanInputError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}") from None
    return Architecture(
        preset=preset,
        dims=dims,
        embed_dim=spec["embed_dim"],
        depths=tuple(spec["depths"]),
        num_heads=tuple(spec["num_heads"]),
        window_size=window_size or (4 if dims == 3 else 7),
        drop_path=spec["drop_path"] if drop_path is None else drop_path,
        attention_stage=attention_stage,
        head_hidden=spec["head_hidden"],
        head_bottleneck=spec["head_bottleneck"],
        out_dim=out_dim or spec["out_dim"],
    )


def checked_architecture(data: Any, source: str) -> Architecture:
    """`Architecture.from_dict` that says in one line what is wrong with a hand-edited description."""
    if not isinstance(data, dict):
        raise CheckpointError(f"the architecture description in {source} is not a JSON object")
    try:
        return Architecture.from_dict(data)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as err:
        if isinstance(err, DagmanInputError):
            raise
        raise CheckpointError(f"the architecture description in {source} is broken ({err})") from None
