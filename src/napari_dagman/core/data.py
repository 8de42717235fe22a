"""From `Volume`s to training views: resample, HU clip/scale, foreground crop, pad, paired random crops.

Pre-processing is deterministic and done once per volume (the in-memory cache); views are drawn per step
from a random generator seeded by (seed, step, rank), so the views of step ``k`` are the same in an
uninterrupted run and in one resumed at ``k`` (exact resume), and different on each DDP process.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from monai.transforms import CropForeground, SpatialPad

from napari_dagman.core.augment import Augmentation, augment_views, view_seed
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.hashing import array_hash
from napari_dagman.core.io import resample_to_spacing
from napari_dagman.core.resident_volumes import ResidentVolumes
from napari_dagman.core.volume import Volume, check_finite
from napari_dagman.core.windowing import normalize_hu

#: HU -> model intensities (one implementation, in `core.windowing`).
normalize = normalize_hu


@dataclass
class PreparedVolume:
    """A model-ready volume: float32 in [0, 1], with the physical geometry of its (cropped, padded) grid."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    name: str
    source_hash: str
    notes: list[str] = field(default_factory=list)

    def index_to_physical(self, index) -> np.ndarray:
        idx = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction.T


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array (`core.volume_cache`) from this process; touched again, they are read
    back from the operating system's file cache. A long run over many cached volumes then holds its crops in RAM,
    not every page it ever read. Nothing for an array in memory."""
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):  # closed, or refused: only memory is at stake
            handle.madvise(mmap.MADV_DONTNEED)


def model_volume(
    volume: Volume,
    *,
    dims: int,
    spacing: float | None,
    hu_range: tuple[float, float],
    name: str | None = None,
) -> PreparedVolume:
    """Resample to the model's spacing (3D isotropic, 2D in-plane) and scale HU to [0, 1]; no cropping.

    What inference (attention maps, embeddings, prediction) feeds a trained encoder.
    """
    name = name or str(volume.metadata.get("name", "volume"))
    check_finite(volume, name)
    source_hash = array_hash(volume.array)
    if spacing is not None:
        target = (spacing,) * 3 if dims == 3 else (volume.spacing[0], spacing, spacing)
        check_extent(volume, target, name)
        volume = resample_to_spacing(volume, target, is_label=False)
    return PreparedVolume(
        array=normalize_hu(volume.array, hu_range),
        spacing=tuple(float(s) for s in volume.spacing),
        origin=tuple(float(o) for o in volume.origin),
        direction=volume.direction.copy(),
        name=name,
        source_hash=source_hash,
        notes=[str(n) for n in volume.metadata.get("notes", [])],
    )


def check_informative(volume: Volume, name: str) -> None:
    """Refuse an empty or constant image for training: every voxel alike holds nothing to learn."""
    arr = volume.array
    if arr.size == 0:
        raise DagmanInputError(f"{name} holds no voxels")
    low, high = np.min(arr), np.max(arr)
    if low == high:
        raise DagmanInputError(
            f"{name}: every voxel has the value {float(low):g}; a constant image holds nothing to learn"
        )


def check_extent(volume: Volume, target: tuple[float, float, float], name: str) -> None:
    """Refuse an image smaller than one voxel of the model's grid along an axis it is resampled on.

    What a voxel size read wrongly (1e-4 mm instead of 1 mm) gives: the whole scan would become one voxel.
    """
    extent = np.asarray(volume.shape) * np.asarray(volume.spacing)
    resampled = ~np.isclose(np.asarray(target), np.asarray(volume.spacing))
    if np.any(resampled & (extent < np.asarray(target))):
        sizes = " x ".join(f"{e:.3g}" for e in extent)
        voxel = " x ".join(f"{s:.3g}" for s in volume.spacing)
        raise DagmanInputError(
            f"{name} spans only {sizes} mm (voxels of {voxel} mm), less than one {max(target):g} mm voxel of the "
            "model: is the voxel size in its header right?"
        )


def prepare_volume(
    volume: Volume,
    *,
    roi: int,
    dims: int,
    spacing: float | None,
    hu_range: tuple[float, float],
    name: str | None = None,
) -> PreparedVolume:
    """`model_volume`, then crop to the body and pad so that one ``roi`` crop fits (training input).

    Raises `DagmanInputError` for NaNs, constant volumes and volumes with nothing above ``hu_range[0]`` (all air).
    """
    check_informative(volume, name or str(volume.metadata.get("name", "volume")))
    pv = model_volume(volume, dims=dims, spacing=spacing, hu_range=hu_range, name=name)
    name, notes = pv.name, list(pv.notes)
    image = pv.array[None]  # MONAI wants channel first

    # crop to the body: voxels above the lower HU bound (air and the table padding are dropped)
    start, end = CropForeground(select_fn=lambda x: x > 0, margin=0, allow_smaller=True).compute_bounding_box(
        image
    )
    start, end = np.asarray(start, int), np.asarray(end, int)
    if np.any(end <= start):
        raise DagmanInputError(
            f"{name}: no voxel above {hu_range[0]:g} HU (all air, or not a CT in Hounsfield units)"
        )
    image = image[(slice(None), *(slice(s, e) for s, e in zip(start, end, strict=True)))]
    spacing_zyx = np.asarray(pv.spacing)
    origin = np.asarray(pv.origin) + (start * spacing_zyx) @ pv.direction.T

    # pad (constant 0 = air after scaling) so that a crop fits: 3D all axes, 2D in-plane only
    size = (roi, roi, roi) if dims == 3 else (-1, roi, roi)
    before_shape = image.shape[1:]
    pad = SpatialPad(spatial_size=size, mode="constant", value=0.0)
    widths = pad.compute_pad_width(image.shape[1:])[1:]
    if any(w[0] or w[1] for w in widths):
        image = np.asarray(pad(image))
        before = np.array([w[0] for w in widths])
        origin = origin - (before * spacing_zyx) @ pv.direction.T
        notes.append(
            f"{name}: body region {tuple(int(s) for s in before_shape)} voxels is smaller than the ROI {roi}; "
            f"padded to {tuple(image.shape[1:])} with air"
        )
    return PreparedVolume(
        array=np.ascontiguousarray(image[0], dtype=np.float32),
        spacing=pv.spacing,
        origin=tuple(float(o) for o in origin),
        direction=pv.direction,
        name=name,
        source_hash=pv.source_hash,
        notes=notes,
    )


def refine_volume(
    pv: PreparedVolume, source: Volume, factor: int, *, dims: int, hu_range: tuple[float, float]
) -> PreparedVolume:
    """The physical box of ``pv`` on a grid ``factor`` times finer (in-plane only in 2D), from ``source``.

    Voxel i of ``pv`` is split into ``factor`` sub-voxels per axis, so a crop starting at i starts at
    ``factor * i`` here (MIRAM's high-resolution target of the same region). Where the source is coarser than
    the new grid the values are interpolated; outside it, air.
    """
    from napari_dagman.core.io import resample_like

    f = np.array((factor,) * 3 if dims == 3 else (1, factor, factor), dtype=float)
    spacing = np.asarray(pv.spacing) / f
    # sub-voxel j of voxel i is centred at i + (j + 1/2) / f - 1/2: the first one sits (1/f - 1)/2 before i
    origin = np.asarray(pv.origin) + (((1.0 / f) - 1.0) / 2.0 * np.asarray(pv.spacing)) @ pv.direction.T
    shape = tuple(int(n * k) for n, k in zip(pv.array.shape, f, strict=True))
    grid = Volume(np.zeros(shape, np.uint8), tuple(spacing), tuple(origin), pv.direction.copy())
    air = min(float(hu_range[0]) - 1.0, -1024.0)
    hu = resample_like(source, grid, is_label=False, default=air).array
    return PreparedVolume(
        array=np.ascontiguousarray(normalize_hu(hu, hu_range), dtype=np.float32),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=pv.direction.copy(),
        name=pv.name,
        source_hash=pv.source_hash,
    )


def crop_around(
    pv: PreparedVolume, center: Sequence[float] | None, side: int, dims: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The ``side`` crop of a model volume around a physical point (default: the body's centre), clamped inside
    the volume (padded with air when the volume is smaller): (crop (z, y, x); 2D: (1, y, x), start index)."""
    shape = pv.array.shape
    need = (1, side, side) if dims == 2 else (side,) * 3
    pad = [(0, max(0, n - s)) for s, n in zip(shape, need, strict=True)]
    array = np.pad(pv.array, pad) if any(p[1] for p in pad) else pv.array
    if center is None:
        body = np.argwhere(pv.array > 0)
        index = body.mean(axis=0) if len(body) else np.asarray(shape) / 2
    else:
        offset = np.asarray(center, float) - np.asarray(pv.origin)
        index = (offset @ np.linalg.inv(pv.direction).T) / np.asarray(pv.spacing)
    start = []
    for axis, (size, c) in enumerate(zip(array.shape, index, strict=True)):
        if dims == 2 and axis == 0:
            start.append(int(np.clip(round(c), 0, size - 1)))
        else:
            start.append(int(np.clip(round(c - side / 2), 0, max(0, size - side))))
    region = tuple(slice(s, s + n) for s, n in zip(start, need, strict=True))
    return np.ascontiguousarray(array[region]), tuple(start)  # type: ignore[return-value]


@dataclass
class Crop:
    """Where a view was cut: volume index, start index (z, y, x) in the prepared array, 2D slice or None."""

    volume: int
    start: tuple[int, int, int]
    size: tuple[int, ...]


@dataclass
class ViewBatch:
    """One step's inputs: ``views`` (V*B, 1, *roi) - the B first views, then the B second views - with their
    crops and augmentation seeds, and ``local`` (L*B, 1, *local_roi) small crops of the same regions (the B first
    local crops, then the B second...) or None."""

    views: np.ndarray
    crops: list[Crop]
    seeds: list[int]
    local: np.ndarray | None = None
    local_crops: list[Crop] = field(default_factory=list)


class ViewSampler:
    """Draws ``batch`` samples per step: ``views`` crops (1 or 2) of the ROI from one region of one volume, and
    ``local_views`` smaller crops (``local_roi`` a side) of the same region (DINO/iBOT multi-crop).

    The region is ``region_scale`` x the ROI a side (clipped to the volume): 1 makes the two views the same crop,
    larger values let them overlap less. Each view and local crop is augmented with its own draw (`Augmentation`).
    A batch draws its samples from a fresh permutation of the volumes, so with several volumes a batch mixes them.
    ``roi`` is the crop side in voxels (a method reading a larger region asks for a larger one). With ``high_res``
    volumes (the same grids refined by ``high_res_factor``), `high_res_views` cuts the matching finer crops of the
    same physical regions with the same geometric and intensity draws (MIRAM's high-resolution target).
    """

    def __init__(
        self,
        volumes: list[PreparedVolume],
        *,
        roi: int,
        dims: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        region_scale: float = 1.25,
        views: int = 2,
        local_views: int = 0,
        local_roi: int = 0,
        augmentation: Augmentation | None = None,
        high_res: list[PreparedVolume] | None = None,
        high_res_factor: int = 1,
        resident: ResidentVolumes | None = None,
    ) -> None:
        if not volumes:
            raise DagmanInputError("no volumes to train on")
        if views not in (1, 2):
            raise DagmanInputError(f"a sample has one or two views, not {views}")
        if local_views and not 0 < local_roi <= roi:
            raise DagmanInputError(f"local crops of {local_roi} voxels do not fit views of {roi}")
        self.volumes, self.roi, self.dims = volumes, roi, dims
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.region = int(math.ceil(roi * max(1.0, region_scale)))
        self.views = views
        self.local_views, self.local_roi = local_views, local_roi
        self.augmentation = augmentation
        self.high_res, self.high_res_factor = high_res, high_res_factor
        #: with a bounded in-RAM set (`core.resident_volumes`), every sample is drawn from the volumes it holds
        self.resident = resident

    def volume_for(self, sample: int) -> int:
        """Volume of the ``sample``-th draw: a fresh permutation of the volumes every pass (epoch), or of the
        volumes held in RAM in the sample's round."""
        if self.resident is not None:
            return self.resident.volume_for(sample)
        n = len(self.volumes)
        epoch, within = divmod(sample, n)
        return int(np.random.default_rng([self.seed, 7919, epoch]).permutation(n)[within])

    def region_start(self, rng: np.random.Generator, shape: tuple[int, int, int]) -> list[int]:
        """Start of a sample's region (z, y, x); in 2D the slice is drawn and the region is in-plane."""
        if self.dims == 3:
            return [int(rng.integers(0, shape[a] - min(shape[a], self.region) + 1)) for a in range(3)]
        z = int(rng.integers(0, shape[0]))
        return [z] + [int(rng.integers(0, shape[a] - min(shape[a], self.region) + 1)) for a in (1, 2)]

    def in_region(
        self, rng: np.random.Generator, region: list[int], shape: tuple[int, int, int], side: int
    ) -> tuple[int, ...]:
        """A crop of ``side`` voxels at a random place inside the region (the slice kept in 2D)."""
        first = 0 if self.dims == 3 else 1
        start = [region[0]] if self.dims == 2 else []
        for axis in range(first, 3):
            room = min(shape[axis], self.region)
            start.append(region[axis] + int(rng.integers(0, room - side + 1)))
        return tuple(start)

    def pair(
        self, rng: np.random.Generator, shape: tuple[int, int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Two crop starts of the ROI inside one region."""
        region = self.region_start(rng, shape)
        return self.in_region(rng, region, shape, self.roi), self.in_region(rng, region, shape, self.roi)

    def array(self, volume: int, sample: int | None = None) -> np.ndarray:
        """A volume's array: the in-RAM copy when a resident set holds it for ``sample``'s round, else the
        (mapped) prepared array."""
        if self.resident is not None and sample is not None:
            return self.resident.array(volume, sample // self.resident.size)
        return self.volumes[volume].array

    def cut(
        self, volume: int, start: tuple[int, ...], side: int | None = None, sample: int | None = None
    ) -> np.ndarray:
        arr = self.array(volume, sample)
        n = self.roi if side is None else side
        z, y, x = start
        if self.dims == 3:
            return arr[z : z + n, y : y + n, x : x + n]
        return arr[z, y : y + n, x : x + n]

    def sample(self, step: int) -> ViewBatch:
        """The step's views, local crops and seeds (see `ViewBatch`); a pure function of (seed, step, rank)."""
        rng = np.random.default_rng([self.seed, step, self.rank])
        views: list[list[np.ndarray]] = [[] for _ in range(self.views)]
        crops: list[list[Crop]] = [[] for _ in range(self.views)]
        seeds: list[list[int]] = [[] for _ in range(self.views)]
        local: list[list[np.ndarray]] = [[] for _ in range(self.local_views)]
        local_crops: list[list[Crop]] = [[] for _ in range(self.local_views)]
        local_seeds: list[list[int]] = [[] for _ in range(self.local_views)]
        size, local_size = (self.roi,) * self.dims, (self.local_roi,) * self.dims
        for j in range(self.batch_size):
            sample = (step * self.world_size + self.rank) * self.batch_size + j
            v = self.volume_for(sample)
            shape = self.array(v, sample).shape
            region = self.region_start(rng, shape)
            for k in range(self.views):
                start = self.in_region(rng, region, shape, self.roi)
                views[k].append(self.cut(v, start, sample=sample))
                crops[k].append(Crop(v, start, size))
                seeds[k].append(view_seed(self.seed, step, self.rank, sample, k))
            for k in range(self.local_views):
                start = self.in_region(rng, region, shape, self.local_roi)
                local[k].append(self.cut(v, start, self.local_roi, sample=sample))
                local_crops[k].append(Crop(v, start, local_size))
                local_seeds[k].append(view_seed(self.seed, step, self.rank, sample, self.views + k))
        flat = [c for per_view in views for c in per_view]
        flat_seeds = [s for per_view in seeds for s in per_view]
        batch = ViewBatch(
            views=_stack(augment_views(self.augmentation, flat, flat_seeds)),
            crops=[c for per_view in crops for c in per_view],
            seeds=flat_seeds,
        )
        if self.local_views:
            flat_local = [c for per_view in local for c in per_view]
            flat_local_seeds = [s for per_view in local_seeds for s in per_view]
            batch.local = _stack(augment_views(self.augmentation, flat_local, flat_local_seeds))
            batch.local_crops = [c for per_view in local_crops for c in per_view]
        for v in {c.volume for c in batch.crops}:  # the crops are copies now
            release_pages(self.volumes[v].array)
        return batch

    def high_res_views(self, crops: list[Crop], seeds: Sequence[int] | None = None) -> np.ndarray:
        """The crops of the same regions on the refined volumes: (N, 1, *(roi x factor)), with the views'
        geometric and intensity draws (``seeds``) repeated (noise and blur are not: the target stays clean)."""
        if self.high_res is None:
            raise DagmanInputError("this sampler has no high-resolution volumes")
        f, out = self.high_res_factor, []
        for crop in crops:
            arr = self.high_res[crop.volume].array
            z, y, x = crop.start
            side = self.roi * f
            if self.dims == 3:
                out.append(arr[z * f : z * f + side, y * f : y * f + side, x * f : x * f + side])
            else:  # 2D: refined in-plane only, the slice is the same
                out.append(arr[z, y * f : y * f + side, x * f : x * f + side])
        if seeds is not None:
            out = augment_views(self.augmentation, out, list(seeds), only_consistent=True)
        stacked = _stack(out)
        for v in {c.volume for c in crops}:
            release_pages(self.high_res[v].array)
        return stacked


def _stack(crops: list[np.ndarray]) -> np.ndarray:
    """Crops (spatial) -> (N, 1, *spatial) float32, contiguous."""
    return np.ascontiguousarray(np.stack(crops)[:, None], dtype=np.float32)
