"""Job configurations: validated dataclasses with JSON round-trip, from which the CLI flags and GUI forms are built.

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


def unknown_options_message(kind: str, unknown: typing.Iterable[str], valid: typing.Iterable[str]) -> str:
    """One line naming unknown keys and, for each, the closest valid name (a typo like ``lerning_rate``)."""
    import difflib

    valid = sorted(valid)
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
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


@dataclass
class OptimiserOptions(ConfigBase):
    """AdamW with a linear warm-up and a cosine decay, gradient clipping, mixed precision."""

    batch_size: int = option(2, "volumes (pretraining) or crops (fine-tuning) per step", minimum=1, group="optimisation")
    lr: float | None = option(
        None,
        "peak learning rate (default: 1e-4 x batch size when pretraining, SMIT's rule; 1e-4 when fine-tuning)",
        minimum=0.0,
        group="optimisation",
    )
    min_lr: float = option(
        1e-6, "learning rate at the end of the cosine schedule", minimum=0.0, group="optimisation"
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
    amp: bool = option(True, "bf16 autocast on CUDA (ignored on CPU)", group="optimisation")
    fused_attention: bool = option(
        True,
        "window attention via scaled_dot_product_attention (about 2x faster attention; equal to MONAI's "
        "explicit softmax up to rounding)",
        group="optimisation",
    )


# ---------------------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------------------
def _method_names() -> tuple[str, ...]:
    """The method registry, read when a choice is checked (methods may be registered after this import)."""
    from napari_dagman.core.methods.registry import method_names

    return method_names()


@dataclass
class PretrainConfig(OptimiserOptions, RunOptions):
    """Self-supervised pretraining. ``None`` means "the method's / preset's default" (resolved at start).

    The method's own options live in ``options`` (a dict checked against the method's options dataclass, see
    `core.methods.base.MethodOptions`); in JSON they are stored under the method's name, e.g.
    ``{"method": "dagman", "dagman": {"mask_ratio": 0.6}}``. `from_dict` also accepts them at the top level.
    """

    kind: ClassVar[str] = "pretrain"
    job_defaults: ClassVar[dict[str, Any]] = {"weight_decay": 0.05, "checkpoint_every": 100}

    images: list[str] = option([], "image files or DICOM folders to pretrain on", cli=False, group="data")
    out: str | None = option(None, "run folder to write (created if missing)", cli=False, group="run")
    method: str = option(
        "dagman", "self-supervised method (see `napari-dagman methods`)", choices=_method_names
    )
    options: dict[str, Any] = option(
        {}, "the method's own options (see `pretrain --method X --help`)", cli=False, group="method"
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
    roi: int = option(96, "crop side in voxels; a multiple of 32", minimum=32, maximum=1024, group="data")
    spacing: float | None = option(
        2.0,
        "resample to this isotropic spacing in mm (2D: in-plane); omit to keep the file's",
        minimum=0.05,
        maximum=50.0,
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
    mask_cell: int = option(
        16, "mask cell side in voxels (16 = one stage-3 token at patch 2)", minimum=2, group="masking"
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
    preview_every: int = option(
        10, "emit an attention/mask preview every N steps (0 = never)", minimum=0, group="run"
    )
    probe_every: int = option(
        25,
        "every N steps, measure head diversity of the clean teacher and the student on fixed probe crops "
        "(0 = never)",
        minimum=0,
        group="run",
    )
    probe_crops: int = option(
        4, "probe crops drawn once per run from the training data", minimum=1, maximum=64, group="run"
    )

    # --- method options ---------------------------------------------------------------------------------
    def method_spec(self) -> Any:
        from napari_dagman.core.methods.registry import get_method

        return get_method(self.method)

    def method_options(self) -> Any:
        """The method's options dataclass: the preset's defaults, then ``options`` (checked)."""
        return self.method_spec().make_options(self.options)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out[self.method] = dict(out.pop("options"))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> PretrainConfig:
        """Accepts the method's options under its name (as `to_dict` writes them) or at the top level."""
        if not isinstance(data, dict):
            raise DagmanInputError(f"pretrain options must be a JSON object, got {type(data).__name__}")
        from napari_dagman.core.methods.registry import get_method, method_names

        data = dict(data)
        method = data.get("method", "dagman")
        if method not in method_names():
            get_method(method)  # one line naming the registered methods
        nested = data.pop(method, None)
        options = dict(data.pop("options", None) or {})
        if nested is not None:
            if not isinstance(nested, dict):
                raise DagmanInputError(f"'{method}' must hold the method's options as a JSON object")
            options.update(nested)
        for other in method_names():  # options of another method (a config edited by hand)
            if other != method and isinstance(data.get(other), dict):
                if strict:
                    raise DagmanInputError(
                        f"the config holds options of '{other}' but its method is '{method}'"
                    )
                data.pop(other)
        own = cls.field_names()
        method_fields = get_method(method).options_class().field_names()
        for key in list(data):
            if key not in own and key in method_fields:
                options[key] = data.pop(key)
        unknown = sorted(set(data) - own)
        if unknown and strict:
            raise DagmanInputError(unknown_options_message("pretrain", unknown, own | method_fields))
        data["options"] = options
        return super().from_dict(data, strict=strict)

    def replace(self, **changes: Any) -> PretrainConfig:
        """Like `dataclasses.replace`; method options may be given by name too."""
        own = self.field_names()
        moved = {k: changes.pop(k) for k in list(changes) if k not in own}
        if moved:
            changes["options"] = {**self.options, **changes.get("options", {}), **moved}
        return super().replace(**changes)

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
        self.method_options()  # refuses unknown or out-of-range method options

    def total_steps(self, num_volumes: int) -> int:
        """Steps of the run: ``steps``, or ``epochs`` x ceil(volumes / batch), or 1000."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * max(1, -(-num_volumes // self.batch_size))
        return 1000


# ---------------------------------------------------------------------------------------------------------
# Organ clusters (embeddings)
# ---------------------------------------------------------------------------------------------------------
#: What each patch is described by: the run's encoder, or one of the controls on exactly the same patches.
EMBED_FEATURES: tuple[str, ...] = ("encoder", "random-init", "intensity", "position")
EMBED_POOLINGS: tuple[str, ...] = ("mean", "token")
EMBED_SAMPLINGS: tuple[str, ...] = ("grid", "organs", "both")


def projection_names() -> tuple[str, ...]:
    """The projection registry of `core.embeddings` (read when a choice is checked: it imports monai)."""
    from napari_dagman.core.embeddings.projection import PROJECTIONS

    return tuple(PROJECTIONS)


def clustering_names() -> tuple[str, ...]:
    """The clusterer registry of `core.embeddings`."""
    from napari_dagman.core.embeddings.clustering import CLUSTERINGS

    return tuple(CLUSTERINGS)



@dataclass
class EmbedConfig(ConfigBase):
    """Patch embeddings of a CT from a pretraining run, their 2D projection, clusters and quality metrics."""

    kind: ClassVar[str] = "embed"

    image: str | None = option(None, "CT file or DICOM folder", cli=False, group="data")
    checkpoint: str | None = option(None, "pretraining run folder (or one of its .safetensors)", cli=False)
    labels: str | None = option(None, "label map on the image grid (organ names and metrics)", cli=False)
    out: str | None = option(None, "output folder", cli=False, group="run")
    features: str = option(
        "encoder",
        "what describes a patch: the run's encoder, or a control on the same patches: random-init (same "
        "architecture, untrained), intensity (histogram of the model's input HU window), position (centre mm)",
        choices=EMBED_FEATURES,
    )
    which: str = option(
        "auto",
        "encoder the run publishes: auto (the method's preferred one) or its name (teacher, student, cnn, ...)",
    )
    weights: str = option("last", "weights of the run: last or best", choices=("last", "best"))
    stage: int = option(
        3,
        "encoder stage whose feature map is used (0 = patch embedding ... 4 = deepest)",
        minimum=0,
        maximum=4,
        group="patches",
    )
    pooling: str = option(
        "mean",
        "mean = average the stage's tokens over each patch; token = one point per token (patch and stride "
        "become the token size)",
        choices=EMBED_POOLINGS,
        group="patches",
    )
    patch: int = option(32, "patch side in voxels at the run's spacing", minimum=1, group="patches")
    stride: int = option(
        16, "distance between patch starts in voxels (< patch: overlapping)", minimum=1, group="patches"
    )
    sampling: str = option(
        "grid",
        "grid = every patch of the lattice; organs = patches centred inside each organ (needs labels), so small "
        "organs are represented; both",
        choices=EMBED_SAMPLINGS,
        group="patches",
    )
    per_organ: int = option(
        20, "organ-centred patches per organ (sampling organs/both)", minimum=1, group="patches"
    )
    overlap: float = option(
        0.5,
        "overlap of the encoder's sliding windows (features averaged where they overlap)",
        minimum=0.0,
        maximum=0.9,
        group="patches",
    )
    hist_bins: int = option(32, "bins of the intensity control's histogram", minimum=2, group="patches")
    resample_labels: bool = option(
        False,
        "resample a label map on another grid onto the image (nearest) instead of refusing it",
        group="data",
    )
    method: str = option("umap", "2D projection", choices=projection_names, group="projection")
    fast: bool = option(
        False, "UMAP in parallel: faster, but not reproducible (no fixed random state)", group="projection"
    )
    n_neighbors: int = option(15, "UMAP neighbours", minimum=2, group="projection")
    min_dist: float = option(0.1, "UMAP minimum distance", minimum=0.0, maximum=1.0, group="projection")
    perplexity: float = option(
        30.0, "t-SNE perplexity (capped for few points)", minimum=1.0, group="projection"
    )
    clustering: str = option(
        "kmeans", "clusters shown in the table and the plot", choices=clustering_names, group="clusters"
    )
    clusters: int = option(
        0,
        "k-means clusters (0 = the number of organs evaluated, or 8 without labels)",
        minimum=0,
        group="clusters",
    )
    min_cluster_size: int = option(10, "HDBSCAN smallest cluster", minimum=2, group="clusters")
    min_purity: float = option(
        0.5,
        "metrics use patches whose majority organ covers at least this fraction",
        minimum=0.0,
        maximum=1.0,
        group="metrics",
    )
    min_patches: int = option(
        5, "metrics leave out organs with fewer patches than this", minimum=1, group="metrics"
    )
    knn: int = option(5, "k of the k-NN accuracy", minimum=1, group="metrics")
    distance: str = option(
        "cosine",
        "distance of the k-NN and the silhouette (on standardised features)",
        choices=("cosine", "euclidean"),
        group="metrics",
    )
    slabs: int = option(
        5,
        "k-NN is cross-validated over this many axial slabs (each slab tested once)",
        minimum=2,
        group="metrics",
    )
    gap_mm: float | None = option(
        None,
        "training patches keep this distance (mm, centre to test slab) so none overlaps a test patch "
        "(default: the patch side)",
        minimum=0.0,
        group="metrics",
    )
    seed: int = option(
        0, "seed of UMAP/t-SNE/PCA, k-means, organ sampling and the random-init encoder", group="run"
    )
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", group="run")
    batch_size: int = option(2, "encoder windows per forward pass", minimum=1, group="run")
    cache: bool = option(
        True, "reuse embeddings cached on disk (keyed by image, checkpoint and settings)", group="run"
    )
    cache_dir: str | None = option(
        None, "cache folder (default $NAPARI_DAGMAN_CACHE or ~/.cache/napari-dagman/embeddings)", group="run"
    )
    table_format: str = option("csv", "table file format", choices=("csv", "parquet"), group="run")

    def validate(self) -> None:
        super().validate()
        if self.sampling != "grid" and self.pooling == "token":
            raise DagmanInputError("token pooling works on the token grid only; use --sampling grid")


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning and prediction (segmentation)
# ---------------------------------------------------------------------------------------------------------
#: the encoder names most runs publish (a method may publish others, e.g. CASS's "cnn")
ENCODER_CHOICES: tuple[str, ...] = ("auto", "teacher", "student")
VAL_SPLITS: tuple[str, ...] = ("auto", "slab", "cases", "none")


@dataclass
class FinetuneConfig(OptimiserOptions, RunOptions):
    """Segmentation fine-tuning of a SwinUNETR (encoder from a pretraining run, or from scratch).

    ``None`` means "the pretraining run's value" (or the scratch default when there is no run), resolved at start.
    """

    kind: ClassVar[str] = "finetune"
    job_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "weight_decay": 1e-5, "checkpoint_every": 0}

    images: list[str] = option([], "CT files or DICOM folders, one per label map", cli=False, group="data")
    segmentations: list[str] = option(
        [], "label maps, one per image, on the image's voxel grid", cli=False, group="data"
    )
    out: str | None = option(None, "run folder to write (created if missing)", cli=False, group="run")
    organs: list[int] = option(
        [], "label ids to segment (default: every id found in the label maps)", cli=False, group="data"
    )
    init: str | None = option(
        None,
        "pretraining run folder (or its .safetensors file) whose Swin encoder starts the model; "
        "omit to train from scratch",
        group="model",
    )
    init_encoder: str = option(
        "auto",
        "which encoder the run publishes: auto (the method's preferred one: the teacher for DAGMaN and its "
        "relatives, as DINO-style evaluation does), or its name (teacher, student, transformer, ...)",
        group="model",
    )
    init_weights: str = option(
        "last", "which weights of the run: last or best", choices=("last", "best"), group="model"
    )
    preset: str | None = option(
        None,
        "encoder size when training from scratch (default small; with --init the run's preset)",
        choices=PRESET_NAMES,
        group="model",
    )
    dims: int | None = option(
        None,
        "3 = volumes, 2 = axial slices (default: the run's; 3 from scratch)",
        choices=(2, 3),
        group="model",
    )
    drop_path: float = option(
        0.0, "stochastic depth rate of the Swin encoder", minimum=0.0, maximum=0.9, group="model"
    )
    roi: int | None = option(
        None,
        "crop side in voxels, a multiple of 32 and at least 64 (default: the run's ROI, at least 64; else 96)",
        minimum=64,
        group="data",
    )
    spacing: float | None = option(
        None, "isotropic spacing in mm (default: the run's; 2.0 from scratch)", minimum=0.05, group="data"
    )
    hu_min: float | None = option(
        None, "model input: HU mapped to 0 (default: the run's; -175 from scratch)", group="data"
    )
    hu_max: float | None = option(
        None, "model input: HU mapped to 1 (default: the run's; 250 from scratch)", group="data"
    )
    resample_labels: bool = option(
        False,
        "resample label maps whose grid differs from their image (nearest neighbour) instead of refusing them",
        group="data",
    )
    background_ratio: float = option(
        1.0,
        "class-balanced crops: chance of a crop centred on background relative to one centred on an organ",
        minimum=0.0,
        group="data",
    )
    augment: bool = option(
        True,
        "random intensity scale and shift (no flips or rotations: they would swap left and right organs)",
        group="data",
    )
    steps: int = option(1000, "optimiser steps", minimum=1, group="optimisation")
    val_split: str = option(
        "auto",
        "validation data: slab (a held-out axial slab of each volume), cases (the last --val-cases pairs), "
        "none, or auto (cases with two or more pairs, else slab)",
        choices=VAL_SPLITS,
        group="validation",
    )
    val_fraction: float = option(
        0.2,
        "slab split: thickness of the held-out slab as a fraction of the volume's z extent",
        minimum=0.01,
        maximum=0.8,
        group="validation",
    )
    val_position: float = option(
        0.5,
        "slab split: where the slab sits along z, 0 = first slice (inferior in LPS), 1 = last slice",
        minimum=0.0,
        maximum=1.0,
        group="validation",
    )
    val_gap_mm: float = option(
        15.0,
        "slab split: millimetres left out on each side of the slab (neither trained nor validated)",
        minimum=0.0,
        group="validation",
    )
    val_cases: int = option(
        1, "cases split: how many of the last pairs are held out", minimum=1, group="validation"
    )
    val_every: int = option(50, "validate every N steps (and at the end)", minimum=1, group="validation")
    overlap: float = option(
        0.25, "sliding-window overlap during validation", minimum=0.0, maximum=0.95, group="validation"
    )

    def validate(self) -> None:
        super().validate()
        if self.roi is not None and self.roi % 32:
            raise DagmanInputError(
                f"roi must be a multiple of 32 (Swin merges patches 4 times), got {self.roi}"
            )
        if self.hu_min is not None and self.hu_max is not None and not self.hu_max > self.hu_min:
            raise DagmanInputError(f"hu_max ({self.hu_max}) must be above hu_min ({self.hu_min})")
        if len(self.images) != len(self.segmentations):
            raise DagmanInputError(
                f"give one label map per image: {len(self.images)} image(s), {len(self.segmentations)} label map(s)"
            )
        if any(int(i) <= 0 for i in self.organs):
            raise DagmanInputError("organ label ids must be positive (0 is background)")


@dataclass
class PredictConfig(ConfigBase):
    """Sliding-window segmentation of a CT with a fine-tuned run. ``None`` = the run's training value."""

    kind: ClassVar[str] = "predict"

    checkpoint: str | None = option(
        None, "fine-tuning run folder (or one of its .safetensors files)", cli=False, group="model"
    )
    weights: str = option(
        "best",
        "which weights of the run: best (validation Dice) or last",
        choices=("best", "last"),
        group="model",
    )
    roi: int | None = option(
        None,
        "sliding-window side in voxels, a multiple of 32 (default: the training ROI)",
        minimum=32,
        group="inference",
    )
    overlap: float = option(0.5, "sliding-window overlap", minimum=0.0, maximum=0.95, group="inference")
    sw_batch_size: int = option(4, "windows per forward pass", minimum=1, group="inference")
    hd95: bool = option(
        True, "also compute the 95% Hausdorff distance when a reference is given", group="inference"
    )
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", group="run")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", minimum=1, group="run")

    def validate(self) -> None:
        super().validate()
        if self.roi is not None and self.roi % 32:
            raise DagmanInputError(f"roi must be a multiple of 32, got {self.roi}")
