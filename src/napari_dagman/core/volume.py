"""`Volume`: a 3D array in z-y-x order with its physical geometry.

Conventions (used everywhere in the package):

* ``array`` is indexed ``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order, napari's order).
* ``spacing`` and ``origin`` are given in the same z-y-x order, in millimetres.
* ``direction`` is a 3x3 matrix whose column ``k`` is the physical direction (z-y-x components) of array
  axis ``k``. The physical (LPS, DICOM) position of voxel index ``i`` is
  ``origin + direction @ (spacing * i)``.
* Volumes read from disk are reoriented to LPS (``direction`` = identity for axis-aligned scans), so napari's
  world coordinates (``translate + scale * index``) are physical LPS millimetres and volumes from files with
  different orientations (LPS DICOM, RAS/LAS NIfTI) overlay in napari without resampling. The orientation of
  the source file is kept in ``metadata["source_orientation"]`` and restored when writing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.headers import skew_degrees

Triple = tuple[float, float, float]


def _triple(values: Sequence[float], what: str) -> Triple:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise DagmanInputError(f"{what} must have 3 values (z, y, x), got {len(out)}")
    return out  # type: ignore[return-value]


@dataclass
class Volume:
    """A CT volume (or label map) with its physical geometry, in z-y-x order."""

    array: np.ndarray
    spacing: Triple = (1.0, 1.0, 1.0)
    origin: Triple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise DagmanInputError(
                f"expected a 3D volume (z, y, x), got an array of shape {tuple(self.array.shape)}"
            )
        self.spacing = _triple(self.spacing, "spacing")
        self.origin = _triple(self.origin, "origin")
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing):
            raise DagmanInputError(f"spacing must be positive and finite, got {self.spacing}")
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        check_direction(self.direction)

    # --- geometry -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def is_axis_aligned_lps(self) -> bool:
        """True when the array axes are the physical LPS axes (identity direction)."""
        return bool(np.allclose(self.direction, np.eye(3), atol=1e-4))

    def index_to_physical(self, index: np.ndarray | Sequence[float]) -> np.ndarray:
        """Physical LPS position (z, y, x mm) of (fractional) voxel indices, shape (..., 3)."""
        idx = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction.T

    def physical_to_index(self, point: np.ndarray | Sequence[float]) -> np.ndarray:
        """Fractional voxel index (z, y, x) of physical points, shape (..., 3)."""
        p = np.asarray(point, dtype=float) - np.asarray(self.origin)
        return (p @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing)

    def contains(self, point: Sequence[float]) -> bool:
        """True when the physical point (z, y, x mm) lies inside the voxels of the volume (edges included)."""
        index = self.physical_to_index(point)
        return bool(np.all(index >= -0.5) and np.all(index <= np.asarray(self.shape) - 0.5))

    def describe_extent(self) -> str:
        """The physical box of the volume in words, e.g. ``z -804.5..-766.5, y ... mm`` (LPS)."""
        lo, hi = self.physical_extent()
        return ", ".join(f"{axis} {a:.1f}..{b:.1f}" for axis, a, b in zip("zyx", lo, hi, strict=True)) + " mm"

    def physical_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) physical corner of the voxel *edges* (not centres), z-y-x mm."""
        corners = np.array(
            [
                [a, b, c]
                for a in (-0.5, self.shape[0] - 0.5)
                for b in (-0.5, self.shape[1] - 0.5)
                for c in (-0.5, self.shape[2] - 0.5)
            ]
        )
        pts = self.index_to_physical(corners)
        return pts.min(axis=0), pts.max(axis=0)

    def same_grid(self, other: Volume, *, atol: float = 1e-3) -> bool:
        """True when ``other`` has the same shape, spacing, origin and direction (within ``atol`` mm)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )

    def geometry(self) -> dict[str, Any]:
        """JSON-ready geometry (z-y-x order)."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
        }

    def with_array(self, array: np.ndarray, **metadata: Any) -> Volume:
        """A new volume on the same grid holding ``array`` (metadata copied, then updated)."""
        if tuple(np.shape(array)) != self.shape:
            raise DagmanInputError(f"array shape {np.shape(array)} does not match the volume {self.shape}")
        meta = copy.deepcopy(self.metadata)
        meta.update(metadata)
        return Volume(array, self.spacing, self.origin, self.direction.copy(), meta)

    # --- napari -----------------------------------------------------------------------------------------
    def layer_kwargs(self) -> dict[str, Any]:
        """``scale``, ``translate`` and ``metadata`` for a napari layer showing this volume.

        Oblique scans (direction not a pure axis permutation after LPS reorientation) are shown on their
        array grid; the full direction is kept in the metadata so that writers round-trip it.
        """
        meta = copy.deepcopy(self.metadata)
        meta.update(
            spacing=list(self.spacing),
            origin=list(self.origin),
            direction=self.direction.tolist(),
        )
        return {"scale": list(self.spacing), "translate": list(self.origin), "metadata": meta}

    @classmethod
    def from_layer_data(
        cls,
        data: np.ndarray,
        *,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Volume:
        """Rebuild a volume from a napari layer's data, scale, translate and metadata.

        The layer's scale/translate win over stale metadata (a user may have changed them); the direction
        comes from the metadata when present.
        """
        meta = dict(metadata or {})
        data = np.asarray(data)
        if data.ndim != 3:
            raise DagmanInputError(
                f"expected a 3D layer (z, y, x), got {data.ndim}D data of shape {data.shape}"
            )
        spacing = tuple(scale)[-3:] if scale is not None else meta.get("spacing", (1.0, 1.0, 1.0))
        origin = tuple(translate)[-3:] if translate is not None else meta.get("origin", (0.0, 0.0, 0.0))
        direction = np.asarray(meta.get("direction", np.eye(3)), dtype=float)
        return cls(data, spacing, origin, direction, meta)


def check_direction(direction: np.ndarray) -> None:
    """Refuse direction cosines that are not finite or not orthogonal (a sheared voxel grid).

    Every writer and viewer would force such a grid orthogonal, turning the volume by the shear angle.
    """
    if not np.all(np.isfinite(direction)):
        raise DagmanInputError("the direction cosines of the voxel grid are not finite")
    angle = skew_degrees(direction)
    if angle is not None:
        raise DagmanInputError(
            f"the voxel grid is sheared (its axes are {angle:.1f} degrees from a right angle); resample it onto an "
            "orthogonal grid first"
        )
    if not np.allclose(np.linalg.norm(direction, axis=0), 1.0, atol=1e-3):
        raise DagmanInputError("the direction cosines of the voxel grid are not unit vectors")


def check_finite(volume: Volume, what: str = "image") -> None:
    """Raise a clear error when a float volume holds NaN or infinite values."""
    if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
        bad = int((~np.isfinite(volume.array)).sum())
        raise DagmanInputError(f"{what} has {bad} NaN or infinite voxels; fix or mask them before use")


def grid_placement(
    origin: Sequence[float], spacing: Sequence[float], factor: Sequence[float] | float
) -> tuple[list[float], list[float]]:
    """(scale, translate) of a grid whose cell ``i`` covers voxels ``[i*f, (i+1)*f)`` of a reference grid.

    ``origin`` and ``spacing`` are those of the reference grid (centre of voxel 0, z-y-x mm); the cell centre
    sits at reference index ``i*f + (f-1)/2``. ``f`` > 1 is a coarser grid (token-resolution maps, masks),
    ``f`` < 1 a finer one (a reconstruction at twice the resolution: f = 0.5). Used to overlay such maps on a
    CT in napari without resampling them.
    """
    n = len(spacing)
    f = [float(factor)] * n if isinstance(factor, int | float | np.number) else [float(v) for v in factor]
    scale = [float(s) * k for s, k in zip(spacing, f, strict=True)]
    translate = [float(o) + float(s) * (k - 1) / 2.0 for o, s, k in zip(origin, spacing, f, strict=True)]
    return scale, translate


def require_same_grid(image: Volume, labels: Volume, what: str = "label map") -> None:
    """Raise a clear error when a label map does not lie on the image's voxel grid."""
    if image.same_grid(labels):
        return

    def describe(v: Volume) -> str:
        return (
            f"{'x'.join(map(str, v.shape))} voxels of {'x'.join(f'{s:g}' for s in v.spacing)} mm at origin "
            + "("
            + ", ".join(f"{o:.1f}" for o in v.origin)
            + ")"
        )

    raise DagmanInputError(
        f"the {what} ({describe(labels)}) is not on the image grid ({describe(image)}); "
        "resample it onto the image first"
    )


def window_starts(size: int, roi: int, step: int) -> list[int]:
    """Sliding-window starts along one axis: every ``step``, and a last one reaching the end (padded with air)."""
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(starts[-1] + step)
    return starts
