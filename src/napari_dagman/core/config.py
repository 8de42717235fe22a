"""Job configurations: validated dataclasses with JSON round-trip, from which the CLI flags and GUI forms are built.

Each field carries its help text (CLI ``--help`` and GUI tooltip) through :func:`option`. A config file and
command-line flags compose: the file is read first, flags given explicitly override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from napari_dagman.core.errors import DagmanInputError

C = TypeVar("C", bound="ConfigBase")


def option(
    default: Any,
    help: str,
    *,
    choices: typing.Sequence[Any] | None = None,
    cli: bool = True,
    flag: str | None = None,
    group: str = "general",
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A dataclass field with the metadata the CLI and GUI use."""
    meta = {
        "help": help,
        "choices": choices,
        "cli": cli,
        "flag": flag,
        "group": group,
        "minimum": minimum,
        "maximum": maximum,
    }
    if isinstance(default, list | dict | tuple) and not isinstance(default, tuple):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@dataclass
class ConfigBase:
    """JSON round-trip, validation and argparse integration shared by every job config."""

    kind: ClassVar[str] = "config"

    # --- dict / JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, strict: bool = True) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise DagmanInputError(f"unknown {cls.kind} option(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                continue
            tp, _ = _unwrap_optional(hints[key])
            if value is not None and typing.get_origin(tp) is tuple:
                value = tuple(value)
            kwargs[key] = value
        config = cls(**kwargs)
        config.validate()
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        from napari_dagman.core.io import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path, *, strict: bool = True) -> C:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DagmanInputError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise DagmanInputError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise DagmanInputError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data, strict=strict)

    def replace(self: C, **changes: Any) -> C:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # --- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check types, choices and bounds declared with :func:`option`; subclasses add cross-field checks."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp, optional = _unwrap_optional(hints[f.name])
            if value is None:
                if not optional:
                    raise DagmanInputError(f"{f.name} must be set")
                continue
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if (
                tp in (int, float, str, bool)
                and not isinstance(value, tp)
                or (tp is int and isinstance(value, bool))
            ):
                raise DagmanInputError(f"{f.name} must be {tp.__name__}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise DagmanInputError(
                    f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}"
                )
            lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
            if lo is not None and isinstance(value, int | float) and value < lo:
                raise DagmanInputError(f"{f.name} must be >= {lo}, got {value}")
            if hi is not None and isinstance(value, int | float) and value > hi:
                raise DagmanInputError(f"{f.name} must be <= {hi}, got {value}")

    # --- argparse -----------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, skip: typing.Iterable[str] = ()) -> None:
        """Add one ``--flag`` per field (defaults suppressed, so only flags the user gives override)."""
        hints = typing.get_type_hints(cls)
        skip = set(skip)
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            if f.name in skip or not f.metadata.get("cli", True):
                continue
            tp, _ = _unwrap_optional(hints[f.name])
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            group_name = f.metadata.get("group", "general")
            group = groups.setdefault(group_name, parser.add_argument_group(f"{group_name} options"))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) in (list, tuple):
                (inner, *_) = typing.get_args(tp) or (str,)
                kwargs.update(nargs="+", type=inner, metavar=f.name.upper())
            else:
                kwargs["type"] = tp
                if f.metadata.get("choices") is not None:
                    kwargs["choices"] = list(f.metadata["choices"])
            group.add_argument(flag, **kwargs)

    @classmethod
    def from_args(
        cls: type[C], args: argparse.Namespace, *, config_file: str | None = None, **extra: Any
    ) -> C:
        """Config from an optional JSON file, then the flags given on the command line, then ``extra``."""
        data: dict[str, Any] = cls.load(config_file).to_dict() if config_file else {}
        names = {f.name for f in dataclasses.fields(cls)}
        data.update({k: v for k, v in vars(args).items() if k in names})
        data.update({k: v for k, v in extra.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text (GUI tooltips)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------------------
from napari_dagman.core.methods.registry import method_names  # noqa: E402

METHOD_NAMES: tuple[str, ...] = method_names()
#: Mask strategies (implemented in `core.masking`).
MASK_STRATEGIES: tuple[str, ...] = ("random", "block", "attention-high", "attention-low", "attention-hint")
TEACHER_NOISES: tuple[str, ...] = ("none", "input-dropout", "gaussian")
PRESET_NAMES: tuple[str, ...] = ("tiny", "small", "base")


@dataclass
class PretrainConfig(ConfigBase):
    """Self-supervised pretraining. ``None`` means "the method's / preset's default" (resolved at start)."""

    kind: ClassVar[str] = "pretrain"

    images: list[str] = option([], "image files or DICOM folders to pretrain on", cli=False, group="data")
    out: str | None = option(None, "run folder to write (created if missing)", cli=False, group="run")
    method: str = option(
        "dagman", "self-supervised method (see `napari-dagman methods`)", choices=METHOD_NAMES
    )
    preset: str = option(
        "small",
        "encoder size: tiny (CPU/tests), small, base (SMIT's Swin)",
        choices=PRESET_NAMES,
        group="model",
    )
    dims: int = option(
        3, "3 = volumes (window 4), 2 = axial slices (window 7)", choices=(2, 3), group="model"
    )
    roi: int = option(96, "crop side in voxels; a multiple of 32", minimum=32, group="data")
    spacing: float | None = option(
        2.0,
        "resample to this isotropic spacing in mm (2D: in-plane); omit to keep the file's",
        minimum=0.05,
        group="data",
    )
    hu_min: float = option(-175.0, "model input: HU mapped to 0 (clipped below)", group="data")
    hu_max: float = option(250.0, "model input: HU mapped to 1 (clipped above)", group="data")
    steps: int | None = option(
        None, "optimiser steps (give steps or epochs; default 1000 steps)", minimum=1, group="optimisation"
    )
    epochs: int | None = option(
        None, "passes over the volumes (batch-size volumes per step)", minimum=1, group="optimisation"
    )
    batch_size: int = option(2, "volumes per step; each gives two views", minimum=1, group="optimisation")
    lr: float | None = option(
        None, "peak learning rate (default 1e-4 x batch size, SMIT's rule)", minimum=0.0, group="optimisation"
    )
    min_lr: float = option(
        1e-6, "learning rate at the end of the cosine schedule", minimum=0.0, group="optimisation"
    )
    weight_decay: float = option(0.05, "AdamW weight decay", minimum=0.0, group="optimisation")
    warmup_steps: int | None = option(
        None, "linear learning-rate warm-up (default 10% of the steps)", minimum=0, group="optimisation"
    )
    grad_clip: float = option(
        3.0, "clip the gradient norm to this (0 = off)", minimum=0.0, group="optimisation"
    )
    amp: bool = option(True, "bf16 autocast on CUDA (ignored on CPU)", group="optimisation")
    mask_strategy: str | None = option(
        None, "mask strategy (default: the method's)", choices=MASK_STRATEGIES, group="masking"
    )
    mask_ratio: float | None = option(
        None,
        "fraction of mask cells hidden (default: the method's)",
        minimum=0.0,
        maximum=1.0,
        group="masking",
    )
    mask_cell: int = option(
        16, "mask cell side in voxels (16 = one stage-3 token at patch 2)", minimum=2, group="masking"
    )
    mask_warmup_steps: int | None = option(
        None,
        "random masks for the first N steps: an untrained teacher's attention is noise (default 10% of the steps)",
        minimum=0,
        group="masking",
    )
    hint_fraction: float = option(
        0.1,
        "attention-hint: reveal this fraction x ratio of the cells",
        minimum=0.0,
        maximum=1.0,
        group="masking",
    )
    hint_pool: float = option(
        0.1,
        "attention-hint: hints come from this top fraction of attention",
        minimum=0.0,
        maximum=1.0,
        group="masking",
    )
    teacher_noise: str | None = option(
        None,
        "noisy teacher: none, input-dropout (SMART) or gaussian feature noise (default: the method's)",
        choices=TEACHER_NOISES,
        group="teacher",
    )
    noise_rate: float = option(
        0.2,
        "input-dropout: fraction of cells dropped; gaussian: noise std relative to the token std",
        minimum=0.0,
        maximum=1.0,
        group="teacher",
    )
    ema_momentum: float = option(
        0.996, "EMA teacher momentum at step 0 (cosine to 1)", minimum=0.0, maximum=1.0, group="teacher"
    )
    teacher_temp: float = option(0.04, "teacher softmax temperature at step 0", minimum=1e-4, group="teacher")
    teacher_temp_final: float = option(
        0.07, "teacher temperature after the warm-up", minimum=1e-4, group="teacher"
    )
    teacher_temp_warmup: int | None = option(
        None,
        "steps of linear teacher-temperature warm-up (default 30% of the steps)",
        minimum=0,
        group="teacher",
    )
    student_temp: float = option(0.1, "student softmax temperature", minimum=1e-4, group="teacher")
    center_momentum: float = option(
        0.9, "momentum of the teacher-output centre", minimum=0.0, maximum=1.0, group="teacher"
    )
    w_global: float | None = option(
        None,
        "weight of the cross-view global distillation loss (default 0.1, SMIT)",
        minimum=0.0,
        group="loss",
    )
    w_patch: float | None = option(
        None, "weight of the masked-patch distillation loss (default 0.1, SMIT)", minimum=0.0, group="loss"
    )
    w_rec: float | None = option(
        None, "weight of the L1 reconstruction of masked voxels (default 1.0)", minimum=0.0, group="loss"
    )
    out_dim: int | None = option(
        None, "prototypes of the projection heads (default: the preset's)", minimum=2, group="model"
    )
    drop_path: float | None = option(
        None, "stochastic depth rate (default: the preset's)", minimum=0.0, maximum=0.9, group="model"
    )
    attention_stage: int = option(
        3,
        "encoder stage the class attention reads (3 = 16-voxel tokens)",
        minimum=1,
        maximum=4,
        group="model",
    )
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", group="run")
    seed: int = option(0, "random seed (crops, masks, noise and initialisation)", group="run")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", minimum=1, group="run")
    log_every: int = option(1, "write metrics every N steps", minimum=1, group="run")
    preview_every: int = option(
        10, "emit an attention/mask preview every N steps (0 = never)", minimum=0, group="run"
    )
    checkpoint_every: int = option(
        100, "keep a weights snapshot every N steps (0 = only last and best)", minimum=0, group="run"
    )
    save_every: int = option(
        10, "refresh the resumable 'last' checkpoint every N steps", minimum=1, group="run"
    )

    def validate(self) -> None:
        super().validate()
        if self.roi % 32:
            raise DagmanInputError(
                f"roi must be a multiple of 32 (Swin merges patches 4 times), got {self.roi}"
            )
        if self.mask_cell % 2 or self.roi % self.mask_cell:
            raise DagmanInputError(
                f"mask_cell ({self.mask_cell}) must be even and divide the roi ({self.roi})"
            )
        if self.steps is not None and self.epochs is not None:
            raise DagmanInputError("give either steps or epochs, not both")
        if not self.hu_max > self.hu_min:
            raise DagmanInputError(f"hu_max ({self.hu_max}) must be above hu_min ({self.hu_min})")

    def total_steps(self, num_volumes: int) -> int:
        """Steps of the run: ``steps``, or ``epochs`` x ceil(volumes / batch), or 1000."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * max(1, -(-num_volumes // self.batch_size))
        return 1000
