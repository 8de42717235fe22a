"""The config machinery: `option` fields with their metadata, `ConfigBase` (JSON round-trip, validation, argparse),
and the option groups every training job shares (`RunOptions`, `OptimiserOptions`).

Each field carries its help text (CLI ``--help`` and GUI tooltip) through :func:`option`. A config file and
command-line flags compose: the file is read first, flags given explicitly override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from napari_dagman.core.errors import DagmanInputError

C = TypeVar("C", bound="ConfigBase")

#: What a run folder's config.json holds beside the options (the record of the run, not settings): a config
#: file may be a run's config.json, so these keys are skipped, not refused as unknown options.
RUN_RECORD_KEYS: frozenset[str] = frozenset(
    {"architecture", "job", "encoders", "preferred_encoder", "preferred_reason", "capabilities", "classes", "init_report", "split"}
)


def option(
    default: Any,
    help: str,
    *,
    choices: typing.Sequence[Any] | typing.Callable[[], typing.Sequence[Any]] | None = None,
    cli: bool = True,
    flag: str | None = None,
    group: str = "general",
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A dataclass field with the metadata the CLI and GUI use.

    ``choices`` may be a function returning them (registries that import torch are read only when needed).
    """
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


def field_choices(f: dataclasses.Field) -> tuple[Any, ...] | None:
    """The allowed values of a field (calling a lazy ``choices`` function), or None."""
    choices = f.metadata.get("choices")
    if callable(choices):
        choices = choices()
    return None if choices is None else tuple(choices)


#: Names other tools give to our options: a key close to one of these is pointed to our name.
OPTION_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "min_learning_rate": "min_lr",
    "num_steps": "steps",
    "max_steps": "steps",
    "crop_size": "roi",
    "roi_size": "roi",
    "voxel_size": "spacing",
    "warmup": "warmup_steps",
    "num_epochs": "epochs",
    "amp": "precision",
}


def unknown_options_message(kind: str, unknown: typing.Iterable[str], valid: typing.Iterable[str]) -> str:
    """One line naming unknown keys and, for each, the closest valid name (a typo like ``lerning_rate``)."""
    import difflib

    valid = sorted(valid)
    names = {name: name for name in valid}
    names.update({alias: name for alias, name in OPTION_ALIASES.items() if name in names})
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.6)
        parts.append(f"'{key}'" + (f" (did you mean '{names[close[0]]}'?)" if close else ""))
    return f"unknown {kind} option(s): {', '.join(parts)}"


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
    #: defaults of shared options that differ by job, applied where a field is left at None
    job_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        for key, value in self.job_defaults.items():
            if getattr(self, key, None) is None:
                object.__setattr__(self, key, value)

    # --- dict / JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, strict: bool = True) -> C:
        if not isinstance(data, dict):
            raise DagmanInputError(f"{cls.kind} options must be a JSON object, got {type(data).__name__}")
        names = cls.field_names()
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise DagmanInputError(unknown_options_message(cls.kind, unknown, names))
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
        from napari_dagman.core.files import read_json

        path = Path(path)
        data = read_json(path, f"config file {path}")  # size and nesting limited: a hostile file is one line
        if not isinstance(data, dict):
            raise DagmanInputError(f"config file {path} must hold a JSON object")
        data = {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS}
        try:
            return cls.from_dict(data, strict=strict)
        except DagmanInputError as err:
            raise DagmanInputError(f"config file {path}: {err}") from None

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
            if isinstance(value, float) and not math.isfinite(value):
                raise DagmanInputError(f"{f.name} must be a finite number, got {value}")
            if (
                tp in (int, float, str, bool)
                and not isinstance(value, tp)
                or (tp is int and isinstance(value, bool))
            ):
                raise DagmanInputError(f"{f.name} must be {tp.__name__}, got {value!r}")
            choices = field_choices(f)
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
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser,
        *,
        skip: typing.Iterable[str] = (),
        title: str | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        """Add one ``--flag`` per field (defaults suppressed, so only flags the user gives override).

        Fields go into argument groups by their ``group`` (or all into one group called ``title``);
        ``defaults`` overrides the defaults shown in the help (a preset's values).
        """
        hints = typing.get_type_hints(cls)
        skip = set(skip)
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            if f.name in skip or not f.metadata.get("cli", True):
                continue
            tp, _ = _unwrap_optional(hints[f.name])
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            group_name = title or f"{f.metadata.get('group', 'general')} options"
            group = groups.setdefault(group_name, parser.add_argument_group(group_name))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if defaults and f.name in defaults:
                default = defaults[f.name]
            help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) in (list, tuple):
                (inner, *_) = typing.get_args(tp) or (str,)
                kwargs.update(nargs="+", type=inner, metavar=f.name.upper())
            else:
                kwargs["type"] = tp
                choices = field_choices(f)
                if choices is not None:
                    kwargs["choices"] = list(choices)
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
# Options every training job shares (declared once)
# ---------------------------------------------------------------------------------------------------------
PRESET_NAMES: tuple[str, ...] = ("tiny", "small", "base")
DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"


@dataclass
class RunOptions(ConfigBase):
    """Where and how a training job runs: device, threads, seed, logging and checkpoint cadence."""

    device: str = option("auto", DEVICE_HELP, group="run")
    seed: int = option(0, "random seed (initialisation, crops, masks, noise, augmentation)", group="run")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", minimum=1, group="run")
    log_every: int = option(1, "write metrics every N steps", minimum=1, group="run")
    save_every: int = option(
        10, "refresh the resumable 'last' checkpoint every N steps", minimum=1, group="run"
    )
    checkpoint_every: int | None = option(
        None,
        "keep a weights snapshot every N steps (0 = only last and best; default 100 when pretraining, 0 when "
        "fine-tuning)",
        minimum=0,
        group="run",
    )
    tensorboard: bool = option(
        False,
        "also write TensorBoard event files into the run folder: loss terms, lr, momentum, probe head diversity, "
        "attention and mask previews (needs the tensorboard package)",
        group="run",
    )


@dataclass
class OptimiserOptions(ConfigBase):
    """AdamW with a linear warm-up and a cosine decay, gradient clipping, mixed precision."""

    batch_size: int = option(2, "volumes (pretraining) or crops (fine-tuning) per step", minimum=1, group="optimisation")
    lr: float | None = option(
        None,
        "peak learning rate (default: 1e-4 x batch size when pretraining, SMIT's rule; 1e-4 when fine-tuning)",
        minimum=0.0,
        maximum=1.0,  # AdamW steps are about lr in size; far above 1 torch overflows float32 and crashes
        group="optimisation",
    )
    min_lr: float = option(
        1e-6, "learning rate at the end of the cosine schedule", minimum=0.0, maximum=1.0, group="optimisation"
    )
    weight_decay: float | None = option(
        None,
        "AdamW weight decay, none on biases, norms and tokens (default: 0.05 when pretraining, 1e-5 when "
        "fine-tuning)",
        minimum=0.0,
        group="optimisation",
    )
    warmup_steps: int | None = option(
        None,
        "linear learning-rate warm-up (default: 10% of the steps when pretraining, 5% when fine-tuning)",
        minimum=0,
        group="optimisation",
    )
    grad_clip: float = option(
        3.0, "clip the gradient norm to this (0 = off)", minimum=0.0, group="optimisation"
    )
    precision: str = option(
        "auto",
        "arithmetic of the forward and backward passes: auto = bf16 autocast where the device computes bf16 "
        "natively (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX), fp32 elsewhere; fp32; or bf16. Weights "
        "and optimiser state stay fp32; run.json records the choice",
        choices=("auto", "fp32", "bf16"),
        group="optimisation",
    )
    compile: bool = option(
        False,
        "torch.compile the networks: minutes of compilation before the first step, then faster steps on some "
        "machines (see docs/pretraining.md); falls back to eager when compilation fails",
        group="optimisation",
    )
    fused_attention: bool = option(
        True,
        "fast Swin stages: window layouts and shifted-window masks cached per shape, one gather per block, "
        "the fused attention kernel where no gradient is needed (same weights and mathematics as MONAI's "
        "forward, equal up to rounding)",
        group="optimisation",
    )
