"""From `Volume`s to training views: resample, HU clip/scale, foreground crop, pad, paired random crops.

Pre-processing is deterministic and done once per volume (the in-memory cache); views are drawn per step
from a random generator seeded by (seed, step, rank), so the views of step ``k`` are the same in an
uninterrupted run and in one resumed at ``k`` (exact resume), and different on each DDP process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from monai.transforms import CropForeground, SpatialPad

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.hashing import array_hash
from napari_dagman.core.io import resample_to_spacing
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
        volume = resample_to_spacing(volume, target, is_label=False)
    return PreparedVolume(
        array=normalize_hu(volume.array, hu_range),
        spacing=tuple(float(s) for s in volume.spacing),
        origin=tuple(float(o) for o in volume.origin),
        direction=volume.direction.copy(),
        name=name,
        source_hash=source_hash,
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

    Raises `DagmanInputError` for NaNs and for volumes with nothing above ``hu_range[0]`` (all air).
    """
    pv = model_volume(volume, dims=dims, spacing=spacing, hu_range=hu_range, name=name)
    name, notes = pv.name, []
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


@dataclass
class Crop:
    """Where a view was cut: volume index, start index (z, y, x) in the prepared array, 2D slice or None."""

    volume: int
    start: tuple[int, int, int]
    size: tuple[int, ...]


class ViewSampler:
    """Draws ``batch`` pairs of overlapping views per step (SMIT: two crops inside one larger region)."""

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
    ) -> None:
        if not volumes:
            raise DagmanInputError("no volumes to train on")
        self.volumes, self.roi, self.dims = volumes, roi, dims
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.region = int(math.ceil(roi * region_scale))

    def volume_for(self, sample: int) -> int:
        """Volume of the ``sample``-th draw: a fresh permutation of the volumes every pass (epoch)."""
        n = len(self.volumes)
        epoch, within = divmod(sample, n)
        return int(np.random.default_rng([self.seed, 7919, epoch]).permutation(n)[within])

    def pair(
        self, rng: np.random.Generator, shape: tuple[int, int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.dims == 3:
            axes = range(3)
            starts_a, starts_b = [], []
        else:
            z = int(rng.integers(0, shape[0]))
            axes = range(1, 3)
            starts_a, starts_b = [z], [z]
        for axis in axes:
            region = min(shape[axis], self.region)
            r0 = int(rng.integers(0, shape[axis] - region + 1))
            starts_a.append(r0 + int(rng.integers(0, region - self.roi + 1)))
            starts_b.append(r0 + int(rng.integers(0, region - self.roi + 1)))
        return tuple(starts_a), tuple(starts_b)

    def cut(self, volume: int, start: tuple[int, ...]) -> np.ndarray:
        arr = self.volumes[volume].array
        if self.dims == 3:
            z, y, x = start
            return arr[z : z + self.roi, y : y + self.roi, x : x + self.roi]
        z, y, x = start
        return arr[z, y : y + self.roi, x : x + self.roi]

    def sample(self, step: int) -> tuple[np.ndarray, list[Crop]]:
        """Views (2B, 1, *roi) float32 - first views then second views - and their crops."""
        rng = np.random.default_rng([self.seed, step, self.rank])
        first, second, crops_a, crops_b = [], [], [], []
        for j in range(self.batch_size):
            sample = (step * self.world_size + self.rank) * self.batch_size + j
            v = self.volume_for(sample)
            a, b = self.pair(rng, self.volumes[v].array.shape)
            first.append(self.cut(v, a))
            second.append(self.cut(v, b))
            size = (self.roi,) * self.dims
            crops_a.append(Crop(v, a, size))
            crops_b.append(Crop(v, b, size))
        views = np.stack(first + second)[:, None]
        return np.ascontiguousarray(views, dtype=np.float32), crops_a + crops_b
