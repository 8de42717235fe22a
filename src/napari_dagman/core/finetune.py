"""Segmentation fine-tuning and prediction: MONAI SwinUNETR whose Swin encoder comes from a pretraining run.

The pieces, in the order a run uses them:

* **Organs** (`LabelMap`): the chosen label ids (TotalSegmentator ids, say liver 5, spleen 1) become contiguous
  classes 1..K (0 = background; every other id is background too) and go back to their ids after prediction.
* **Model** (`SegmentationNet`, `build_model`): MONAI's SwinUNETR built from the run's `Architecture`. Its
  encoder ``swinViT.*`` is loaded from the run's ``{teacher|student}.encoder.swin.*`` tensors by an explicit,
  tested one-to-one name map (`encoder_key_map`); the decoder starts fresh. An `InitReport` says what was
  loaded, what starts fresh and which pretraining tensors have no place in the segmentation network.
* **Data** (`prepare_case`, `split_cases`, `CropSampler`): each image/label pair is resampled to the run's
  spacing and HU range; validation is a held-out axial slab of each volume, with a gap on both sides that is
  neither trained nor validated (or held-out cases); training crops are class-balanced
  (MONAI ``RandCropByLabelClassesd``: an organ is drawn first, then a crop centred on one of its voxels).
* **Loop** (`run_finetuning`): the pretraining engine's habits - a generator of `core.events`, atomic
  safetensors checkpoints (last, best by validation Dice, resumable), exact resume from ``(seed, step)``
  seeds, cancel by `CancelToken` or by closing the generator (save, then stop).
* **Prediction** (`load_segmenter`, `run_prediction`, `predict`): sliding-window inference
  (``monai.inferers.sliding_window_inference``, Gaussian blending) at the run's spacing; class probabilities
  are resampled back onto the input grid before the arg-max, so the labels keep the input's geometry.
* **Results** (`evaluate`, `organ_focus`, `worst_slice`, `disagreement_map`): per-organ volume (ml), Dice and
  95% Hausdorff distance (``monai.metrics``), where each organ is largest, where prediction and reference
  disagree most - what the results dock navigates.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
import time
import warnings
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.networks.nets import SwinUNETR

from napari_dagman.core.checkpoint import (
    BEST_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    RESUME_FILE,
    SNAPSHOT_DIR,
    RunFolder,
    architecture_from_metadata,
    check_state_fits,
    load_optimizer_state,
    load_tensors,
    optimizer_tensors,
    prefixed,
    save_tensors,
    strip_prefix,
)
from napari_dagman.core.config import FinetuneConfig
from napari_dagman.core.errors import CheckpointError, DagmanError, DagmanInputError
from napari_dagman.core.events import (
    CancelToken,
    CheckpointEvent,
    FinishedEvent,
    LogEvent,
    PredictionEvent,
    ProgressEvent,
    StepEvent,
    ValidationEvent,
)
from napari_dagman.core.labels import default_names
from napari_dagman.core.models.architecture import DEEPEST_STRIDE, Architecture, architecture_for
from napari_dagman.core.models.encoder import set_fused_window_attention
from napari_dagman.core.volume import Volume

Event = Any  # one of the dataclasses in core.events

#: Where the Swin encoder sits in a pretraining checkpoint (after ``student.`` / ``teacher.``) ...
RUN_ENCODER_PREFIX = "encoder.swin."
#: ... and where SwinUNETR keeps it. The names after the prefixes are identical (both are MONAI's SwinTransformer).
UNETR_ENCODER_PREFIX = "swinViT."
#: Smallest crop: SwinUNETR's instance norms need more than one voxel at the deepest stage (stride 32).
MIN_ROI = 64
#: Defaults when there is no pretraining run to inherit the input convention from.
SCRATCH_DEFAULTS: dict[str, Any] = {"preset": "small", "dims": 3, "roi": 96, "spacing": 2.0}
SCRATCH_HU = (-175.0, 250.0)
#: Fine-tuning config keys that fix the network, the data split or the random streams: a resumed run keeps them.
RESUME_KEYS = (
    "init",
    "init_encoder",
    "init_weights",
    "preset",
    "dims",
    "organs",
    "roi",
    "spacing",
    "hu_min",
    "hu_max",
    "val_split",
    "val_fraction",
    "val_position",
    "val_gap_mm",
    "val_cases",
    "seed",
    "batch_size",
    "background_ratio",
    "augment",
)
DISAGREEMENT_NAMES: dict[int, str] = {1: "false_positive", 2: "false_negative", 3: "wrong_organ"}
_DISAGREEMENT_COLOURS: dict[int | None, np.ndarray] = {
    0: np.zeros(4),
    1: np.array([1.0, 0.85, 0.0, 1.0]),  # false positive: yellow
    2: np.array([0.0, 0.8, 1.0, 1.0]),  # false negative: cyan
    3: np.array([1.0, 0.0, 1.0, 1.0]),  # wrong organ: magenta
    None: np.array([0.5, 0.5, 0.5, 1.0]),
}


# =============================================================================================================
# Organs: label ids <-> contiguous classes
# =============================================================================================================
@dataclass(frozen=True)
class LabelMap:
    """The organs a model segments: label id ``ids[k]`` is class ``k + 1``; class 0 is background."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.ids:
            raise DagmanInputError("no organs chosen")
        if len(set(self.ids)) != len(self.ids):
            raise DagmanInputError(f"organ ids repeat: {list(self.ids)}")
        if any(i <= 0 for i in self.ids):
            raise DagmanInputError("organ label ids must be positive (0 is background)")
        if len(self.names) != len(self.ids):
            raise DagmanInputError("one name per organ id")

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background + organs."""
        return len(self.ids) + 1

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("background", *self.names)

    @property
    def id_names(self) -> dict[int, str]:
        return dict(zip(self.ids, self.names, strict=True))

    def describe(self) -> str:
        return ", ".join(f"{n} ({i})" for i, n in zip(self.ids, self.names, strict=True))

    def to_classes(self, labels: np.ndarray) -> np.ndarray:
        """Label ids -> classes 0..K (ids that are not chosen become background)."""
        labels = np.asarray(labels)
        top = int(max(labels.max(initial=0), max(self.ids)))
        lut = np.zeros(top + 1, dtype=np.uint8 if self.num_classes <= 256 else np.uint16)
        lut[list(self.ids)] = np.arange(1, self.num_classes)
        return lut[labels.astype(np.int64, copy=False)]

    def to_labels(self, classes: np.ndarray) -> np.ndarray:
        """Classes 0..K -> the original label ids (uint8 when they fit, else uint16)."""
        dtype = np.uint8 if max(self.ids) <= 255 else np.uint16
        lut = np.array((0, *self.ids), dtype=dtype)
        classes = np.asarray(classes)
        if classes.size and int(classes.max()) >= self.num_classes:
            raise DagmanInputError(
                f"class {int(classes.max())} out of range (the model has {self.num_classes})"
            )
        return lut[classes.astype(np.int64, copy=False)]

    def to_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        try:
            return cls(tuple(int(i) for i in data["ids"]), tuple(str(n) for n in data["names"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("the run's organ table (ids and names) is missing or broken") from None


def label_names_of(labels: Volume) -> dict[int, str]:
    """Id -> name for a label map: its sidecar/metadata names, TotalSegmentator v2 names, or ``label_<id>``."""
    ids = present_ids(labels.array)
    names = {int(k): str(v) for k, v in (labels.metadata.get("label_names") or {}).items()}
    fallback, _ = default_names(ids)
    return {i: names.get(i, fallback.get(i, f"label_{i}")) for i in sorted(set(ids) | set(names))}


def present_ids(array: np.ndarray) -> list[int]:
    """Non-zero label ids that occur in ``array`` (bincount: much faster than np.unique on big volumes)."""
    flat = np.asarray(array).ravel()
    if flat.size == 0:
        return []
    if np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0 and flat.max() <= 65535:
        counts = np.bincount(flat.astype(np.int64, copy=False))
        return [int(i) for i in np.flatnonzero(counts) if i != 0]
    return [int(i) for i in np.unique(flat) if int(i) != 0]


def parse_organs(spec: str | Sequence[str | int], names: Mapping[int, str] | None = None) -> list[int]:
    """Organ ids from ``"5,1,2"``, ``"liver, spleen, 2"`` or a list of ids/names (names looked up in ``names``)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    by_name = {v.lower(): int(k) for k, v in (names or {}).items()}
    out: list[int] = []
    for item in items:
        if isinstance(item, int | np.integer):
            out.append(int(item))
            continue
        if not item:
            continue
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif item.lower() in by_name:
            out.append(by_name[item.lower()])
        else:
            raise DagmanInputError(f"unknown organ '{item}': give label ids or names of the label map")
    if any(i <= 0 for i in out):
        raise DagmanInputError("organ label ids must be positive (0 is background)")
    return list(dict.fromkeys(out))


def choose_organs(label_volumes: Sequence[Volume], organs: Sequence[int] = ()) -> LabelMap:
    """The `LabelMap` of a run: ``organs`` (default: every id found), named from the label maps.

    Raises `DagmanInputError` when a chosen id occurs in none of the label maps.
    """
    names: dict[int, str] = {}
    found: set[int] = set()
    for volume in label_volumes:
        table = label_names_of(volume)
        ids = present_ids(volume.array)
        found.update(ids)
        for i in ids:
            names.setdefault(i, table[i])
    chosen = [int(i) for i in organs] if organs else sorted(found)
    if not chosen:
        raise DagmanInputError("the label maps are empty (all background): nothing to segment")
    missing = [i for i in chosen if i not in found]
    if missing:
        fallback, _ = default_names(missing)
        raise DagmanInputError(
            "organ(s) "
            + ", ".join(f"{fallback.get(i, f'label_{i}')} ({i})" for i in missing)
            + " occur in none of the label maps"
        )
    return LabelMap(tuple(chosen), tuple(names[i] for i in chosen))


# =============================================================================================================
# Model: SwinUNETR with the pretrained encoder
# =============================================================================================================
class SegmentationNet(SwinUNETR):
    """MONAI's SwinUNETR for an `Architecture`; parameter names are SwinUNETR's (``swinViT.*`` = encoder).

    A 2D network (``arch.dims == 2``) also takes (B, C, 1, H, W) slabs, so the same 3D crops, sliding
    windows of depth 1 and inference code serve both.
    """

    def __init__(self, arch: Architecture, num_classes: int, *, drop_path: float = 0.0) -> None:
        super().__init__(
            in_channels=arch.in_channels,
            out_channels=num_classes,
            feature_size=arch.embed_dim,
            depths=arch.depths,
            num_heads=arch.num_heads,
            window_size=arch.window_size,
            patch_size=arch.patch_size,
            spatial_dims=arch.dims,
            qkv_bias=True,
            mlp_ratio=4.0,
            dropout_path_rate=drop_path,
            use_v2=False,
        )
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.dims == 2 and x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"a 2D network takes slabs of depth 1, got {tuple(x.shape)}")
            return super().forward(x[:, :, 0]).unsqueeze(2)
        return super().forward(x)


def encoder_key_map(model_keys: Iterable[str], which: str) -> dict[str, str]:
    """SwinUNETR encoder name -> pretraining checkpoint name, e.g.

    ``swinViT.layers1.0.blocks.0.attn.qkv.weight`` <- ``teacher.encoder.swin.layers1.0.blocks.0.attn.qkv.weight``.
    Only the ``swinViT.`` names are mapped; everything else in SwinUNETR (the convolutional encoder blocks of
    the skips and the decoder) has no pretrained counterpart.
    """
    prefix = f"{which}.{RUN_ENCODER_PREFIX}"
    return {
        key: prefix + key[len(UNETR_ENCODER_PREFIX) :]
        for key in model_keys
        if key.startswith(UNETR_ENCODER_PREFIX)
    }


@dataclass
class InitReport:
    """What a segmentation network's weights started from (printed at the start of a run, kept in config.json)."""

    source: str | None
    which: str | None = None
    method: str | None = None
    pretrain_step: int | None = None
    loaded: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # encoder tensors of the run with no place in SwinUNETR
    params_loaded: int = 0
    params_fresh: int = 0

    @property
    def from_scratch(self) -> bool:
        return self.source is None

    def summary(self) -> str:
        if self.from_scratch:
            return f"from scratch: all {len(self.fresh)} tensors ({self.params_fresh:,} parameters) randomly initialised"
        unused = sorted({k.split(".")[2] for k in self.unused if k.count(".") >= 2})  # which.encoder.NAME...
        return (
            f"encoder: {len(self.loaded)} tensors ({self.params_loaded:,} parameters) loaded bit-exactly from the "
            f"{self.which} of the {self.method} run {self.source} (pretraining step {self.pretrain_step}); "
            f"decoder and skip blocks: {len(self.fresh)} tensors ({self.params_fresh:,} parameters) start fresh"
            + (f"; not used: {', '.join(unused)} ({len(self.unused)} tensors)" if unused else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "which": self.which,
            "method": self.method,
            "pretrain_step": self.pretrain_step,
            "tensors_loaded": len(self.loaded),
            "tensors_fresh": len(self.fresh),
            "params_loaded": self.params_loaded,
            "params_fresh": self.params_fresh,
            "unused": self.unused,
            "summary": self.summary(),
        }


def load_encoder_into(
    net: SegmentationNet, run: str | Path, *, which: str = "auto", weights: str = "last"
) -> InitReport:
    """Copy a pretraining run's Swin encoder into ``net.swinViT``; every encoder weight or an error.

    ``which`` is ``teacher``, ``student`` or ``auto`` (the teacher when the run has one: DINO/iBOT evaluate
    the EMA teacher, which is also the network whose attention chose the masks).
    """
    from napari_dagman.core.checkpoint import load_pretrained_encoder

    path = Path(run)
    if path.is_dir():
        job = RunFolder(path).config_dict().get("job", "pretrain")
        if job != "pretrain":
            raise CheckpointError(
                f"{path} is a {job} run, not a pretraining run; --init takes the folder of "
                "`napari-dagman pretrain`"
            )
    pretrained = load_pretrained_encoder(path, which, weights=weights)
    diff = net.arch.differences(pretrained.arch)
    if diff:
        raise CheckpointError(f"the run's encoder differs from the network asked for: {'; '.join(diff)}")
    source_state = {
        f"{pretrained.which}.{RUN_ENCODER_PREFIX}{k}": v
        for k, v in pretrained.encoder.swin.state_dict().items()
    }
    own = net.state_dict()
    mapping = encoder_key_map(own, pretrained.which)
    missing = [k for k, src in mapping.items() if src not in source_state]
    wrong = [
        k for k, src in mapping.items() if src in source_state and source_state[src].shape != own[k].shape
    ]
    unmapped = sorted(set(source_state) - set(mapping.values()))
    if missing or wrong or unmapped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} SwinUNETR encoder tensors have no counterpart (e.g. {missing[0]})")
        if wrong:
            parts.append(f"{len(wrong)} differ in shape (e.g. {wrong[0]})")
        if unmapped:
            parts.append(f"{len(unmapped)} run tensors have no place (e.g. {unmapped[0]})")
        raise CheckpointError(
            f"the {pretrained.method} run's encoder does not map onto SwinUNETR: " + "; ".join(parts)
        )
    with torch.no_grad():
        for key, src in mapping.items():
            own[key].copy_(source_state[src])
    encoder_state = pretrained.encoder.state_dict()
    unused = [f"{pretrained.which}.encoder.{k}" for k in encoder_state if not k.startswith("swin.")]
    fresh = [k for k in own if k not in mapping]
    return InitReport(
        source=str(path),
        which=pretrained.which,
        method=pretrained.method,
        pretrain_step=pretrained.step,
        loaded=dict(mapping),
        fresh=fresh,
        unused=unused,
        params_loaded=sum(own[k].numel() for k in mapping),
        params_fresh=sum(own[k].numel() for k in fresh if own[k].is_floating_point()),
    )


def build_model(
    arch: Architecture,
    label_map: LabelMap,
    *,
    init: str | Path | None = None,
    which: str = "auto",
    weights: str = "last",
    drop_path: float = 0.0,
    seed: int = 0,
) -> tuple[SegmentationNet, InitReport]:
    """A SwinUNETR for ``label_map`` (seeded initialisation), its encoder from ``init`` when given."""
    torch.manual_seed(seed)
    net = SegmentationNet(arch, label_map.num_classes, drop_path=drop_path)
    if init is None:
        state = net.state_dict()
        fresh = list(state)
        report = InitReport(
            source=None,
            fresh=fresh,
            params_fresh=sum(v.numel() for v in state.values() if v.is_floating_point()),
        )
        return net, report
    return net, load_encoder_into(net, init, which=which, weights=weights)


# =============================================================================================================
# Configuration: what is inherited from the pretraining run
# =============================================================================================================
def run_input_defaults(init: str | None) -> dict[str, Any]:
    """preset, dims, roi, spacing, hu_min, hu_max of a pretraining run (or the scratch defaults)."""
    if init is None:
        return {**SCRATCH_DEFAULTS, "hu_min": SCRATCH_HU[0], "hu_max": SCRATCH_HU[1]}
    path = Path(init)
    folder = (
        path if path.is_dir() else (path.parent.parent if path.parent.name == SNAPSHOT_DIR else path.parent)
    )
    run = RunFolder(folder)
    if path.is_dir() or run.file(CONFIG_FILE).is_file():
        config = run.config_dict()
        job = config.get("job", "pretrain")
        if job != "pretrain":
            raise CheckpointError(
                f"{folder} is a {job} run, not a pretraining run; --init takes the folder of "
                "`napari-dagman pretrain`"
            )
        arch = Architecture.from_dict(config["architecture"])
    else:  # a lone .safetensors file: its metadata carries the architecture
        _, meta = load_tensors(path)
        arch = architecture_from_metadata(meta, path.name)
        config = {}
    return {
        "preset": arch.preset,
        "dims": arch.dims,
        "roi": max(MIN_ROI, int(config.get("roi", SCRATCH_DEFAULTS["roi"]))),
        "spacing": config.get("spacing", SCRATCH_DEFAULTS["spacing"]),
        "hu_min": float(config.get("hu_min", SCRATCH_HU[0])),
        "hu_max": float(config.get("hu_max", SCRATCH_HU[1])),
    }


def resolve_finetune_config(config: FinetuneConfig) -> tuple[FinetuneConfig, list[str]]:
    """Fill the ``None`` fields from the pretraining run (or the scratch defaults); returns notes for the user.

    A preset or dims that contradicts the run is refused (the encoder would not fit); a different spacing, HU
    range or ROI is allowed with a note, since the encoder then sees inputs unlike its pretraining ones.
    """
    defaults = run_input_defaults(config.init)
    data = config.to_dict()
    notes: list[str] = []
    for key in ("preset", "dims"):
        if config.init is not None and data[key] is not None and data[key] != defaults[key]:
            raise DagmanInputError(
                f"--{key} {data[key]} contradicts the pretraining run's {key} {defaults[key]}; "
                f"leave it out to use the run's"
            )
    for key in ("spacing", "hu_min", "hu_max"):
        if config.init is not None and data[key] is not None and data[key] != defaults[key]:
            notes.append(f"{key} {data[key]} differs from the pretraining run's {defaults[key]}")
    for key, value in defaults.items():
        if data.get(key) is None:
            data[key] = value
    if data["roi"] < MIN_ROI or data["roi"] % DEEPEST_STRIDE:
        raise DagmanInputError(
            f"roi must be a multiple of {DEEPEST_STRIDE} and at least {MIN_ROI} for SwinUNETR, got {data['roi']}"
        )
    if data["warmup_steps"] is None:
        data["warmup_steps"] = int(round(0.05 * data["steps"]))
    data["organs"] = [int(i) for i in data["organs"]]
    return FinetuneConfig.from_dict(data), notes


def model_architecture(config: FinetuneConfig) -> Architecture:
    """The encoder architecture of a resolved config (the run's, or the preset's from scratch)."""
    if config.init is not None:
        path = Path(config.init)
        if path.is_dir():
            return RunFolder(path).architecture()
        _, meta = load_tensors(path)
        return architecture_from_metadata(meta, path.name)
    return architecture_for(str(config.preset), int(config.dims or 3))


# =============================================================================================================
# Data: cases, slab / case split, class-balanced crops
# =============================================================================================================
@dataclass
class Case:
    """One image/label pair in model space: intensities in [0, 1], classes 0..K, with its geometry."""

    image: np.ndarray
    classes: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    name: str
    source_hash: str
    ids_present: list[int]


def check_label_volume(labels: Volume, what: str) -> Volume:
    """Integer, non-negative label ids; float arrays holding whole numbers are accepted (napari may give those)."""
    arr = labels.array
    if arr.dtype == np.bool_:
        return labels.with_array(arr.astype(np.uint8))
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DagmanInputError(f"{what} is not a label map: it holds non-integer values")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DagmanInputError(f"{what} is not a label map: it holds negative values")
    if arr.size and arr.max() > 65535:
        raise DagmanInputError(f"{what}: label ids above 65535 are not supported")
    return labels if arr is labels.array else labels.with_array(arr.astype(np.uint16))


def align_labels(
    image: Volume, labels: Volume, *, resample: bool, image_name: str, labels_name: str
) -> Volume:
    """The label map on the image's grid: as it is when the grids match, else resampled (only if asked)."""
    if labels.same_grid(image):
        return labels
    if not resample:

        def fmt(values: Sequence[float]) -> str:
            return "(" + ", ".join(f"{v:g}" for v in values) + ")"

        raise DagmanInputError(
            f"label map '{labels_name}' is not on the grid of image '{image_name}': shape {labels.shape} vs "
            f"{image.shape}, spacing {fmt(labels.spacing)} vs {fmt(image.spacing)} mm, origin {fmt(labels.origin)} "
            f"vs {fmt(image.origin)} mm; resample it onto the image (or pass --resample-labels)"
        )
    from napari_dagman.core.io import resample_like

    return resample_like(labels, image, is_label=True)


def prepare_case(
    image: Volume,
    labels: Volume,
    label_map: LabelMap,
    *,
    dims: int,
    spacing: float | None,
    hu_range: tuple[float, float],
    resample_labels: bool = False,
    name: str | None = None,
) -> Case:
    """Check a pair and bring it to model space (the same resampling and HU scaling as pretraining)."""
    from napari_dagman.core.data import model_volume
    from napari_dagman.core.io import resample_to_spacing

    name = name or str(image.metadata.get("name", "image"))
    labels_name = str(labels.metadata.get("name", f"labels of {name}"))
    labels = check_label_volume(labels, f"label map '{labels_name}'")
    labels = align_labels(image, labels, resample=resample_labels, image_name=name, labels_name=labels_name)
    present = present_ids(labels.array)
    chosen = [i for i in label_map.ids if i in present]
    if not chosen:
        table = label_names_of(labels)
        shown = ", ".join(f"{table.get(i, i)} ({i})" for i in present[:8]) + (
            " ..." if len(present) > 8 else ""
        )
        raise DagmanInputError(
            f"label map '{labels_name}' holds none of the chosen organs ({label_map.describe()}); "
            f"it has {shown or 'only background'}"
        )
    pv = model_volume(image, dims=dims, spacing=spacing, hu_range=hu_range, name=name)
    if spacing is not None:
        target = (spacing,) * 3 if dims == 3 else (labels.spacing[0], spacing, spacing)
        labels = resample_to_spacing(labels, target, is_label=True)
    classes = label_map.to_classes(labels.array)
    if classes.shape != pv.array.shape:  # both come from the same resampling: a mismatch is a bug
        raise DagmanError(f"{name}: resampled labels {classes.shape} differ from the image {pv.array.shape}")
    return Case(
        image=pv.array,
        classes=np.ascontiguousarray(classes),
        spacing=pv.spacing,
        origin=pv.origin,
        name=name,
        source_hash=pv.source_hash,
        ids_present=chosen,
    )


@dataclass
class Piece:
    """A z-range of a case used for training or validation."""

    case: int
    z0: int
    z1: int

    def image(self, cases: Sequence[Case]) -> np.ndarray:
        return cases[self.case].image[self.z0 : self.z1]

    def classes(self, cases: Sequence[Case]) -> np.ndarray:
        return cases[self.case].classes[self.z0 : self.z1]


@dataclass
class Split:
    train: list[Piece]
    val: list[Piece]
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": [[p.case, p.z0, p.z1] for p in self.train],
            "val": [[p.case, p.z0, p.z1] for p in self.val],
            "description": self.description,
        }


def slab_ranges(
    depth: int, fraction: float, position: float, gap: int
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Training z-ranges and the validation slab of a volume of ``depth`` slices.

    The slab is ``round(fraction * depth)`` slices (at least 1) starting at ``round(position * (depth -
    thickness))``; ``gap`` slices on each side of it belong to neither set, so no training crop touches
    tissue next to the validation slab.
    """
    thickness = min(depth, max(1, int(round(fraction * depth))))
    start = int(round(position * (depth - thickness)))
    val = (start, start + thickness)
    train = [(0, start - gap)] if start - gap > 0 else []
    if val[1] + gap < depth:
        train.append((val[1] + gap, depth))
    if not train:
        raise DagmanInputError(
            f"nothing left to train on: {depth} slices, a validation slab of {thickness} and a gap of {gap} on "
            "each side; lower --val-fraction or --val-gap-mm"
        )
    return train, val


def split_cases(cases: Sequence[Case], config: FinetuneConfig) -> Split:
    """Training and validation pieces: a held-out slab of every case, held-out cases, or no validation."""
    mode = config.val_split
    if mode == "auto":
        mode = "cases" if len(cases) >= 2 else "slab"
    if mode == "none":
        return Split([Piece(i, 0, c.image.shape[0]) for i, c in enumerate(cases)], [], "no validation")
    if mode == "cases":
        if config.val_cases >= len(cases):
            raise DagmanInputError(
                f"cannot hold out {config.val_cases} of {len(cases)} case(s) and still train; use --val-split slab"
            )
        n_train = len(cases) - config.val_cases
        train = [Piece(i, 0, c.image.shape[0]) for i, c in enumerate(cases[:n_train])]
        val = [Piece(i, 0, c.image.shape[0]) for i, c in enumerate(cases) if i >= n_train]
        return Split(
            train,
            val,
            f"validation on the last {config.val_cases} case(s): {', '.join(c.name for c in cases[n_train:])}",
        )
    train, val = [], []
    parts = []
    for i, case in enumerate(cases):
        gap = int(math.ceil(config.val_gap_mm / case.spacing[0] - 1e-9))
        ranges, slab = slab_ranges(case.image.shape[0], config.val_fraction, config.val_position, gap)
        train.extend(Piece(i, a, b) for a, b in ranges)
        val.append(Piece(i, *slab))
        parts.append(
            f"{case.name}: validation slab z {slab[0]}-{slab[1] - 1} of {case.image.shape[0]} "
            f"({(slab[1] - slab[0]) * case.spacing[0]:g} mm), gap {gap} slices ({gap * case.spacing[0]:g} mm) "
            f"each side, training z " + ", ".join(f"{a}-{b - 1}" for a, b in ranges)
        )
    return Split(train, val, "; ".join(parts))


class CropSampler:
    """Class-balanced training crops with MONAI: an organ (or background) first, then a crop centred on it.

    The class is drawn over all training pieces (chance ``background_ratio`` for background against 1 for
    each organ), then a piece in proportion to how many voxels of that class it holds, then
    ``RandCropByLabelClassesd`` cuts a crop centred on a random voxel of that class. Every draw of step ``k``
    comes from generators seeded by ``(seed, k, crop)``, so a resumed run sees the same crops.
    """

    def __init__(
        self,
        pieces: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        roi_size: tuple[int, int, int],
        num_classes: int,
        background_ratio: float,
        augment: bool,
        seed: int,
    ) -> None:
        from monai.transforms import ClassesToIndices, SpatialPad

        if not pieces:
            raise DagmanInputError("no training data")
        self.roi_size, self.num_classes, self.seed, self.augment = roi_size, num_classes, seed, augment
        pad = SpatialPad(spatial_size=roi_size, mode="constant", value=0.0)
        to_indices = ClassesToIndices(num_classes=num_classes)
        self.items: list[dict[str, Any]] = []
        counts = np.zeros((len(pieces), num_classes), dtype=np.int64)
        for p, (image, classes) in enumerate(pieces):
            # pad first (air, background) so every crop fits, then index the padded classes
            img = np.asarray(pad(image[None].astype(np.float32)))
            lab = np.asarray(pad(classes[None].astype(np.int16)))
            indices = [np.asarray(ix) for ix in to_indices(lab)]
            counts[p] = [len(ix) for ix in indices]
            self.items.append({"image": img, "label": lab, "indices": indices})
        self.counts = counts
        weights = np.ones(num_classes)
        weights[0] = background_ratio
        weights[counts.sum(axis=0) == 0] = 0.0  # a class with no training voxel cannot centre a crop
        if weights.sum() <= 0:
            raise DagmanInputError("the training data hold no voxel to centre a crop on")
        self.class_weights = weights / weights.sum()

    def classes_present(self) -> np.ndarray:
        return self.counts.sum(axis=0) > 0

    def sample(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (B, 1, *roi) float32, classes (B, 1, *roi) int64) for ``step``."""
        from monai.transforms import (
            Compose,
            RandCropByLabelClassesd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        images, labels = [], []
        for j in range(batch_size):
            rng = np.random.default_rng([self.seed, step, j, 3])
            cls = int(rng.choice(self.num_classes, p=self.class_weights))
            piece_p = self.counts[:, cls] / self.counts[:, cls].sum()
            item = self.items[int(rng.choice(len(self.items), p=piece_p))]
            ratios = [0.0] * self.num_classes
            ratios[cls] = 1.0
            steps: list[Any] = [
                RandCropByLabelClassesd(
                    keys=["image", "label"],
                    label_key="label",
                    spatial_size=self.roi_size,
                    ratios=ratios,
                    num_classes=self.num_classes,
                    num_samples=1,
                    indices_key="indices",
                    warn=False,
                )
            ]
            if self.augment:
                steps += [
                    RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                    RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
                ]
            transform = Compose(steps)
            transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
            out = transform(dict(item))[0]
            images.append(np.asarray(out["image"], dtype=np.float32))
            labels.append(np.asarray(out["label"], dtype=np.int64))
        return np.stack(images), np.stack(labels)


# =============================================================================================================
# Inference and validation
# =============================================================================================================
def roi_size_for(dims: int, roi: int) -> tuple[int, int, int]:
    """Crop / window size in (z, y, x): a 2D model sees one axial slice at a time."""
    return (roi, roi, roi) if dims == 3 else (1, roi, roi)


def sliding_window_logits(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    roi_size: tuple[int, int, int],
    overlap: float,
    device: torch.device,
    sw_batch_size: int = 4,
    amp: bool = False,
    on_window: Any = None,
) -> torch.Tensor:
    """Class logits (K+1, Z, Y, X) of a model-space image (Z, Y, X) by MONAI's Gaussian-blended sliding window.

    ``on_window(n)`` is called after every batch of windows with the number of windows in it (progress and
    cancellation: raising in it stops the inference).
    """
    from monai.inferers import sliding_window_inference

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            out = net(x.to(device))
        if on_window is not None:
            on_window(int(x.shape[0]))
        return out.float()

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    with torch.no_grad():
        logits = sliding_window_inference(
            x,
            roi_size,
            sw_batch_size,
            predictor,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device="cpu",
        )
    return torch.as_tensor(logits)[0]


def window_count(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits (its scan interval rule), for progress bars."""
    n = 1
    for size, roi in zip(shape, roi_size, strict=True):
        size = max(size, roi)
        interval = max(1, int(roi * (1 - overlap))) if roi < size else 1
        n *= int(math.ceil((size - roi) / interval)) + 1 if size > roi else 1
    return n


def dice_per_class(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, num_classes: int
) -> np.ndarray:
    """Dice of classes 1..K (MONAI ``compute_dice``); NaN where the reference lacks the class."""
    from monai.metrics import compute_dice

    p = torch.as_tensor(np.asarray(prediction, dtype=np.int64))[None, None]
    r = torch.as_tensor(np.asarray(reference, dtype=np.int64))[None, None]
    return compute_dice(p, r, include_background=False, num_classes=num_classes, ignore_empty=True)[0].numpy()


def validate(
    net: torch.nn.Module,
    cases: Sequence[Case],
    pieces: Sequence[Piece],
    *,
    roi_size: tuple[int, int, int],
    overlap: float,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
) -> np.ndarray:
    """Mean Dice per organ class over the validation pieces (NaN for organs absent from all of them).

    A slab is segmented with half a window of image context above and below it (as it would be inside a
    whole-volume prediction), and scored on its own voxels only: labels outside the slab are never looked at.
    """
    net.eval()
    scores = []
    for piece in pieces:
        depth = cases[piece.case].image.shape[0]
        c0, c1 = max(0, piece.z0 - roi_size[0] // 2), min(depth, piece.z1 + roi_size[0] // 2)
        logits = sliding_window_logits(
            net, cases[piece.case].image[c0:c1], roi_size=roi_size, overlap=overlap, device=device, amp=amp
        )
        prediction = logits.argmax(0).numpy()[piece.z0 - c0 : piece.z1 - c0]
        scores.append(dice_per_class(prediction, piece.classes(cases), num_classes))
    stacked = np.stack(scores)
    present = ~np.isnan(stacked)
    count = present.sum(axis=0)
    # a plain mean over the pieces that hold the organ (np.nanmean warns on all-NaN columns)
    return np.where(count > 0, np.where(present, stacked, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)


# =============================================================================================================
# Checkpoints of a fine-tuning run
# =============================================================================================================
def _input_spec(config: FinetuneConfig) -> dict[str, Any]:
    return {
        "spacing": config.spacing,
        "hu_min": config.hu_min,
        "hu_max": config.hu_max,
        "roi": config.roi,
        "dims": config.dims,
    }


def _metadata(
    config: FinetuneConfig, arch: Architecture, label_map: LabelMap, step: int, **extra: Any
) -> dict[str, str]:
    return {
        "architecture": arch.to_json(),
        "job": "finetune",
        "step": str(step),
        "classes": json.dumps(label_map.to_dict()),
        "input": json.dumps(_input_spec(config)),
        **{k: json.dumps(v) for k, v in extra.items()},
    }


def save_weights(
    path: Path, net: SegmentationNet, config: FinetuneConfig, label_map: LabelMap, step: int
) -> None:
    save_tensors(path, prefixed(net.state_dict(), "model"), _metadata(config, net.arch, label_map, step))


def save_resume(
    path: Path,
    net: SegmentationNet,
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    label_map: LabelMap,
    step: int,
    tracker: dict[str, Any],
) -> None:
    opt_tensors, opt_json = optimizer_tensors(optimizer)
    tensors = {**prefixed(net.state_dict(), "model"), **opt_tensors}
    meta = _metadata(config, net.arch, label_map, step, tracker=tracker) | {"optimizer": opt_json}
    save_tensors(path, tensors, meta)


def load_resume(
    path: Path, net: SegmentationNet, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if meta.get("job") != "finetune":
        raise CheckpointError(f"{path.name} is not a fine-tuning checkpoint")
    diff = net.arch.differences(architecture_from_metadata(meta, path.name))
    if diff:
        raise CheckpointError(f"{path.name} was trained with another architecture: {'; '.join(diff)}")
    state = strip_prefix(tensors, "model")
    check_state_fits(net, state, path.name)
    net.load_state_dict(state)
    load_optimizer_state(optimizer, tensors, meta["optimizer"])
    return int(meta["step"]), json.loads(meta.get("tracker", "{}"))


# =============================================================================================================
# The fine-tuning loop
# =============================================================================================================
def load_pairs(config: FinetuneConfig) -> list[tuple[Volume, Volume]]:
    """Read every image/label-map pair named in the config (all read before anything is written)."""
    from napari_dagman.core.io import read_volume

    if not config.images:
        raise DagmanInputError("no images given: pass IMAGE LABELS pairs")
    pairs = []
    for image_path, labels_path in zip(config.images, config.segmentations, strict=True):
        try:
            image = read_volume(image_path)
        except DagmanInputError as err:
            raise DagmanInputError(f"cannot use image {image_path}: {err}") from None
        try:
            labels = read_volume(labels_path)
        except DagmanInputError as err:
            raise DagmanInputError(f"cannot use label map {labels_path}: {err}") from None
        pairs.append((image, labels))
    return pairs


def _names(pairs: Sequence[tuple[Volume, Volume]]) -> list[str]:
    names = []
    for i, (image, _) in enumerate(pairs):
        name = str(image.metadata.get("name") or f"image {i}")
        names.append(name if name not in names else f"{name} ({i})")
    return names


def run_finetuning(
    config: FinetuneConfig,
    pairs: Sequence[tuple[Volume, Volume]] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str | None = None,
) -> Generator[Event, None, FinishedEvent]:
    """Fine-tune a segmentation network and yield events; returns (and yields last) the `FinishedEvent`.

    Parameters
    ----------
    config
        The job; ``config.out`` is the run folder, ``config.init`` the pretraining run (None: from scratch).
    pairs
        In-memory (image, label map) pairs (the GUI's layers); when None, ``config.images`` and
        ``config.segmentations`` are read.
    resume
        Continue the run in ``config.out`` from its resumable checkpoint (same organs, split, seed).
    cancel
        Checked before every step; when set, the run saves a checkpoint and finishes as cancelled.
    command
        What started the run, recorded in run.json.

    Yields
    ------
    `LogEvent` (the init report, the split), `StepEvent` per step (terms ``dice`` and ``ce``),
    `ValidationEvent` every ``val_every`` steps, `CheckpointEvent`, and a final `FinishedEvent` whose summary
    holds the best validation Dice per organ.
    """
    config.validate()
    if not config.out:
        raise DagmanInputError("no run folder given (--out)")
    run = RunFolder(config.out)
    net: SegmentationNet | None = None
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        from napari_dagman.core.devices import resolve_device

        device = resolve_device(config.device)

        # everything that can be wrong with the inputs is found before the run folder is touched
        init_info: dict[str, Any] = {}
        if resume:
            # the resumed run keeps its resolved settings; it needs neither the pretraining run (the weights
            # come from resume.safetensors) nor the flags it was started with, only ones that do not differ
            config, arch, init_info = _resume_settings(run, config, in_memory=bool(pairs))
            notes: list[str] = []
        else:
            if run.has_checkpoint():
                raise DagmanInputError(
                    f"{run.path} already holds a run; pass --resume to continue it or choose a new --out"
                )
            config, notes = resolve_finetune_config(config)
            arch = model_architecture(config)

        pairs = list(pairs) if pairs else load_pairs(config)
        if not pairs:
            raise DagmanInputError("no image/label-map pairs to train on")
        names = _names(pairs)
        label_vols = []
        for (_image, labels), name in zip(pairs, names, strict=True):
            label_vols.append(check_label_volume(labels, f"label map of '{name}'"))
        label_map = choose_organs(label_vols, config.organs)
        if not config.organs:
            config = config.replace(organs=list(label_map.ids))
        cases = [
            prepare_case(
                image,
                labels,
                label_map,
                dims=int(config.dims or 3),
                spacing=config.spacing,
                hu_range=(float(config.hu_min), float(config.hu_max)),
                resample_labels=config.resample_labels,
                name=name,
            )
            for (image, labels), name in zip(pairs, names, strict=True)
        ]
        split = split_cases(cases, config)
        roi_size = roi_size_for(arch.dims, int(config.roi))
        sampler = CropSampler(
            [(p.image(cases), p.classes(cases)) for p in split.train],
            roi_size=roi_size,
            num_classes=label_map.num_classes,
            background_ratio=config.background_ratio,
            augment=config.augment,
            seed=config.seed,
        )
        untrained = [
            label_map.names[k - 1]
            for k in range(1, label_map.num_classes)
            if not sampler.classes_present()[k]
        ]
        if len(untrained) == len(label_map.ids):
            raise DagmanInputError("the training part of the data holds none of the chosen organs")
        for case in cases:
            missing = [label_map.id_names[i] for i in label_map.ids if i not in case.ids_present]
            if missing:
                notes.append(f"{case.name}: no {', '.join(missing)} in its label map")
        if untrained:
            notes.append(f"no training voxels of {', '.join(untrained)} (all in the validation part)")
        if split.val:
            in_val = set()
            for piece in split.val:
                in_val.update(int(c) for c in present_ids(piece.classes(cases)))
            unvalidated = [n for k, n in enumerate(label_map.names, start=1) if k not in in_val]
            if len(unvalidated) == len(label_map.names):
                notes.append(
                    "the validation part holds none of the chosen organs, so validation Dice stays empty; "
                    "move the slab (--val-position) or make it thicker (--val-fraction)"
                )
            elif unvalidated:
                notes.append(f"not in the validation part (no Dice for them): {', '.join(unvalidated)}")

        net, report = build_model(
            arch,
            label_map,
            init=None if resume else config.init,
            which=config.init_encoder,
            weights=config.init_weights,
            drop_path=config.drop_path,
            seed=config.seed,
        )
        init_info = init_info or report.to_dict()
        net.to(device)
        set_fused_window_attention(net, config.fused_attention)
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        from napari_dagman.core.engine import parameter_groups, step_seed
        from napari_dagman.core.methods.losses import learning_rate

        optimizer = torch.optim.AdamW(parameter_groups(net, config.weight_decay), lr=config.lr)
        total = config.steps
        start = 0
        tracker: dict[str, Any] = {
            "running_loss": math.inf,
            "best_loss": math.inf,
            "best_dice": -math.inf,
            "best_step": 0,
            "best_val": {},
            "last_val": {},
        }
        if resume:
            start, saved_tracker = load_resume(run.file(RESUME_FILE), net, optimizer)
            tracker.update(saved_tracker)
            if start >= total:
                raise DagmanInputError(
                    f"{run.path} already finished {start} of {total} steps; pass more --steps to continue"
                )

        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(
            {
                **config.to_dict(),
                "architecture": arch.to_dict(),
                "job": "finetune",
                "classes": label_map.to_dict(),
                "init_report": init_info,
                "split": split.to_dict(),
            }
        )
        if resume:
            run.truncate_metrics(start)
        run.begin_run_info(
            "finetune",
            resume_step=start if resume else None,
            command=command,
            data=[
                {
                    "name": c.name,
                    "sha256": c.source_hash,
                    "shape": list(c.image.shape),
                    "spacing": list(c.spacing),
                }
                for c in cases
            ],
            device=device,
            total_steps=total,
            init=config.init,
            seed=config.seed,
        )

        for note in notes:
            yield LogEvent(note, "warning")
        yield LogEvent(
            ("resuming from resume.safetensors; at the start, " if resume else "")
            + str(init_info.get("summary", ""))
        )
        yield LogEvent(f"organs: {label_map.describe()}; {split.description}")
        yield LogEvent(
            f"fine-tuning {arch.preset} {arch.dims}D SwinUNETR, ROI {config.roi}, {config.spacing} mm, "
            f"{total} steps on {device}" + (f" (resuming at step {start})" if resume else "")
        )

        use_amp = config.amp and device.type == "cuda"
        step = start
        saved_step = start
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def save(kind: str) -> list[CheckpointEvent]:
            nonlocal saved_step
            save_resume(run.file(RESUME_FILE), net, optimizer, config, label_map, step, tracker)
            save_weights(run.file(MODEL_FILE), net, config, label_map, step)
            events = [CheckpointEvent(step, str(run.file(MODEL_FILE)), "last")]
            # without validation, "best" follows the running training loss, as in pretraining
            if not split.val and tracker["running_loss"] < tracker["best_loss"]:
                tracker["best_loss"] = tracker["running_loss"]
                tracker["best_step"] = step
                save_weights(run.file(BEST_FILE), net, config, label_map, step)
                events.append(CheckpointEvent(step, str(run.file(BEST_FILE)), "best"))
            if kind == "snapshot":
                path = run.file(SNAPSHOT_DIR) / f"step_{step:06d}.safetensors"
                save_weights(path, net, config, label_map, step)
                events.append(CheckpointEvent(step, str(path), "snapshot"))
            saved_step = step
            return events

        def run_validation() -> list[Event]:
            t0 = time.perf_counter()
            scores = validate(
                net,
                cases,
                split.val,
                roi_size=roi_size,
                overlap=config.overlap,
                num_classes=label_map.num_classes,
                device=device,
                amp=use_amp,
            )
            dice = {name: float(s) for name, s in zip(label_map.names, scores, strict=True)}
            finite = [v for v in dice.values() if math.isfinite(v)]
            mean = float(np.mean(finite)) if finite else math.nan
            tracker["last_val"] = {"step": step, "dice": dice, "mean_dice": mean}
            best = math.isfinite(mean) and mean > tracker["best_dice"]
            events: list[Event] = [
                ValidationEvent(step, dice, mean, seconds=time.perf_counter() - t0, best=best)
            ]
            run.append_metrics(
                {"step": step, "kind": "validation", "mean_dice": mean, "dice": dice, "time": time.time()}
            )
            if best:
                tracker.update(best_dice=mean, best_step=step, best_val=dict(dice))
                save_weights(run.file(BEST_FILE), net, config, label_map, step)
                events.append(CheckpointEvent(step, str(run.file(BEST_FILE)), "best"))
            return events

        cancelled = False
        try:
            while step < total:
                if cancel is not None and cancel.cancelled:
                    cancelled = True
                    break
                t0 = time.perf_counter()
                lr = learning_rate(
                    step, total, peak=config.lr, warmup=config.warmup_steps or 0, final=config.min_lr
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(step_seed(config.seed, step, 0, 0))  # stochastic depth
                images_np, labels_np = sampler.sample(step, config.batch_size)
                images = torch.from_numpy(images_np).to(device, non_blocking=True)
                labels = torch.from_numpy(labels_np).to(device, non_blocking=True)
                net.train()
                with (
                    torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
                ):
                    logits = net(images)
                logits = logits.float()
                dice_term = loss_fn.dice(logits, labels)
                ce_term = loss_fn.ce(logits, labels)
                loss = loss_fn.lambda_dice * dice_term + loss_fn.lambda_ce * ce_term
                if not torch.isfinite(loss):
                    raise DagmanError(
                        f"the loss became {float(loss)} at step {step + 1}; the last good checkpoint is kept. "
                        "Lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (
                    float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
                    if config.grad_clip > 0
                    else math.nan
                )
                optimizer.step()
                step += 1
                seconds = time.perf_counter() - t0
                value = float(loss.detach())
                tracker["running_loss"] = (
                    value
                    if not math.isfinite(tracker["running_loss"])
                    else 0.9 * tracker["running_loss"] + 0.1 * value
                )
                terms = {"dice": float(dice_term.detach()), "ce": float(ce_term.detach())}
                event = StepEvent(
                    step=step,
                    total_steps=total,
                    loss=value,
                    terms=terms,
                    lr=lr,
                    seconds_per_step=seconds,
                    samples_per_second=config.batch_size / max(seconds, 1e-9),
                    extras={"grad_norm": grad_norm},
                )
                if step % config.log_every == 0 or step == total:
                    run.append_metrics(
                        {
                            "step": step,
                            "kind": "train",
                            "loss": value,
                            **terms,
                            "lr": lr,
                            "seconds": seconds,
                            "grad_norm": grad_norm,
                            "time": time.time(),
                        }
                    )
                yield event
                if split.val and (step % config.val_every == 0 or step == total):
                    yield from run_validation()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    yield from save("snapshot")
                elif step % config.save_every == 0 or step == total:
                    yield from save("last")
        except GeneratorExit:
            # the consumer closed us (GUI cancel, Ctrl-C): keep the progress, then stop
            if step > saved_step:
                save("last")
            _finish_run_info(run, "cancelled", step, tracker)
            raise

        if step > saved_step:
            yield from save("last")
        if not run.file(BEST_FILE).is_file():  # cancelled before the first validation
            save_weights(run.file(BEST_FILE), net, config, label_map, step)
        status = "cancelled" if cancelled else "completed"
        _finish_run_info(run, status, step, tracker)
        finished = FinishedEvent(
            run_dir=str(run.path),
            steps_done=step,
            total_steps=total,
            cancelled=cancelled,
            paths={
                "last": str(run.file(MODEL_FILE)),
                "best": str(run.file(BEST_FILE)),
                "resume": str(run.file(RESUME_FILE)),
            },
            summary={
                "organs": label_map.to_dict(),
                "best_mean_dice": tracker["best_dice"] if math.isfinite(tracker["best_dice"]) else None,
                "best_step": tracker["best_step"],
                "best_dice": tracker["best_val"],
                "last_validation": tracker["last_val"],
                "final_running_loss": tracker["running_loss"],
                "init": init_info,
                "split": split.description,
            },
        )
        yield finished
        return finished
    except DagmanError as err:
        _finish_run_info(run, f"failed: {err}", None, None)
        raise
    finally:
        net = None  # drop the model with the generator's frame (GPU memory), not when it is collected
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _resume_settings(
    run: RunFolder, config: FinetuneConfig, *, in_memory: bool
) -> tuple[FinetuneConfig, Architecture, dict[str, Any]]:
    """The saved run's settings, with what ``config`` may change (steps, lr, device, logging), checked.

    Fields of ``config`` left at None (or empty organs / files) take the saved values; a given value that
    differs from the saved one in a key that fixes the network, the organs, the split or the random streams
    (`RESUME_KEYS`) is refused.
    """
    if not run.file(RESUME_FILE).is_file():
        raise CheckpointError(f"nothing to resume in {run.path}: no {RESUME_FILE}")
    saved_dict = run.config_dict()
    if saved_dict.get("job") != "finetune":
        raise CheckpointError(
            f"{run.path} is a {saved_dict.get('job', 'pretrain')} run, not a fine-tuning run"
        )
    saved = FinetuneConfig.from_dict(saved_dict, strict=False)
    data = config.to_dict()
    for key, value in saved.to_dict().items():
        if data.get(key) is None or (key in ("organs", "images", "segmentations") and not data.get(key)):
            data[key] = value
    if in_memory:  # layers given again: the files recorded (if any) are not read
        data["images"], data["segmentations"] = [], []
    given = FinetuneConfig.from_dict(data)
    changed = [k for k in RESUME_KEYS if getattr(saved, k) != getattr(given, k)]
    if changed:
        details = ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(given, k)!r}" for k in changed)
        raise CheckpointError(f"cannot resume {run.path} with other settings: {details}")
    return (
        given,
        Architecture.from_dict(saved_dict["architecture"]),
        dict(saved_dict.get("init_report") or {}),
    )


def _finish_run_info(run: RunFolder, status: str, step: int | None, tracker: dict[str, Any] | None) -> None:
    best = {}
    if tracker and math.isfinite(tracker.get("best_dice", -math.inf)):
        best = {"best_mean_dice": tracker["best_dice"], "best_step": tracker["best_step"]}
    run.finish_run_info(status, step, **best)


# =============================================================================================================
# Prediction
# =============================================================================================================
@dataclass
class Segmenter:
    """A fine-tuned network with what is needed to feed it and to name its output."""

    net: SegmentationNet
    label_map: LabelMap
    spacing: float | None
    hu_range: tuple[float, float]
    roi: int
    source: str
    step: int
    device: torch.device

    @property
    def arch(self) -> Architecture:
        return self.net.arch


def load_segmenter(
    path: str | Path,
    *,
    weights: str = "best",
    device: str | torch.device = "cpu",
    fused_attention: bool = True,
) -> Segmenter:
    """Load a fine-tuning run folder (or one of its ``.safetensors`` files) for prediction.

    ``fused_attention`` computes the window attention with ``scaled_dot_product_attention`` (faster; equal to
    MONAI's explicit softmax up to rounding).

    Raises `CheckpointError` for pretraining runs (fine-tune them first) and files of another kind.
    """
    from napari_dagman.core.devices import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    path = Path(path)
    if path.is_dir():
        config = RunFolder(path).config_dict()
        job = config.get("job", "pretrain")
        if job != "finetune":
            raise CheckpointError(
                f"{path} is a {job} run ({config.get('method', 'unknown method')}), not a fine-tuned "
                f"segmentation model; fine-tune it first: napari-dagman finetune IMAGE LABELS --init {path} --out RUN2"
            )
        file = RunFolder(path).weights_path(weights)
    else:
        file = path
    tensors, meta = load_tensors(file)
    if meta.get("job") != "finetune":
        raise CheckpointError(
            f"{file.name} holds {meta.get('job', 'unknown')} weights, not a segmentation model"
        )
    arch = architecture_from_metadata(meta, file.name)
    label_map = LabelMap.from_dict(json.loads(meta.get("classes", "{}")))
    spec = json.loads(meta.get("input", "{}"))
    net = SegmentationNet(arch, label_map.num_classes)
    state = strip_prefix(tensors, "model")
    check_state_fits(net, state, file.name)
    net.load_state_dict(state)
    net.eval().to(device)
    set_fused_window_attention(net, fused_attention)
    return Segmenter(
        net=net,
        label_map=label_map,
        spacing=None if spec.get("spacing") is None else float(spec["spacing"]),
        hu_range=(float(spec.get("hu_min", SCRATCH_HU[0])), float(spec.get("hu_max", SCRATCH_HU[1]))),
        roi=int(spec.get("roi", SCRATCH_DEFAULTS["roi"])),
        source=str(file),
        step=int(meta.get("step", 0)),
        device=device,
    )


class _Stopped(Exception):
    """Raised inside the sliding window to stop it (cancel, or the generator was closed)."""


def run_prediction(
    image: Volume,
    segmenter: Segmenter,
    *,
    roi: int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    cancel: CancelToken | None = None,
    name: str | None = None,
) -> Generator[Event, None, Volume | None]:
    """Segment ``image``; yields `ProgressEvent` per batch of windows, a `PredictionEvent`, a `FinishedEvent`.

    The label map (returned, and in the `PredictionEvent`) holds the original label ids on the input's grid,
    with ``metadata["label_names"]`` and the input's source orientation (a NIfTI written from it overlays the
    input file). A cancel returns None.
    """
    from napari_dagman.core.data import model_volume
    from napari_dagman.core.io import resample_like

    t_start = time.perf_counter()
    roi = int(roi or segmenter.roi)
    if roi % DEEPEST_STRIDE:
        raise DagmanInputError(f"roi must be a multiple of {DEEPEST_STRIDE}, got {roi}")
    name = name or str(image.metadata.get("name", "image"))
    arch = segmenter.arch
    pv = model_volume(
        image, dims=arch.dims, spacing=segmenter.spacing, hu_range=segmenter.hu_range, name=name
    )
    roi_size = roi_size_for(arch.dims, roi)
    total = window_count(pv.array.shape, roi_size, overlap)
    done = [0]
    updates: queue.SimpleQueue[int] = queue.SimpleQueue()
    stop = threading.Event()
    result: dict[str, Any] = {}

    def on_window(n: int) -> None:
        done[0] += n
        updates.put(done[0])
        if stop.is_set() or (cancel is not None and cancel.cancelled):
            raise _Stopped

    def work() -> None:
        try:
            result["logits"] = sliding_window_logits(
                segmenter.net,
                pv.array,
                roi_size=roi_size,
                overlap=overlap,
                device=segmenter.device,
                sw_batch_size=sw_batch_size,
                amp=segmenter.device.type == "cuda",
                on_window=on_window,
            )
        except BaseException as err:  # handed to the generator's thread
            result["error"] = err

    yield ProgressEvent(0, total, "sliding window")
    # MONAI's sliding window has no callback to yield from: it runs in a helper thread while this generator
    # reports progress, so the GUI's progress bar moves and a cancel takes effect after the current batch.
    thread = threading.Thread(target=work, name="napari-dagman-predict", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
            latest = None
            while not updates.empty():
                latest = updates.get()
            if latest is not None:
                yield ProgressEvent(min(latest, total), total, "sliding window")
    except GeneratorExit:
        stop.set()
        thread.join()
        raise
    error = result.get("error")
    if isinstance(error, _Stopped):
        yield LogEvent("prediction cancelled", "warning")
        yield FinishedEvent(str(Path(segmenter.source).parent), done[0], total, cancelled=True)
        return None
    if error is not None:
        raise error
    logits: torch.Tensor = result["logits"]
    probs = torch.softmax(logits, dim=0).numpy()
    del logits
    yield ProgressEvent(total, total, "resampling to the input grid")
    model_grid = Volume(np.zeros(pv.array.shape, np.uint8), pv.spacing, pv.origin, pv.direction)
    if model_grid.same_grid(image):
        classes = probs.argmax(0)
    else:
        # resample class probabilities (linear), not the arg-max: smooth borders on a finer input grid
        best = np.full(image.shape, -1.0, dtype=np.float32)
        classes = np.zeros(image.shape, dtype=np.int64)
        for c in range(probs.shape[0]):
            p = resample_like(
                model_grid.with_array(probs[c].astype(np.float32)),
                image,
                is_label=False,
                default=1.0 if c == 0 else 0.0,
            ).array
            better = p > best
            classes[better] = c
            best = np.where(better, p, best)
    ids = segmenter.label_map.to_labels(classes)
    labels = image.with_array(
        ids,
        name=f"{name} prediction",
        label_names={int(k): v for k, v in segmenter.label_map.id_names.items()},
        kind="labels",
        prediction_source=segmenter.source,
    )
    labels.metadata.pop("source_path", None)  # that is the CT's file, not this label map's
    seconds = time.perf_counter() - t_start
    yield PredictionEvent(labels, seconds=seconds, source=segmenter.source)
    yield FinishedEvent(
        str(Path(segmenter.source).parent),
        total,
        total,
        paths={"weights": segmenter.source},
        summary={"seconds": seconds, "windows": total, "model_spacing": list(pv.spacing)},
    )
    return labels


def predict(
    image: Volume,
    segmenter: Segmenter,
    *,
    roi: int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
) -> Volume:
    """`run_prediction` to the end: the label map in the input's geometry."""
    labels = None
    for event in run_prediction(image, segmenter, roi=roi, overlap=overlap, sw_batch_size=sw_batch_size):
        if isinstance(event, PredictionEvent):
            labels = event.labels
    if labels is None:
        raise DagmanError("prediction ended without a result")
    return labels


# =============================================================================================================
# Results: metrics, where each organ is, where prediction and reference disagree
# =============================================================================================================
def organ_focus(labels: np.ndarray, organ: int, axis: int = 0) -> tuple[int, int, int] | None:
    """Index (z, y, x) to show an organ: the slice along ``axis`` where it is largest, its centroid there."""
    mask = np.asarray(labels) == organ
    return _focus(mask, axis)


def _focus(mask: np.ndarray, axis: int) -> tuple[int, int, int] | None:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    areas = mask.sum(axis=other)
    if not areas.any():
        return None
    index = int(np.argmax(areas))
    plane = np.take(mask, index, axis=axis)
    coords = np.argwhere(plane).mean(axis=0)
    point = [0, 0, 0]
    point[axis] = index
    for a, c in zip(other, coords, strict=True):
        point[a] = int(round(float(c)))
    return tuple(point)  # type: ignore[return-value]


def worst_slice(
    prediction: np.ndarray,
    reference: np.ndarray,
    organ: int | None = None,
    *,
    axis: int = 0,
    organs: Sequence[int] | None = None,
) -> tuple[int, int, int] | None:
    """Index (z, y, x) of the slice along ``axis`` where prediction and reference disagree most.

    For one ``organ``: voxels where exactly one of them says that organ; for all (``organ=None``): voxels whose
    labels differ, counting only ``organs`` when given. The point is the centroid of the disagreement in that
    slice; None when they agree everywhere.
    """
    pred, ref = np.asarray(prediction), np.asarray(reference)
    if organ is not None:
        mask = (pred == organ) != (ref == organ)
    else:
        if organs is not None:
            keep = np.asarray(list(organs))
            pred = np.where(np.isin(pred, keep), pred, 0)
            ref = np.where(np.isin(ref, keep), ref, 0)
        mask = pred != ref
    return _focus(mask, axis)


def disagreement_map(prediction: np.ndarray, reference: np.ndarray, organs: Sequence[int]) -> np.ndarray:
    """Per voxel: 0 agree, 1 false positive (organ predicted on background), 2 false negative (organ missed),
    3 wrong organ. Reference ids that are not among ``organs`` count as background (the model never saw them).
    """
    keep = np.asarray(list(organs))
    pred = np.where(np.isin(prediction, keep), prediction, 0)
    ref = np.where(np.isin(reference, keep), reference, 0)
    out = np.zeros(pred.shape, dtype=np.uint8)
    differ = pred != ref
    out[differ & (ref == 0)] = 1
    out[differ & (pred == 0)] = 2
    out[differ & (pred != 0) & (ref != 0)] = 3
    return out


def disagreement_colours() -> dict[int | None, np.ndarray]:
    """Colours of `disagreement_map` values (yellow FP, cyan FN, magenta wrong organ)."""
    return {k: v.copy() for k, v in _DISAGREEMENT_COLOURS.items()}


def evaluate(
    prediction: Volume,
    reference: Volume | None,
    organs: Mapping[int, str],
    *,
    hd95: bool = True,
    resample_reference: bool = False,
) -> pd.DataFrame:
    """Per-organ results table: volume (ml), and with a reference its volume, Dice and HD95 (mm).

    Columns: ``id``, ``organ``, ``volume_ml``, ``reference_ml``, ``dice``, ``hd95_mm`` (NaN without a reference,
    or when the organ is missing from one side), ``focus_z/y/x`` (where the organ is largest along z, in
    prediction voxel indices; from the reference when the prediction misses it) and ``worst_z`` (the axial
    slice with the most disagreement for that organ, -1 when none).
    """
    from monai.metrics import compute_hausdorff_distance

    pred = np.asarray(prediction.array)
    ref = None
    if reference is not None:
        reference = check_label_volume(reference, "reference label map")
        reference = align_labels(
            prediction,
            reference,
            resample=resample_reference,
            image_name=str(prediction.metadata.get("name", "prediction")),
            labels_name=str(reference.metadata.get("name", "reference")),
        )
        ref = np.asarray(reference.array)
    voxel_ml = float(np.prod(prediction.spacing)) / 1000.0
    rows = []
    for organ, name in organs.items():
        p = pred == organ
        row: dict[str, Any] = {"id": int(organ), "organ": name, "volume_ml": float(p.sum()) * voxel_ml}
        r = ref == organ if ref is not None else None
        row["reference_ml"] = float(r.sum()) * voxel_ml if r is not None else math.nan
        row["dice"], row["hd95_mm"] = math.nan, math.nan
        if r is not None and r.any():
            inter = float(np.logical_and(p, r).sum())
            row["dice"] = 2.0 * inter / (float(p.sum()) + float(r.sum()))
            if hd95 and p.any():
                with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
                    warnings.simplefilter("ignore", FutureWarning)
                    value = compute_hausdorff_distance(
                        torch.as_tensor(p[None, None]),
                        torch.as_tensor(r[None, None]),
                        include_background=True,
                        percentile=95,
                        spacing=list(prediction.spacing),
                    )
                row["hd95_mm"] = float(value.reshape(-1)[0])
        focus = _focus(p, 0) if p.any() else (_focus(r, 0) if r is not None else None)
        row["focus_z"], row["focus_y"], row["focus_x"] = focus if focus is not None else (-1, -1, -1)
        worst = _focus(p != r, 0) if r is not None else None
        row["worst_z"] = worst[0] if worst is not None else -1
        rows.append(row)
    return pd.DataFrame(
        rows,
        columns=[
            "id",
            "organ",
            "volume_ml",
            "reference_ml",
            "dice",
            "hd95_mm",
            "focus_z",
            "focus_y",
            "focus_x",
            "worst_z",
        ],
    )


def results_summary(table: pd.DataFrame) -> dict[str, Any]:
    """JSON-ready results: one record per organ (NaN -> null) and the mean Dice / HD95 over scored organs."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value

    records = [{k: plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
    dice = table["dice"].to_numpy(dtype=float)
    hd = table["hd95_mm"].to_numpy(dtype=float)
    return {
        "organs": records,
        "mean_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else None,
        "mean_hd95_mm": float(np.nanmean(hd)) if np.isfinite(hd).any() else None,
    }


def format_table(table: pd.DataFrame) -> str:
    """A plain-text table for the terminal."""
    header = f"{'organ':<24}{'id':>5}{'ml':>10}{'ref ml':>10}{'Dice':>8}{'HD95 mm':>10}"
    lines = [header, "-" * len(header)]

    def num(value: float, fmt: str) -> str:
        return format(value, fmt) if math.isfinite(value) else "-"

    for row in table.itertuples(index=False):
        lines.append(
            f"{str(row.organ)[:23]:<24}{row.id:>5}{num(row.volume_ml, '.1f'):>10}{num(row.reference_ml, '.1f'):>10}"
            f"{num(row.dice, '.3f'):>8}{num(row.hd95_mm, '.1f'):>10}"
        )
    summary = results_summary(table)
    if summary["mean_dice"] is not None:
        mean_hd = summary["mean_hd95_mm"]
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<24}{'':>5}{'':>10}{'':>10}{summary['mean_dice']:>8.3f}"
            f"{(format(mean_hd, '.1f') if mean_hd is not None else '-'):>10}"
        )
    return "\n".join(lines)
