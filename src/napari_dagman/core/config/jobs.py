"""The job configurations besides pretraining (`core.config.pretrain`): attention, organ clusters, fine-tuning,
prediction, the demo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from napari_dagman.core.config.base import (
    DEVICE_HELP,
    PRESET_NAMES,
    ConfigBase,
    OptimiserOptions,
    RunOptions,
    option,
)
from napari_dagman.core.config.pretrain import _method_names
from napari_dagman.core.errors import DagmanInputError

# ---------------------------------------------------------------------------------------------------------
# Attention maps and mask previews
# ---------------------------------------------------------------------------------------------------------
#: Where maps are computed: the crop around a point, the displayed axial slice (2D models) or every window.
ATTENTION_SCOPES: tuple[str, ...] = ("crop", "slice", "volume")


@dataclass
class AttentionConfig(ConfigBase):
    """Attention maps of a pretraining run over a CT, and the mask every strategy would draw for one crop."""

    kind: ClassVar[str] = "attention"

    checkpoint: str | None = option(None, "pretraining run folder (or one of its .safetensors)", cli=False)
    which: str = option(
        "auto",
        "encoder the run publishes: auto (the method's preferred one, e.g. the teacher) or its name",
        group="model",
    )
    weights: str = option("last", "last, best or a .safetensors path", group="model")
    scope: str = option(
        "volume",
        "where the maps are computed: the crop around --center, the axial slice --slice (2D models) or the "
        "whole volume (sliding window)",
        choices=ATTENTION_SCOPES,
        group="maps",
    )
    maps: bool = option(True, "compute attention maps (off: only the mask previews)", cli=False, group="maps")
    overlap: float = option(0.25, "sliding-window overlap", minimum=0.0, maximum=0.9, group="maps")
    center: list[float] = option(
        [],
        "physical (LPS, mm) centre Z Y X of the mask-preview crop (default: the body's centre)",
        group="masks",
    )
    slice_index: int = option(0, "axial slice of scope 'slice'", minimum=0, flag="--slice", group="maps")
    strategies: str = option(
        "run",
        "mask previews: run = the mask the run itself draws (its strategy, ratio, jitter, masking probability and "
        "teacher noise, from its config); all = also every other strategy at the run's ratio, for comparison",
        choices=("run", "all"),
        group="masks",
    )
    ratio: float | None = option(
        None, "mask ratio of the previews (default: the run's)", minimum=0.0, maximum=1.0, group="masks"
    )
    noise_rate: float | None = option(
        None,
        "input dropout of the noisy-teacher preview (default: the run's; 0.2 for a clean teacher shown under 'all')",
        minimum=0.0,
        maximum=0.9,
        group="masks",
    )
    seed: int = option(0, "seed of the mask previews (one draw of the run's recipe per seed)", group="masks")
    checks: bool = option(
        True,
        "sanity checks of the maps (attention_stats.json): flatness, model randomisation against random networks, "
        "intensity, stability under a one-token shift, head diversity against its noise floor",
        group="maps",
    )
    check_seeds: int = option(
        3,
        "random networks (seeds) the randomisation and diversity checks compare with",
        minimum=2,
        maximum=10,
        group="maps",
    )
    subtoken: int = option(
        1,
        "maps finer than one token by shifted-window inference: 2 = half a token, 4 = a quarter (k^3 passes "
        "in 3D, k^2 in 2D)",
        choices=(1, 2, 4),
        group="maps",
    )
    smooth: bool = option(
        False, "also write every map interpolated (linear) onto the CT's voxel grid", group="output"
    )
    labels: str | None = option(
        None, "label map of the CT: each head's attention per organ (attention_by_organ.csv)", group="organs"
    )
    compare: str | None = option(
        None,
        "a second pretraining run of the same architecture: the same maps, masks and head diversity for both, "
        "and the difference of their mean maps",
        group="compare",
    )
    on_input_grid: bool = option(
        False, "also write the mean map resampled onto the input's voxel grid", group="output"
    )
    device: str = option("auto", DEVICE_HELP, group="run")
    batch_size: int = option(4, "windows per forward pass", minimum=1, group="run")

    def validate(self) -> None:
        super().validate()
        if self.center and len(self.center) != 3:
            raise DagmanInputError(f"center takes three numbers (Z Y X in mm), got {len(self.center)}")


# ---------------------------------------------------------------------------------------------------------
# Organ clusters (embeddings)
# ---------------------------------------------------------------------------------------------------------
#: What each patch is described by: the run's encoder, or one of the controls on exactly the same patches.
EMBED_FEATURES: tuple[str, ...] = ("encoder", "random-init", "intensity", "position")
EMBED_POOLINGS: tuple[str, ...] = ("mean", "token")
EMBED_SAMPLINGS: tuple[str, ...] = ("auto", "grid", "organs", "both")


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
        "organs are represented; both; auto = both with a label map, grid without (the clusters dock's default)",
        choices=EMBED_SAMPLINGS,
        group="patches",
    )
    patch_mm: float | None = option(
        None,
        "patch side in mm (converted to the run's voxels; overrides --patch)",
        minimum=0.1,
        group="patches",
    )
    stride_mm: float | None = option(
        None,
        "distance between patch starts in mm (converted to the run's voxels; overrides --stride)",
        minimum=0.1,
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
    test_slab: list[float] = option(
        [],
        "z range LOW HIGH (mm, LPS, as napari shows) of a held-out slab: k-NN and the linear probe train on the "
        "patches outside it (beyond the gap) and are scored inside it, instead of cross-validating over slabs (for "
        "an encoder pretrained without that slab)",
        group="metrics",
    )
    merge_sides: bool = option(
        False,
        "metrics count left and right of a paired organ as one (kidney_left + kidney_right = kidney): organ "
        "identity without laterality",
        group="metrics",
    )
    seed: int = option(
        0,
        "seed of UMAP/t-SNE/PCA, k-means, organ sampling and (without --init-seed) the random-init encoder",
        group="run",
    )
    init_seed: int | None = option(
        None,
        "seed of the random-init control's weights (default: --seed), so several untrained encoders can be "
        "scored on the same patches",
        group="run",
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
        if self.test_slab and len(self.test_slab) != 2:
            raise DagmanInputError(
                f"test_slab takes two numbers (z low and high in mm), got {len(self.test_slab)}"
            )
        if self.sampling not in ("grid", "auto") and self.pooling == "token":
            raise DagmanInputError("token pooling works on the token grid only; use --sampling grid")

    def resolved(self, spacing_mm: float, has_labels: bool) -> EmbedConfig:
        """Patch and stride in voxels of a grid of ``spacing_mm`` (from ``patch_mm``/``stride_mm`` when given) and
        the sampling that "auto" means with or without a label map (token pooling keeps the grid)."""
        changes: dict[str, Any] = {}
        if self.patch_mm is not None:
            changes["patch"] = max(1, int(round(self.patch_mm / spacing_mm)))
        if self.stride_mm is not None:
            changes["stride"] = max(1, int(round(self.stride_mm / spacing_mm)))
        if self.sampling == "auto":
            changes["sampling"] = "both" if has_labels and self.pooling != "token" else "grid"
        return self.replace(**changes) if changes else self


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning and prediction (segmentation)
# ---------------------------------------------------------------------------------------------------------
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
        maximum=1024,
        group="data",
    )
    spacing: float | None = option(
        None,
        "isotropic spacing in mm (default: the run's; 2.0 from scratch)",
        minimum=0.05,
        maximum=50.0,
        group="data",
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
    train_pieces: int = option(
        0,
        "label budget: train on k labelled pieces only (0 = all): k of the training cases with a cases split, "
        "k of the --train-slabs slabs of each volume's labelled training slices with a slab split; drawn by "
        "--seed and nested (the pieces of k are among those of any larger k); validation is unchanged",
        minimum=0,
        group="data",
    )
    train_slabs: int = option(
        4,
        "slab split with --train-pieces: equal axial slabs that the training slices holding the chosen organs "
        "of each volume are cut into",
        minimum=1,
        group="data",
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


#: How predicted class scores go back onto the input's grid: resampled probabilities, or the model grid's arg-max
#: (`core.segmentation.pipeline` says what each costs and gives).
INVERSE_MODES: tuple[str, ...] = ("probabilities", "labels")


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
        maximum=1024,
        group="inference",
    )
    overlap: float = option(0.5, "sliding-window overlap", minimum=0.0, maximum=0.95, group="inference")
    sw_batch_size: int = option(4, "windows per forward pass", minimum=1, group="inference")
    inverse: str = option(
        "probabilities",
        "how class scores go back onto the input's grid: probabilities (resampled linearly, arg-max on the input "
        "grid: smooth borders) or labels (arg-max on the model's grid, resampled nearest: an exported bundle's "
        "default); both stream slabs, so memory does not grow with the class count",
        choices=INVERSE_MODES,
        group="inference",
    )
    hd95: bool = option(
        True, "also compute the 95% Hausdorff distance when a reference is given", group="inference"
    )
    resample_reference: bool = option(
        False,
        "resample a reference on another grid onto the image (nearest neighbour) instead of refusing it",
        group="inference",
    )
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", group="run")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", minimum=1, group="run")

    def validate(self) -> None:
        super().validate()
        if self.roi is not None and self.roi % 32:
            raise DagmanInputError(f"roi must be a multiple of 32, got {self.roi}")


# ---------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DemoConfig(ConfigBase):
    """Every capability in one headless run on the phantom (or the user's CT), with a report."""

    kind: ClassVar[str] = "demo"

    image: str | None = option(
        None, "a CT file or DICOM folder instead of the built-in phantom", group="data"
    )
    labels: str | None = option(None, "the CT's label map (organ metrics, fine-tuning)", group="data")
    out: str | None = option(None, "report folder", cli=False, group="run")
    quick: bool = option(
        False, "minutes instead of a quarter of an hour: fewer steps, smaller crops, PCA", group="run"
    )
    method: str = option("dagman", "self-supervised method to pretrain", choices=_method_names, group="run")
    steps: int | None = option(
        None, "pretraining steps (default 300; 30 with --quick)", minimum=1, group="run"
    )
    finetune_steps: int | None = option(
        None, "fine-tuning steps (default 150; 10 with --quick)", minimum=1, group="run"
    )
    device: str = option("auto", DEVICE_HELP, group="run")
    seed: int = option(0, "random seed of every stage", group="run")

    def validate(self) -> None:
        super().validate()
        if self.labels and not self.image:
            raise DagmanInputError("--labels goes with --image (the phantom has its own)")
