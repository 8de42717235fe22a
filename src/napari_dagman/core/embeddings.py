"""Organ clusters: what a pretrained encoder says about a CT, patch by patch.

The steps are plain functions; `run_embedding` composes them for the CLI and the napari dock.

1. `embed_volume`: the CT is resampled to the run's spacing and HU window (`core.data.model_volume`, the
   encoder's own input), the encoder runs over it in overlapping windows of the run's ROI, and the chosen
   stage's feature map (averaged where windows overlap) is averaged over each patch (a ``patch``-voxel cube
   every ``stride`` voxels), or kept per token. With a label map every patch gets its majority label (its
   "organ") and the fraction of its voxels carrying that label (its "purity"); organ-centred sampling adds
   patches inside each organ so that small organs, which never fill a lattice patch, are represented.
   Controls are computed on exactly the same patches: an untrained encoder of the same architecture, the
   histogram of the encoder's input intensities, and the patch-centre coordinates.
2. `project`: UMAP (umap-learn, seeded; ``fast`` runs it in parallel without a fixed state), PCA or t-SNE.
3. `cluster_features`: k-means or HDBSCAN (scikit-learn).
4. `quality_metrics`: k-means NMI/ARI against the organs, silhouette of the organs, and k-NN accuracy
   cross-validated over axial slabs: a slab is tested against training patches kept at least a gap away, so
   overlapping neighbour patches never leak into the score.

Embeddings are cached on disk under a key made of the image hash, the checkpoint hash and every setting
that changes them, so reopening a result is instant. Everything here is Qt-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from napari_dagman.core.checkpoint import array_hash
from napari_dagman.core.config import EmbedConfig
from napari_dagman.core.data import PreparedVolume, model_volume
from napari_dagman.core.errors import CheckpointError, DagmanError, DagmanInputError
from napari_dagman.core.events import CancelToken, LogEvent, ProgressEvent
from napari_dagman.core.io import publish, resample_like, resample_to_spacing
from napari_dagman.core.labels import names_in, organ_colour
from napari_dagman.core.volume import Volume, require_same_grid, window_starts

if TYPE_CHECKING:
    import torch

    from napari_dagman.core.checkpoint import PretrainedEncoder

#: Bump when the meaning of cached embeddings changes (invalidates every cache entry).
CACHE_VERSION = 1
#: How a patch was placed (the table's ``sampling`` column): on the lattice, or centred inside an organ.
SAMPLING_NAMES: tuple[str, ...] = ("grid", "organ")


# ---------------------------------------------------------------------------------------------------------
# The result of step 1
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PatchEmbeddings:
    """One feature vector per patch, with where the patch lies and (given labels) which organ it shows.

    Patches are boxes of ``patch`` voxels of the model grid (the image resampled to the run's spacing)
    starting at ``starts``; ``model_*`` is that grid's geometry and ``source_geometry`` the geometry of the
    image the user gave, so patch centres are known in physical (LPS mm) and in source-voxel coordinates.
    """

    features: np.ndarray  # (N, C) float32
    starts: np.ndarray  # (N, 3) int64, first voxel of each patch in the model grid (z, y, x)
    patch: tuple[int, int, int]  # patch side per axis, model voxels
    sampled: np.ndarray  # (N,) uint8 index into SAMPLING_NAMES
    model_spacing: tuple[float, float, float]
    model_origin: tuple[float, float, float]
    model_direction: np.ndarray
    source_geometry: dict[str, Any]
    organ_id: np.ndarray | None = None  # (N,) int64 majority label (0 = background)
    purity: np.ndarray | None = None  # (N,) float32 fraction of the patch carrying that label
    organ_names: dict[int, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def patch_mm(self) -> np.ndarray:
        """Patch side per axis in mm (z, y, x)."""
        return np.asarray(self.patch, float) * np.asarray(self.model_spacing)

    @property
    def has_labels(self) -> bool:
        return self.organ_id is not None

    def centres_model(self) -> np.ndarray:
        """Patch centres as fractional model-grid indices (N, 3)."""
        return self.starts + (np.asarray(self.patch, float) - 1.0) / 2.0

    def model_grid(self) -> Volume:
        """The model grid's geometry (for `Volume.index_to_physical`; its array is a stand-in)."""
        return _geometry_only(self.model_spacing, self.model_origin, self.model_direction)

    def source_grid(self) -> Volume:
        """The source image's geometry (for `Volume.physical_to_index`; its array is a stand-in)."""
        g = self.source_geometry
        return _geometry_only(g["spacing"], g["origin"], g["direction"])

    def centres_mm(self) -> np.ndarray:
        """Patch centres in physical LPS millimetres, z-y-x (N, 3)."""
        return self.model_grid().index_to_physical(self.centres_model())

    def centres_index(self) -> np.ndarray:
        """Patch centres as fractional voxel indices of the source image, z-y-x (N, 3)."""
        return self.source_grid().physical_to_index(self.centres_mm())

    def organ_labels(self) -> list[str]:
        """Organ name of every patch ("background" for label 0)."""
        if self.organ_id is None:
            return []
        names = {0: "background", **self.organ_names}
        return [names.get(int(i), f"label_{int(i)}") for i in self.organ_id]


def _geometry_only(spacing: Sequence[float], origin: Sequence[float], direction: Any) -> Volume:
    return Volume(np.zeros((1, 1, 1), np.uint8), tuple(spacing), tuple(origin), np.asarray(direction, float))


# ---------------------------------------------------------------------------------------------------------
# Patch geometry and per-patch counting
# ---------------------------------------------------------------------------------------------------------
def axis_sizes(value: int, dims: int, spacing: Sequence[float]) -> tuple[int, int, int]:
    """A length in voxels per axis: a cube in 3D; for 2D (slice) models the z side covers about as many mm."""
    if dims == 3:
        return (int(value),) * 3  # type: ignore[return-value]
    z = max(1, int(round(value * float(spacing[1]) / float(spacing[0]))))
    return (z, int(value), int(value))


def grid_starts(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Start index of every whole patch of a lattice (N, 3), z-major order."""
    axes = [np.arange(0, int(n) - int(p) + 1, int(s)) for n, p, s in zip(shape, patch, stride, strict=True)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack(mesh, axis=-1).reshape(-1, 3).astype(np.int64)


def _box_sums(integral: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sums over boxes [lo, hi) from an integral image padded with one leading zero plane per axis."""
    a0, a1, a2 = lo.T
    b0, b1, b2 = hi.T
    ii = integral
    return (
        ii[b0, b1, b2]
        - ii[a0, b1, b2]
        - ii[b0, a1, b2]
        - ii[b0, b1, a2]
        + ii[a0, a1, b2]
        + ii[a0, b1, a2]
        + ii[b0, a1, a2]
        - ii[a0, a1, a2]
    )


def box_counts(
    categories: np.ndarray, starts: np.ndarray, size: Sequence[int], top: int | None = None
) -> np.ndarray:
    """Voxel count of each value 0..M of a non-negative integer volume inside each box (N, M + 1).

    M is ``top`` when given (values absent from the volume still get their column), else the largest value.

    One integral image per value, restricted to the value's bounding box (organs are small next to a
    volume), so any number of patches, overlapping or not, costs a few passes over the voxels.
    """
    from scipy import ndimage

    categories = np.asarray(categories)
    if categories.dtype.kind not in "ui":
        raise DagmanInputError(f"expected an integer label map, got {categories.dtype}")
    size = np.asarray(size, np.int64)
    starts = np.asarray(starts, np.int64).reshape(-1, 3)
    stops = starts + size
    if top is None:
        top = int(categories.max()) if categories.size else 0
    counts = np.zeros((len(starts), top + 1), np.int64)
    for value, box in enumerate(ndimage.find_objects(categories), start=1):
        if box is None:
            continue
        lo = np.array([s.start for s in box])
        hi = np.array([s.stop for s in box])
        mask = categories[box] == value
        integral = np.zeros(tuple(hi - lo + 1), np.int64)
        integral[1:, 1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1).cumsum(2)
        extent = hi - lo
        counts[:, value] = _box_sums(
            integral, np.clip(starts - lo, 0, extent), np.clip(stops - lo, 0, extent)
        )
    counts[:, 0] = int(np.prod(size)) - counts[:, 1:].sum(axis=1)
    return counts


def patch_organs(
    labels: np.ndarray, starts: np.ndarray, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Majority label (0 = background wins ties) and its voxel fraction ("purity") of each patch."""
    counts = box_counts(labels, starts, size)
    organ = counts.argmax(axis=1)
    purity = counts[np.arange(len(counts)), organ] / float(np.prod(size))
    return organ.astype(np.int64), purity.astype(np.float32)


def organ_centred_starts(
    labels: np.ndarray,
    patch: Sequence[int],
    per_organ: int,
    seed: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Starts of up to ``per_organ`` patches centred on voxels deep inside each organ (N, 3).

    Centres are drawn (seeded) among the voxels at least half as deep as the organ's deepest voxel, so a
    large organ gives patches that it mostly fills and a small organ still gets patches centred on it.
    """
    from scipy import ndimage

    rng = np.random.default_rng([seed, 4099])
    shape = np.asarray(labels.shape)
    half = np.asarray(patch) // 2
    out = []
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = np.pad(labels[box] == value, 1)
        depth = ndimage.distance_transform_edt(mask, sampling=spacing)[1:-1, 1:-1, 1:-1]
        inner = np.argwhere(depth >= 0.5 * depth.max())
        pick = rng.choice(len(inner), size=min(per_organ, len(inner)), replace=False)
        centres = inner[np.sort(pick)] + np.array([s.start for s in box])
        out.append(np.clip(centres - half, 0, np.maximum(shape - np.asarray(patch), 0)))
    if not out:
        return np.zeros((0, 3), np.int64)
    return np.concatenate(out).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Encoder features over a whole volume
# ---------------------------------------------------------------------------------------------------------
def stage_feature_map(
    encoder: Any,
    array: np.ndarray,
    *,
    stage: int,
    roi: int,
    overlap: float,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, tuple[np.ndarray, tuple[int, int, int]] | None]:
    """Sliding-window feature map of one encoder stage over a model volume; None when cancelled.

    Returns ``(features, factor)``: features (C, *grid) on the stage's token grid (averaged where windows
    overlap) and the voxels per token along z, y, x. Windows step by a multiple of the token size so their
    token grids line up; the volume is padded with air (0) at its far end. 2D models run on every slice.
    """
    import torch

    from napari_dagman.core.models.encoder import set_fused_window_attention

    arch = encoder.arch
    token = arch.stage_stride(stage)
    step = max(token, int(round(roi * (1.0 - overlap) / token)) * token)
    plane = (0, 1, 2) if arch.dims == 3 else (1, 2)
    starts = {a: window_starts(array.shape[a], roi, step) for a in plane}
    padded_shape = list(array.shape)
    for axis in plane:
        padded_shape[axis] = max(roi, starts[axis][-1] + roi)
    padded = np.zeros(padded_shape, np.float32)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    factor = (token, token, token) if arch.dims == 3 else (1, token, token)
    grid = tuple(s // f for s, f in zip(padded_shape, factor, strict=True))

    if arch.dims == 3:
        windows = [(None, (z, y, x)) for z in starts[0] for y in starts[1] for x in starts[2]]
    else:
        windows = [(z, (y, x)) for z in range(array.shape[0]) for y in starts[1] for x in starts[2]]
    acc = np.zeros((arch.stage_channels(stage), *grid), np.float32)
    count = np.zeros(grid, np.float32)
    encoder = encoder.to(device).eval()
    set_fused_window_attention(encoder, True)  # inference only: about twice as fast, equal up to rounding
    total = len(windows)
    for first in range(0, total, batch_size):
        if cancel is not None and cancel.cancelled:
            return None
        chunk = windows[first : first + batch_size]
        crops = []
        for z, corner in chunk:
            region = tuple(slice(c, c + roi) for c in corner)
            crops.append(padded[region] if z is None else padded[z][region])
        batch = torch.from_numpy(np.stack(crops)[:, None]).to(device)
        with torch.inference_mode():
            feats = encoder(batch, class_attention=False).stages[stage].float().cpu().numpy()
        for (z, corner), feat in zip(chunk, feats, strict=True):
            cells = tuple(
                slice(c // token, c // token + n) for c, n in zip(corner, feat.shape[1:], strict=True)
            )
            target = cells if z is None else (slice(z, z + 1), *cells)
            acc[(slice(None), *target)] += feat if z is None else feat[:, None]
            count[target] += 1
        yield ProgressEvent(min(first + batch_size, total), total, "encoder features")
    return acc / np.maximum(count, 1), factor  # type: ignore[return-value]


def _axis_weights(start: int, size: int, factor: int) -> tuple[slice, np.ndarray]:
    """Tokens overlapping voxels [start, start+size) of one axis and the fraction of the patch each covers."""
    first, last = start // factor, -(-(start + size) // factor)
    cells = np.arange(first, last)
    covered = np.minimum((cells + 1) * factor, start + size) - np.maximum(cells * factor, start)
    return slice(first, last), covered / float(size)


def pool_patches(
    feature_map: np.ndarray, factor: Sequence[int], starts: np.ndarray, patch: Sequence[int]
) -> np.ndarray:
    """Mean of a token feature map (C, *grid) over each patch, weighting tokens by how much of it they cover."""
    out = np.empty((len(starts), feature_map.shape[0]), np.float32)
    for i, start in enumerate(starts):
        (sz, wz), (sy, wy), (sx, wx) = (
            _axis_weights(int(s), int(p), int(f)) for s, p, f in zip(start, patch, factor, strict=True)
        )
        out[i] = np.einsum("czyx,z,y,x->c", feature_map[:, sz, sy, sx], wz, wy, wx)
    return out


def random_init_encoder(arch: Any, seed: int) -> Any:
    """An untrained `SwinEncoder` of ``arch``, initialised from ``seed`` (the random-init control)."""
    import torch

    from napari_dagman.core.models.encoder import SwinEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SwinEncoder(arch).eval()


# ---------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def default_cache_dir() -> Path:
    """``$NAPARI_DAGMAN_CACHE``, else ``$XDG_CACHE_HOME/napari-dagman/embeddings`` (``~/.cache`` by default)."""
    if os.environ.get("NAPARI_DAGMAN_CACHE"):
        return Path(os.environ["NAPARI_DAGMAN_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "napari-dagman" / "embeddings"


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class EmbeddingCache:
    """Embeddings and projections on disk: ``<key>.npz`` + ``<key>.json``, written atomically, no pickle."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def _write_npz(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            publish(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def save(self, emb: PatchEmbeddings) -> None:
        from napari_dagman.core.io import atomic_write_text

        arrays = {"features": emb.features, "starts": emb.starts, "sampled": emb.sampled}
        if emb.organ_id is not None and emb.purity is not None:
            arrays.update(organ_id=emb.organ_id, purity=emb.purity)
        meta = {
            "version": CACHE_VERSION,
            "patch": list(emb.patch),
            "model_spacing": list(emb.model_spacing),
            "model_origin": list(emb.model_origin),
            "model_direction": np.asarray(emb.model_direction).tolist(),
            "source_geometry": emb.source_geometry,
            "organ_names": {str(k): v for k, v in emb.organ_names.items()},
            "settings": emb.settings,
        }
        # arrays first: a json without its npz is never taken for a hit
        self._write_npz(self.root / f"{emb.key}.npz", arrays)
        atomic_write_text(self.root / f"{emb.key}.json", json.dumps(meta, indent=1, default=str))

    def load(self, key: str) -> PatchEmbeddings | None:
        """The cached embeddings of ``key``, or None (missing, unreadable or from another version)."""
        npz, meta_path = self.root / f"{key}.npz", self.root / f"{key}.json"
        if not (npz.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("version") != CACHE_VERSION:
                return None
            with np.load(npz, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            return PatchEmbeddings(
                features=arrays["features"],
                starts=arrays["starts"],
                patch=tuple(meta["patch"]),
                sampled=arrays["sampled"],
                model_spacing=tuple(meta["model_spacing"]),
                model_origin=tuple(meta["model_origin"]),
                model_direction=np.asarray(meta["model_direction"]),
                source_geometry=meta["source_geometry"],
                organ_id=arrays.get("organ_id"),
                purity=arrays.get("purity"),
                organ_names={int(k): v for k, v in meta["organ_names"].items()},
                settings=meta["settings"],
                key=key,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged entry is recomputed, never trusted

    def load_array(self, key: str) -> np.ndarray | None:
        path = self.root / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["array"]
        except (OSError, ValueError, KeyError):
            return None

    def save_array(self, key: str, array: np.ndarray) -> None:
        self._write_npz(self.root / f"{key}.npz", {"array": np.asarray(array)})


#: Settings that change the embeddings (anything else - device, batch size - does not).
_FEATURE_SETTINGS = (
    "features",
    "stage",
    "pooling",
    "patch",
    "stride",
    "sampling",
    "per_organ",
    "overlap",
    "hist_bins",
    "resample_labels",
)


def embedding_key(
    config: EmbedConfig, volume: Volume, labels: Volume | None, pretrained: PretrainedEncoder
) -> str:
    """Cache key: image and label hashes with their geometry, checkpoint hash and the feature settings."""
    parts: dict[str, Any] = {
        "version": CACHE_VERSION,
        "image": array_hash(volume.array),
        "geometry": volume.geometry(),
        "labels": None if labels is None else [array_hash(labels.array), labels.geometry()],
        "settings": {name: getattr(config, name) for name in _FEATURE_SETTINGS},
        "run": {
            "spacing": pretrained.spacing,
            "hu_range": list(pretrained.hu_range),
            "roi": pretrained.roi,
            "arch": pretrained.arch.to_dict(),
        },
    }
    if config.features == "encoder":
        parts["checkpoint"] = [file_hash(pretrained.source), pretrained.which]
    if config.features == "random-init" or config.sampling != "grid":
        parts["seed"] = config.seed
    return _key(parts)


# ---------------------------------------------------------------------------------------------------------
# Step 1: embeddings of a volume
# ---------------------------------------------------------------------------------------------------------
def load_encoder(config: EmbedConfig) -> PretrainedEncoder:
    """The run's encoder named in ``config.checkpoint``, with a message that says what is wrong otherwise."""
    from napari_dagman.core.checkpoint import load_pretrained_encoder

    if not config.checkpoint:
        raise DagmanInputError(
            "no run folder given: choose a pretraining run (its encoder describes the patches)"
        )
    try:
        return load_pretrained_encoder(config.checkpoint, config.which, weights=config.weights)
    except CheckpointError as err:
        raise CheckpointError(f"cannot use {config.checkpoint} as an encoder: {err}") from None


def _labels_on_model_grid(
    labels: Volume, volume: Volume, pv: PreparedVolume, resample: bool
) -> tuple[np.ndarray, dict[int, str]]:
    if not volume.same_grid(labels):
        if not resample:
            require_same_grid(volume, labels)
        labels = resample_like(labels, volume, is_label=True)
    array = np.asarray(labels.array)
    if array.dtype.kind not in "ui" or (array.size and array.min() < 0):
        raise DagmanInputError(f"the label map must hold non-negative integers, got {array.dtype}")
    names = names_in(array, labels.metadata.get("label_names"))
    on_model = resample_to_spacing(labels, pv.spacing, is_label=True)
    if on_model.shape != pv.array.shape or not np.allclose(on_model.origin, pv.origin, atol=1e-3):
        raise DagmanError("internal error: the label map and the image resampled to different grids")
    return np.asarray(on_model.array), names


def embed_volume(
    volume: Volume,
    pretrained: PretrainedEncoder,
    config: EmbedConfig,
    *,
    labels: Volume | None = None,
    cache: EmbeddingCache | None = None,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent | LogEvent, None, PatchEmbeddings | None]:
    """Patch (or token) features of a whole volume; yields progress, returns `PatchEmbeddings` (None if cancelled).

    ``config.features`` picks the run's encoder or a control computed on the same patches. ``labels`` must be on
    the image grid (or ``config.resample_labels`` set). Raises `DagmanInputError` for a volume smaller than one
    patch, labels on another grid and organ sampling without labels.
    """
    from napari_dagman.core.devices import resolve_device

    if config.sampling != "grid" and labels is None:
        raise DagmanInputError(f"sampling '{config.sampling}' places patches inside organs: give a label map")
    key = embedding_key(config, volume, labels, pretrained) if cache is not None else ""
    if cache is not None:
        hit = cache.load(key)
        if hit is not None:
            yield LogEvent(f"embeddings loaded from the cache ({len(hit)} patches)")
            return hit

    arch = pretrained.arch
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    label_array, names = (None, {})
    if labels is not None:
        label_array, names = _labels_on_model_grid(labels, volume, pv, config.resample_labels)

    use_tokens = config.pooling == "token"
    token = arch.stage_stride(config.stage)
    factor = (token,) * 3 if arch.dims == 3 else (1, token, token)
    patch = factor if use_tokens else axis_sizes(config.patch, arch.dims, pv.spacing)
    stride = factor if use_tokens else axis_sizes(config.stride, arch.dims, pv.spacing)
    shape = pv.array.shape
    if any(s < p for s, p in zip(shape, patch, strict=True)):
        size_mm = " x ".join(f"{s * sp:.0f}" for s, sp in zip(shape, pv.spacing, strict=True))
        raise DagmanInputError(
            f"the image is {' x '.join(map(str, shape))} voxels ({size_mm} mm) at the run's spacing, smaller "
            f"than one patch of {' x '.join(map(str, patch))} voxels; use a smaller patch"
        )

    starts = (
        grid_starts(shape, patch, stride) if config.sampling in ("grid", "both") else np.zeros((0, 3), int)
    )
    sampled = np.zeros(len(starts), np.uint8)
    if config.sampling in ("organs", "both") and label_array is not None:
        organ_starts = organ_centred_starts(label_array, patch, config.per_organ, config.seed, pv.spacing)
        starts = np.concatenate([starts, organ_starts]).astype(np.int64)
        sampled = np.concatenate([sampled, np.ones(len(organ_starts), np.uint8)])
    if len(starts) == 0:
        raise DagmanInputError("no patch to embed: the label map holds no organ to sample")
    if not use_tokens and config.features in ("encoder", "random-init") and min(patch[1:]) < token:
        yield LogEvent(
            f"patches of {config.patch} voxels are smaller than stage {config.stage}'s tokens ({token} voxels): "
            "patches inside one token get the same features; use a shallower stage or larger patches",
            "warning",
        )

    if config.features in ("encoder", "random-init"):
        encoder = (
            pretrained.encoder if config.features == "encoder" else random_init_encoder(arch, config.seed)
        )
        result = yield from stage_feature_map(
            encoder,
            pv.array,
            stage=config.stage,
            roi=pretrained.roi,
            overlap=config.overlap,
            batch_size=config.batch_size,
            device=resolve_device(config.device),
            cancel=cancel,
        )
        if result is None:
            return None
        fmap, _ = result
        if use_tokens:
            n = [s // f for s, f in zip(shape, factor, strict=True)]
            features = fmap[:, : n[0], : n[1], : n[2]].reshape(fmap.shape[0], -1).T
        else:
            features = pool_patches(fmap, factor, starts, patch)
    elif config.features == "intensity":
        # the histogram of exactly what the encoder sees: the run's HU window scaled to [0, 1]
        bins = np.minimum((pv.array * config.hist_bins).astype(np.int64), config.hist_bins - 1) + 1
        counts = box_counts(bins, starts, patch, top=config.hist_bins)
        features = counts[:, 1:] / float(np.prod(patch))
    else:  # position
        centres = starts + (np.asarray(patch, float) - 1.0) / 2.0
        features = pv.index_to_physical(centres)

    emb = PatchEmbeddings(
        features=np.ascontiguousarray(features, dtype=np.float32),
        starts=starts,
        patch=tuple(int(p) for p in patch),  # type: ignore[arg-type]
        sampled=sampled,
        model_spacing=tuple(pv.spacing),
        model_origin=tuple(pv.origin),
        model_direction=np.asarray(pv.direction),
        source_geometry=volume.geometry(),
        organ_names=names,
        settings={
            **{name: getattr(config, name) for name in _FEATURE_SETTINGS},
            "checkpoint": pretrained.source,
            "which": pretrained.which,
            "method": pretrained.method,
            "run_spacing": pretrained.spacing,
            "hu_range": list(pretrained.hu_range),
            "roi": pretrained.roi,
            "seed": config.seed,
        },
        key=key,
    )
    if label_array is not None:
        emb.organ_id, emb.purity = patch_organs(label_array, starts, patch)
    if cache is not None:
        cache.save(emb)
    return emb


# ---------------------------------------------------------------------------------------------------------
# Steps 2-4: projection, clusters, quality
# ---------------------------------------------------------------------------------------------------------
def standardise(features: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature (constant features stay 0), so every control is scaled alike."""
    x = np.asarray(features, np.float64)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _reduced(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """PCA to ``dims`` components before UMAP / t-SNE / HDBSCAN on wide features (faster, less noise)."""
    if x.shape[1] <= dims or x.shape[0] <= dims:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=dims, random_state=seed).fit_transform(x)


def project(
    features: np.ndarray,
    method: str = "umap",
    *,
    seed: int = 0,
    fast: bool = False,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    perplexity: float = 30.0,
) -> np.ndarray:
    """2D projection (N, 2) float32 of standardised features with UMAP, PCA or t-SNE.

    UMAP is seeded (single-threaded, reproducible) unless ``fast``: then it runs on all cores and two runs
    differ. Wide features are reduced to 50 principal components first.
    """
    x = standardise(features)
    n = x.shape[0]
    if n < 3:
        raise DagmanInputError(f"a projection needs at least 3 patches, got {n}")
    if method == "pca":
        from sklearn.decomposition import PCA

        out = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
        if out.shape[1] < 2:
            out = np.concatenate([out, np.zeros((n, 1))], axis=1)
    elif method == "umap":
        import umap

        with warnings.catch_warnings():
            # umap warns that a fixed random_state disables parallelism: that is the point of not being fast
            warnings.filterwarnings("ignore", message=".*n_jobs.*")
            warnings.filterwarnings("ignore", category=UserWarning, module="umap")
            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=max(2, min(n_neighbors, n - 1)),
                min_dist=min_dist,
                random_state=None if fast else seed,
                n_jobs=-1 if fast else 1,
            )
            out = reducer.fit_transform(_reduced(x, 50, seed))
    elif method == "tsne":
        from sklearn.manifold import TSNE

        out = TSNE(
            n_components=2, perplexity=min(perplexity, (n - 1) / 3.0), init="pca", random_state=seed
        ).fit_transform(_reduced(x, 50, seed))
    else:
        raise DagmanInputError(f"unknown projection '{method}'; use umap, pca or tsne")
    return np.asarray(out, np.float32)


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded k-means labels, with no more clusters than distinct rows (air patches share one vector)."""
    from sklearn.cluster import KMeans

    k = max(1, min(int(k), len(np.unique(x, axis=0))))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)


def cluster_features(
    features: np.ndarray, method: str = "kmeans", *, k: int = 8, seed: int = 0, min_cluster_size: int = 10
) -> np.ndarray:
    """Cluster id per row (HDBSCAN marks noise -1) of standardised features."""
    x = standardise(features)
    n = x.shape[0]
    if method == "kmeans":
        return _kmeans(x, k, seed)
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        size = max(2, min(int(min_cluster_size), n))
        return HDBSCAN(min_cluster_size=size, copy=True).fit_predict(_reduced(x, 20, seed)).astype(np.int64)
    raise DagmanInputError(f"unknown clustering '{method}'; use kmeans or hdbscan")


@dataclass
class Quality:
    """Cluster quality against the organs: the figures, and per patch its role in the evaluation."""

    metrics: dict[str, Any]
    evaluated: np.ndarray  # (N,) bool: patch is in the evaluated set (organ, purity, enough patches)
    slab: np.ndarray  # (N,) int: k-NN test slab of the patch, -1 when not evaluated
    prediction: np.ndarray  # (N,) int: k-NN predicted organ id, -1 when not scored


def slab_splits(
    z: np.ndarray, slabs: int, gap: float
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Blocked cross-validation along z: the slab of each centre and, per slab, its (test, train) masks.

    Slabs are equal-thickness axial bands over the centres' range; a slab is tested against the centres
    lying more than ``gap`` mm outside it, so with ``gap`` >= the patch side no training patch shares a
    voxel with a test patch.
    """
    z = np.asarray(z, float)
    edges = np.linspace(float(z.min()), float(z.max()) + 1e-6, slabs + 1)
    fold = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, slabs - 1)
    splits = [(fold == f, (z < edges[f] - gap) | (z >= edges[f + 1] + gap)) for f in range(slabs)]
    return fold, splits


def quality_metrics(
    features: np.ndarray,
    organ_id: np.ndarray,
    purity: np.ndarray,
    centres_z: np.ndarray,
    *,
    patch_mm: float,
    organ_names: dict[int, str] | None = None,
    min_purity: float = 0.5,
    min_patches: int = 5,
    knn: int = 5,
    slabs: int = 5,
    gap_mm: float | None = None,
    distance: str = "cosine",
    seed: int = 0,
) -> Quality:
    """NMI, ARI, silhouette and slab-cross-validated k-NN accuracy of features against organ labels.

    Evaluated patches: majority organ (not background) covering at least ``min_purity`` of the patch, organs
    with at least ``min_patches`` such patches. Features are standardised over all patches (no label used).

    * NMI / ARI: k-means with as many clusters as organs (seeded) against the organs.
    * silhouette: of the organ labels in feature space (``distance``).
    * k-NN: the z range is cut into ``slabs`` equal axial slabs; each slab is tested with a k-NN classifier
      trained on the patches whose centres lie at least ``gap_mm`` (default: the patch side, so no voxel is
      shared) outside it. Reported with the balanced accuracy, the majority-class baseline of the same folds
      and how many test patches had no patch of their organ in training.
    """
    from sklearn.metrics import (
        adjusted_rand_score,
        balanced_accuracy_score,
        normalized_mutual_info_score,
        silhouette_score,
    )
    from sklearn.neighbors import KNeighborsClassifier

    n = len(organ_id)
    names = {0: "background", **(organ_names or {})}
    keep = (organ_id > 0) & (purity >= min_purity)
    ids, counts = np.unique(organ_id[keep], return_counts=True)
    kept_ids = ids[counts >= min_patches]
    keep &= np.isin(organ_id, kept_ids)
    slab = np.full(n, -1, np.int64)
    prediction = np.full(n, -1, np.int64)
    gap = float(patch_mm if gap_mm is None else gap_mm)
    settings = {
        "min_purity": min_purity,
        "min_patches": min_patches,
        "knn": knn,
        "slabs": slabs,
        "gap_mm": gap,
        "distance": distance,
        "seed": seed,
    }
    metrics: dict[str, Any] = {
        "evaluated_patches": int(keep.sum()),
        "organs": {names.get(int(i), str(i)): int((organ_id[keep] == i).sum()) for i in kept_ids},
        "settings": settings,
    }
    if len(kept_ids) < 2:
        metrics["note"] = (
            f"fewer than 2 organs with >= {min_patches} patches of purity >= {min_purity}: no metrics "
            "(use smaller patches, a smaller stride or organ sampling)"
        )
        return Quality(metrics, keep, slab, prediction)

    x = standardise(features)[keep]
    y = organ_id[keep]
    clusters = _kmeans(x, len(kept_ids), seed)
    metrics["nmi"] = float(normalized_mutual_info_score(y, clusters))
    metrics["ari"] = float(adjusted_rand_score(y, clusters))
    if len(y) > len(kept_ids):  # silhouette needs at least one organ with two patches
        metrics["silhouette"] = float(silhouette_score(x, y, metric=distance))

    z = np.asarray(centres_z, float)[keep]
    fold, splits = slab_splits(z, slabs, gap)
    pred = np.full(len(y), -1, np.int64)
    baseline = np.full(len(y), -1, np.int64)
    unseen = 0
    for test, train in splits:
        if not test.any() or not train.any():
            continue
        model = KNeighborsClassifier(
            n_neighbors=min(knn, int(train.sum())), metric=distance, algorithm="brute"
        )
        model.fit(x[train], y[train])
        pred[test] = model.predict(x[test])
        values, freq = np.unique(y[train], return_counts=True)
        baseline[test] = values[np.argmax(freq)]
        unseen += int((~np.isin(y[test], y[train])).sum())
    scored = pred >= 0
    index = np.flatnonzero(keep)
    slab[index] = fold
    prediction[index] = pred
    metrics["knn_scored"] = int(scored.sum())
    if scored.any():
        metrics["knn_accuracy"] = float(np.mean(pred[scored] == y[scored]))
        metrics["knn_balanced_accuracy"] = float(balanced_accuracy_score(y[scored], pred[scored]))
        metrics["knn_majority_baseline"] = float(np.mean(baseline[scored] == y[scored]))
        metrics["knn_unseen_organ"] = unseen
    else:
        metrics["note"] = "no slab had training patches outside its gap: use more slabs or a smaller gap"
    return Quality(metrics, keep, slab, prediction)


# ---------------------------------------------------------------------------------------------------------
# Results: table, selection, the whole pipeline
# ---------------------------------------------------------------------------------------------------------
def build_table(
    emb: PatchEmbeddings,
    projection: np.ndarray | None = None,
    method: str = "umap",
    clusters: np.ndarray | None = None,
    quality: Quality | None = None,
) -> pd.DataFrame:
    """One row per patch: id, sampling, centre (mm and source voxel), organ, purity, projection, cluster."""
    mm = emb.centres_mm()
    index = emb.centres_index()
    table: dict[str, Any] = {
        "patch_id": np.arange(len(emb)),
        "sampling": pd.Categorical(np.asarray(SAMPLING_NAMES)[emb.sampled], categories=list(SAMPLING_NAMES)),
        # physical LPS: x = right-to-left, y = anterior-to-posterior, z = inferior-to-superior
        "x_mm": mm[:, 2],
        "y_mm": mm[:, 1],
        "z_mm": mm[:, 0],
        "x_index": index[:, 2],
        "y_index": index[:, 1],
        "z_index": index[:, 0],
    }
    if emb.organ_id is not None and emb.purity is not None:
        table["organ_id"] = emb.organ_id
        table["organ"] = emb.organ_labels()
        table["purity"] = emb.purity
    if projection is not None:
        table[f"{method}_0"] = projection[:, 0]
        table[f"{method}_1"] = projection[:, 1]
    if clusters is not None:
        table["cluster"] = clusters
    if quality is not None:
        names = {0: "background", -1: "", **emb.organ_names}
        table["evaluated"] = quality.evaluated
        table["slab"] = quality.slab
        table["knn_organ"] = [names.get(int(i), str(i)) for i in quality.prediction]
    return pd.DataFrame(table)


def colour_groups(table: pd.DataFrame, by: str = "organ") -> list[tuple[str, tuple[float, ...], np.ndarray]]:
    """Legend entries ``(name, RGBA, row indices)`` of a patch table, largest group first.

    ``by="organ"`` uses the organ colours of the Labels layers (`core.labels.organ_colour`), background in
    translucent grey; ``by="cluster"`` uses matplotlib's tab20 cycle, HDBSCAN noise (-1) in grey.
    """
    import matplotlib

    if by not in table.columns:
        what = "a label map" if by == "organ" else "a clustering"
        raise DagmanInputError(f"the table has no '{by}' column: compute with {what} to colour by {by}")
    values = table[by].to_numpy()
    grey = (0.6, 0.6, 0.6, 0.45)
    tab20 = matplotlib.colormaps["tab20"]
    groups = []
    for value in pd.unique(values):
        rows = np.flatnonzero(values == value)
        if by == "organ":
            name = str(value)
            rgba = grey if name == "background" else organ_colour(name)
        else:
            name = "noise" if int(value) < 0 else f"cluster {int(value)}"
            rgba = grey if int(value) < 0 else tuple(tab20(int(value) % 20))
        groups.append((name, tuple(float(c) for c in rgba), rows))
    groups.sort(key=lambda g: (-len(g[2]), g[0]))
    return groups


def selection_mask(emb: PatchEmbeddings, ids: Sequence[int] | np.ndarray, value: int = 1) -> np.ndarray:
    """A label map on the source image grid where the chosen patches are ``value`` (uint8/uint16).

    A source voxel belongs to a patch when its centre lies inside the patch's physical box.
    """
    geometry = emb.source_geometry
    shape = tuple(int(s) for s in geometry["shape"])
    out = np.zeros(shape, np.uint8 if value < 256 else np.uint16)
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size == 0:
        return out
    corners_model = np.stack([emb.starts[ids] - 0.5, emb.starts[ids] + np.asarray(emb.patch) - 0.5])
    index = emb.source_grid().physical_to_index(
        emb.model_grid().index_to_physical(corners_model)
    )  # (2, n, 3)
    lo = np.clip(np.ceil(np.minimum(index[0], index[1]) - 1e-6), 0, shape).astype(int)
    hi = np.clip(np.ceil(np.maximum(index[0], index[1]) - 1e-6), 0, shape).astype(int)
    for a, b in zip(lo, hi, strict=True):
        out[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = value
    return out


@dataclass
class EmbeddingResult:
    """Everything the CLI writes and the dock shows."""

    embeddings: PatchEmbeddings
    projection: np.ndarray
    clusters: np.ndarray | None
    quality: Quality | None
    table: pd.DataFrame
    config: EmbedConfig

    @property
    def metrics(self) -> dict[str, Any] | None:
        return None if self.quality is None else self.quality.metrics


def analyse(
    emb: PatchEmbeddings, config: EmbedConfig, *, cache: EmbeddingCache | None = None
) -> Generator[LogEvent, None, EmbeddingResult]:
    """Projection, clusters and (with labels) quality metrics of embeddings; yields what it is doing."""
    yield LogEvent(f"projecting {len(emb)} patches with {config.method.upper()}")
    proj_key = ""
    projection = None
    if cache is not None and emb.key:
        proj_key = _key(
            {
                "embeddings": emb.key,
                "method": config.method,
                "seed": config.seed,
                "fast": config.fast,
                "umap": [config.n_neighbors, config.min_dist] if config.method == "umap" else None,
                "tsne": config.perplexity if config.method == "tsne" else None,
            }
        )
        projection = cache.load_array(proj_key)
        if projection is not None and len(projection) != len(emb):
            projection = None
    if projection is None:
        projection = project(
            emb.features,
            config.method,
            seed=config.seed,
            fast=config.fast,
            n_neighbors=config.n_neighbors,
            min_dist=config.min_dist,
            perplexity=config.perplexity,
        )
        if proj_key:
            cache.save_array(proj_key, projection)  # type: ignore[union-attr]

    quality = None
    if emb.organ_id is not None and emb.purity is not None:
        quality = quality_metrics(
            emb.features,
            emb.organ_id,
            emb.purity,
            emb.centres_mm()[:, 0],
            patch_mm=float(emb.patch_mm[0]),
            organ_names=emb.organ_names,
            min_purity=config.min_purity,
            min_patches=config.min_patches,
            knn=config.knn,
            slabs=config.slabs,
            gap_mm=config.gap_mm,
            distance=config.distance,
            seed=config.seed,
        )
        if "note" in quality.metrics:
            yield LogEvent(quality.metrics["note"], "warning")

    clusters = None
    if config.clustering != "none":
        yield LogEvent(f"clustering with {config.clustering}")
        k = config.clusters or (
            len(quality.metrics["organs"]) if quality and quality.metrics["organs"] else 8
        )
        clusters = cluster_features(
            emb.features,
            config.clustering,
            k=max(k, 2),
            seed=config.seed,
            min_cluster_size=config.min_cluster_size,
        )
    table = build_table(emb, projection, config.method, clusters, quality)
    return EmbeddingResult(emb, projection, clusters, quality, table, config)


def run_embedding(
    config: EmbedConfig,
    volume: Volume,
    labels: Volume | None = None,
    *,
    pretrained: PretrainedEncoder | None = None,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent | LogEvent, None, EmbeddingResult | None]:
    """Embeddings, projection, clusters and metrics of one volume; None when cancelled.

    ``pretrained`` defaults to the encoder of ``config.checkpoint``. The cache is used when ``config.cache``.
    """
    pretrained = pretrained or load_encoder(config)
    cache = EmbeddingCache(config.cache_dir) if config.cache else None
    emb = yield from embed_volume(volume, pretrained, config, labels=labels, cache=cache, cancel=cancel)
    if emb is None:
        return None
    if len(emb) < 3:
        raise DagmanInputError(f"only {len(emb)} patch(es) fit the image: use a smaller patch or stride")
    result = yield from analyse(emb, config, cache=cache)
    return result


def require_parquet() -> None:
    """Refuse Parquet early, with one line, when neither pyarrow nor fastparquet is installed."""
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
        raise DagmanInputError("Parquet needs pyarrow (pip install pyarrow); or write the table as CSV")


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> str:
    """Write a patch table as CSV, or as Parquet when ``path`` ends in ``.parquet``; return the path."""
    from napari_dagman.core.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        require_parquet()
        table.to_parquet(path, index=False)
    else:
        atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))
    return str(path)


def write_results(result: EmbeddingResult, out: str | os.PathLike) -> dict[str, str]:
    """Write the table (CSV or Parquet), ``metrics.json`` (with labels) and ``config.json``; return the paths."""
    from napari_dagman.core.io import atomic_write_text

    out = Path(out)
    config = result.config
    paths = {"table": write_table(result.table, out / f"patches.{config.table_format}")}
    if result.metrics is not None:
        atomic_write_text(out / "metrics.json", json.dumps(result.metrics, indent=2) + "\n")
        paths["metrics"] = str(out / "metrics.json")
    config.save(out / "config.json")
    paths["config"] = str(out / "config.json")
    return paths


def metrics_summary(metrics: dict[str, Any]) -> str:
    """The figures of `quality_metrics` in a few readable lines (CLI output, dock label)."""
    lines = [f"evaluated: {metrics['evaluated_patches']} patches of {len(metrics['organs'])} organs"]
    if "note" in metrics:
        lines.append(f"note: {metrics['note']}")
    figures = [
        (name, metrics[key])
        for name, key in (("NMI", "nmi"), ("ARI", "ari"), ("silhouette", "silhouette"))
        if key in metrics
    ]
    if figures:
        lines.append("k-means vs organs: " + "  ".join(f"{n} {v:.3f}" for n, v in figures))
    if "knn_accuracy" in metrics:
        s = metrics["settings"]
        lines.append(
            f"k-NN ({s['knn']}, {s['distance']}; {s['slabs']} axial slabs, gap {s['gap_mm']:g} mm): "
            f"accuracy {metrics['knn_accuracy']:.3f}, balanced {metrics['knn_balanced_accuracy']:.3f}, "
            f"majority baseline {metrics['knn_majority_baseline']:.3f} "
            f"({metrics['knn_scored']} scored, {metrics['knn_unseen_organ']} of an organ absent from training)"
        )
    return "\n".join(lines)
