"""Patches of a model grid: the `PatchEmbeddings` container, lattice and organ-centred sampling, per-patch
label counts (organ and purity), pooling of a token feature map, and the selection mask of chosen patches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.volume import Volume

#: How a patch was placed (the table's ``sampling`` column): on the lattice, or centred inside an organ.
SAMPLING_NAMES: tuple[str, ...] = ("grid", "organ")


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


def organ_thickness_mm(labels: np.ndarray, spacing: Sequence[float]) -> dict[int, float]:
    """Each organ's thickness in mm: twice the depth of its deepest voxel (the diameter of the largest ball inside
    it). A patch much wider than this is mostly something else, whatever its centre."""
    from scipy import ndimage

    out: dict[int, float] = {}
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = np.pad(labels[box] == value, 1)
        out[value] = 2.0 * float(ndimage.distance_transform_edt(mask, sampling=spacing).max())
    return out


def missing_organs_note(
    labels: np.ndarray,
    spacing: Sequence[float],
    names: dict[int, str],
    kept: set[str],
    patch_mm: float,
    min_purity: float,
    merge_sides: bool = False,
) -> tuple[dict[str, float], str]:
    """The organs of the label map that got no scored patch, with their thickness, and what to change.

    Returns ({name: thickness mm}, note; "" when none is missing). ``kept`` are the organ names the metrics
    scored (side-free names when ``merge_sides``).
    """
    from napari_dagman.core.embeddings.metrics import side_free_name

    thickness = organ_thickness_mm(np.asarray(labels, np.int64), spacing)
    missing: dict[str, float] = {}
    for value, mm in sorted(thickness.items()):
        name = names.get(value, str(value))  # as the metrics name an organ
        shown = side_free_name(name) if merge_sides else name
        if shown not in kept:
            missing[shown] = max(missing.get(shown, 0.0), round(mm, 1))
    if not missing:
        return {}, ""
    thin = sorted(missing.items(), key=lambda item: item[1])
    fits = float(np.median([mm for _, mm in thin]))
    suggestion = max(8, int(fits // 4) * 4)
    listed = ", ".join(f"{name} ({mm:g} mm)" for name, mm in thin[:8]) + (
        f" and {len(thin) - 8} more" if len(thin) > 8 else ""
    )
    advice = (
        f"patches of about {suggestion} mm would fit half of them"
        if suggestion < patch_mm
        else "a lower minimum purity or more organ-centred patches would keep them"
    )
    return missing, (
        f"{len(missing)} organ(s) of the label map have no patch of purity >= {min_purity:g} at {patch_mm:g} mm, "
        f"thinnest first (thickness): {listed}; {advice}"
    )
