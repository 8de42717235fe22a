"""The pretraining job's configuration: data, views and augmentation, model, schedule, probes; a method's own options
live in its file (`core.methods.base.MethodOptions`) and travel here under ``options``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from napari_dagman.core.config.base import (
    PRESET_NAMES,
    OptimiserOptions,
    RunOptions,
    option,
    unknown_options_message,
)
from napari_dagman.core.errors import DagmanInputError


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
    cache: bool = option(
        True,
        "prepare each image file once into the prepared-volume cache and map it from disk (RAM holds the crops, "
        "not the cohort; a warm cache starts in seconds); off = read and prepare in memory at every run",
        group="data",
    )
    cache_dir: str | None = option(
        None,
        "prepared-volume cache folder (default $NAPARI_DAGMAN_VOLUME_CACHE or ~/.cache/napari-dagman/volumes)",
        group="data",
    )
    memory_cache: int = option(
        0,
        "hold this many prepared volumes in RAM and draw every sample from them, swapping --memory-replace of them "
        "each round (MONAI's SmartCacheDataset scheme): for a slow or network disk; RAM grows by that many "
        "volumes. 0 = map every volume from the cache on disk (RAM holds crops only)",
        minimum=0,
        group="data",
    )
    memory_replace: float = option(
        0.25, "fraction of the volumes held in RAM swapped each round", minimum=0.01, maximum=1.0, group="data"
    )
    loader_thread: bool = option(
        True,
        "draw and augment the next step's views in a background thread while this step trains (the same views "
        "either way: a step's views depend on the seed and the step only)",
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
    view_region: float = option(
        1.5,
        "the views of a sample (and its local crops) are cut at random places inside one region this many ROI "
        "sides wide (clipped to the volume): 1 = the same crop (before augmentation), 1.5 = views that share on "
        "average about 40% of their voxels, 2 = about 20% (SMIT: 96 voxel views from a 128 region, 1.33)",
        minimum=1.0,
        maximum=8.0,
        group="views",
    )
    augment: bool = option(
        True,
        "augment each view with its own draw (intensity, contrast, noise, blur, flip, rotation/zoom; MONAI "
        "transforms, see core/augment.py); off = the crops as they are",
        group="views",
    )
    aug_intensity: float = option(
        0.03,
        "intensity scale and shift per view: x (1 +- a) +- a, in model units (1 = the HU window; 0.03 = about "
        "13 HU over the default window: scanner calibration, not tissue contrast, which is information in CT)",
        minimum=0.0,
        maximum=1.0,
        group="views",
    )
    aug_contrast: float = option(
        0.0,
        "gamma contrast in [1/(1+c), 1+c], half of the views (0: a gamma changes the HU differences between "
        "tissues that tell organs apart; DINO's colour jitter is for natural images)",
        minimum=0.0,
        maximum=3.0,
        group="views",
    )
    aug_noise: float = option(
        0.02,
        "Gaussian noise std up to this (model units), 30% of the views",
        minimum=0.0,
        maximum=0.5,
        group="views",
    )
    aug_blur: float = option(
        1.0,
        "Gaussian blur sigma up to this (voxels), 20% of the views",
        minimum=0.0,
        maximum=4.0,
        group="views",
    )
    aug_flip: float = option(
        0.0,
        "mirror left-right with this probability (0: laterality is anatomy in CT; DINO uses 0.5)",
        minimum=0.0,
        maximum=1.0,
        group="views",
    )
    aug_rotate: float = option(
        10.0,
        "rotation up to this many degrees about each axis, half of the views",
        minimum=0.0,
        maximum=45.0,
        group="views",
    )
    aug_zoom: float = option(
        0.1, "zoom by up to +- this fraction, with the rotation", minimum=0.0, maximum=0.5, group="views"
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
    class_attention_init: str = option(
        "cait",
        "initialisation of the class attention's linear layers: cait (truncated normal 0.02: an untrained map is "
        "uniform) or pytorch (PyTorch's default: a random ripple, but it departs from uniform faster in short runs; "
        "see docs/methods.md)",
        choices=("cait", "pytorch"),
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

    def augment_settings(self) -> Any:
        """The per-view augmentation (`core.augment.AugmentSettings`), or None when off."""
        from napari_dagman.core.augment import AugmentSettings

        if not self.augment:
            return None
        settings = AugmentSettings(
            intensity=self.aug_intensity,
            contrast=self.aug_contrast,
            noise=self.aug_noise,
            blur=self.aug_blur,
            flip=self.aug_flip,
            rotate=self.aug_rotate,
            zoom=self.aug_zoom,
        )
        return settings if settings.active else None

    def total_steps(self, num_volumes: int) -> int:
        """Steps of the run: ``steps``, or ``epochs`` x ceil(volumes / batch), or 1000."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * max(1, -(-num_volumes // self.batch_size))
        return 1000
