"""The phantom's vocabulary: label ids and HU values, the canonical field of view, and the drawing primitives
(boxes, grids, a canvas that paints labels and HU, ellipsoids, capsules, smooth noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_dagman.core.labels import TOTALSEG_V2

# --- label ids ------------------------------------------------------------------------------------------
SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT, LIVER = 1, 2, 3, 5
LUNG_UPPER_LEFT, LUNG_LOWER_LEFT = 10, 11
LUNG_UPPER_RIGHT, LUNG_MIDDLE_RIGHT, LUNG_LOWER_RIGHT = 12, 13, 14
URINARY_BLADDER = 21
VERTEBRA_L5 = 27  # TotalSegmentator counts up the spine: L5 27, L4 28, ..., T6 38
HEART, AORTA, SPINAL_CORD = 51, 52, 79
RIB_LEFT_1, RIB_RIGHT_1 = 92, 104
SUBCUTANEOUS_FAT, SKELETAL_MUSCLE, LUNG_NODULE, LUNG_VESSELS, SOFT_TISSUE = 200, 201, 202, 203, 204

#: Vertebral levels drawn, bottom to top (12 levels of 24 mm fill the 288 mm canonical height).
VERTEBRA_LEVELS: tuple[str, ...] = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6")
#: Rib numbers drawn on each side (the ribs whose heads sit on the thoracic vertebrae in the field of view).
RIB_NUMBERS: tuple[int, ...] = (6, 7, 8, 9, 10, 11, 12)

_LUNG_IDS = (LUNG_UPPER_LEFT, LUNG_LOWER_LEFT, LUNG_UPPER_RIGHT, LUNG_MIDDLE_RIGHT, LUNG_LOWER_RIGHT)
_VERTEBRA_IDS = tuple(VERTEBRA_L5 + k for k in range(len(VERTEBRA_LEVELS)))
_RIB_IDS = tuple(RIB_LEFT_1 + n - 1 for n in RIB_NUMBERS) + tuple(RIB_RIGHT_1 + n - 1 for n in RIB_NUMBERS)

_PHANTOM_ONLY = {
    SUBCUTANEOUS_FAT: "subcutaneous_fat",
    SKELETAL_MUSCLE: "skeletal_muscle",
    LUNG_NODULE: "lung_nodule",
    LUNG_VESSELS: "lung_vessels",
    SOFT_TISSUE: "soft_tissue",
}
_TOTALSEG_IDS = (
    SPLEEN,
    KIDNEY_RIGHT,
    KIDNEY_LEFT,
    LIVER,
    *_LUNG_IDS,
    URINARY_BLADDER,
    *_VERTEBRA_IDS,
    HEART,
    AORTA,
    SPINAL_CORD,
    *_RIB_IDS,
)

#: Id -> organ name of every class the phantom contains (TotalSegmentator v2 names below 200).
PHANTOM_LABELS: dict[int, str] = {
    **{i: TOTALSEG_V2[i] for i in sorted(_TOTALSEG_IDS)},
    **_PHANTOM_ONLY,
}

#: Nominal HU of the bulk of each class, before texture, blur and noise. Classes with inner structure:
#: vertebrae (cancellous 250, cortex 700, arch 500), ribs (core 350, cortex 650), kidneys (sinus fat -70),
#: liver (vessels 33), soft tissue (bowel/mesentery +20 with fat islands -90 and a few gas pockets -950).
PHANTOM_HU: dict[int, float] = {
    0: -1000.0,  # air outside the body (intervertebral discs, +85 HU, are also unlabelled)
    SPLEEN: 50.0,
    KIDNEY_RIGHT: 32.0,
    KIDNEY_LEFT: 32.0,
    LIVER: 60.0,
    **dict.fromkeys(_LUNG_IDS, -855.0),
    URINARY_BLADDER: 10.0,
    **dict.fromkeys(_VERTEBRA_IDS, 250.0),
    HEART: 40.0,
    AORTA: 45.0,
    SPINAL_CORD: 20.0,
    **dict.fromkeys(_RIB_IDS, 600.0),
    SUBCUTANEOUS_FAT: -100.0,
    SKELETAL_MUSCLE: 45.0,
    LUNG_NODULE: 30.0,
    LUNG_VESSELS: 40.0,
    SOFT_TISSUE: 20.0,
}


def _lookup(values: dict[int, float]) -> np.ndarray:
    """A read-only float32 table indexed by label id (uint8), 0 where ``values`` has no entry."""
    table = np.zeros(256, np.float32)
    for i, v in values.items():
        table[i] = v
    table.flags.writeable = False
    return table


# HU of each label before any inner structure is painted (flat base values; see PHANTOM_HU)
_BASE_HU = _lookup(PHANTOM_HU)

#: Parameters of the files in ``sample_data/`` (written by ``scripts/make_sample_data.py``); the tests
#: regenerate the phantom with them and compare with the files, so the folder stays reproducible.
SAMPLE_FILE_PARAMS: dict[str, Any] = {"shape": (96, 128, 128), "spacing": (3.0, 2.5, 2.5), "seed": 0}

#: Canonical field of view (z, y, x mm) the anatomy is drawn in.
CANONICAL_FOV: tuple[float, float, float] = (288.0, 320.0, 320.0)

# Texture (std of a fine, smooth random field, in HU) per label: organs are not flat in real CT, and a
# texture that differs between organs is part of what tells them apart.
_TEXTURE_HU = _lookup(
    {
        SUBCUTANEOUS_FAT: 7.0,
        SKELETAL_MUSCLE: 5.0,
        **dict.fromkeys(_LUNG_IDS, 22.0),
        LUNG_NODULE: 4.0,
        **dict.fromkeys((LIVER, SPLEEN, KIDNEY_LEFT, KIDNEY_RIGHT), 4.0),
        **dict.fromkeys((HEART, AORTA, SPINAL_CORD), 2.5),
        **dict.fromkeys(_VERTEBRA_IDS, 45.0),
        **dict.fromkeys(_RIB_IDS, 40.0),
    }
)

_MIN_SHAPE = (8, 16, 16)
_FAT_IN_CAVITY = -92.0  # perirenal and perivesical fat (labelled soft tissue)
_CAVITY_YC = 5.0  # the cavity sits a little behind the body's centre: belly fat is thicker than back fat


# --- grid and painting helpers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Box:
    """A sub-block of the volume: index slices and open (broadcastable) canonical coordinates."""

    sl: tuple[slice, slice, slice]
    Z: np.ndarray  # (nz, 1, 1)
    Y: np.ndarray  # (1, ny, 1)
    X: np.ndarray  # (1, 1, nx)


@dataclass(frozen=True)
class _Grid:
    """Canonical coordinates (mm) of the voxel centres along each axis."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @classmethod
    def of(cls, shape: tuple[int, int, int]) -> _Grid:
        axes = []
        for n, fov, centred in zip(shape, CANONICAL_FOV, (False, True, True), strict=True):
            c = (np.arange(n) + 0.5) / n
            axes.append(((c - 0.5 if centred else c) * fov).astype(np.float32))
        return cls(*axes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    @property
    def step(self) -> tuple[float, float, float]:
        """Canonical mm per voxel along z, y, x."""
        return tuple(f / n for f, n in zip(CANONICAL_FOV, self.shape, strict=True))  # type: ignore[return-value]

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> _Box | None:
        """The voxels whose centres lie in [lo, hi] (z, y, x mm); None when empty."""
        sls = []
        for coords, a, b in zip((self.z, self.y, self.x), lo, hi, strict=True):
            i0 = int(np.searchsorted(coords, a, "left"))
            i1 = int(np.searchsorted(coords, b, "right"))
            if i1 <= i0:
                return None
            sls.append(slice(i0, i1))
        s = tuple(sls)
        return _Box(
            s,  # type: ignore[arg-type]
            self.z[s[0]][:, None, None],
            self.y[s[1]][None, :, None],
            self.x[s[2]][None, None, :],
        )

    def full(self) -> _Box:
        return self.box((-1e9,) * 3, (1e9,) * 3)  # type: ignore[return-value]


def _allow(*ids: int) -> np.ndarray:
    """Lookup table: True for the label ids a structure may be painted over."""
    lut = np.zeros(256, bool)
    lut[list(ids)] = True
    return lut


class _Canvas:
    """The HU image (float32) and the label map (uint8) being painted, back to front."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.hu = np.full(shape, -1000.0, np.float32)
        self.lab = np.zeros(shape, np.uint8)

    def paint(
        self,
        box: _Box,
        mask: np.ndarray,
        hu: float | np.ndarray,
        label: int,
        only: np.ndarray | None = None,
    ) -> None:
        """Set HU and label where ``mask`` is true (and, with ``only``, where the current label is allowed)."""
        lab = self.lab[box.sl]
        mask = np.broadcast_to(mask, lab.shape)
        if only is not None:
            mask = mask & only[lab]
        lab[mask] = label
        target = self.hu[box.sl]
        if np.ndim(hu) == 0:
            target[mask] = hu
        else:
            target[mask] = np.broadcast_to(hu, mask.shape)[mask]


def _jit(rng: np.random.Generator, sd: float) -> float:
    """A small random offset (normal, clipped to 2.5 sd so no draw breaks the anatomy)."""
    return float(np.clip(rng.standard_normal(), -2.5, 2.5) * sd)


def _wobble(rng: np.random.Generator, amp: float) -> tuple[float, ...]:
    """Amplitudes and phases of a smooth boundary deformation (see :func:`_ellipsoid`)."""
    a = rng.uniform(0.3, 1.0, 3) * amp
    phase = rng.uniform(0.0, 2.0 * math.pi, 3)
    return (*(float(v) for v in a), *(float(v) for v in phase))


def _sigmoid(v: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-v))


def _ellipsoid(
    grid: _Grid,
    centre: tuple[float, float, float],
    semi: tuple[float, float, float],
    angle: float = 0.0,
    wobble: tuple[float, ...] | None = None,
) -> tuple[_Box, np.ndarray] | None:
    """Normalised radius (< 1 inside) of an ellipsoid rotated by ``angle`` (rad) about z, in its bounding box.

    ``wobble`` deforms the boundary with low-order harmonics of the in-plane angle (and a tilt along z), so
    organs are smooth but not perfect ellipsoids and vary with the seed.
    """
    cz, cy, cx = centre
    az, ay, ax = semi
    # the bounding box must hold the deformed, rotated shape
    grow = 1.0 + (1.5 * sum(abs(w) for w in wobble[:3]) if wobble else 0.0)
    ey, ex = (max(ay, ax) * grow,) * 2 if angle else (ay * grow, ax * grow)
    box = grid.box((cz - az * grow, cy - ey, cx - ex), (cz + az * grow, cy + ey, cx + ex))
    if box is None:
        return None
    dz = (box.Z - cz) / az
    dy, dx = box.Y - cy, box.X - cx
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    else:
        u, v = dx, dy
    u, v = u / ax, v / ay
    r = np.sqrt(dz * dz + (u * u + v * v))
    if wobble:
        a1, a2, a3, p1, p2, p3 = wobble
        theta = np.arctan2(v, u)
        r = r / (
            1.0 + a1 * np.cos(2.0 * theta + p1) + a2 * np.cos(3.0 * theta + p2) + a3 * dz * np.cos(theta + p3)
        )
    return box, r


def _capsule(grid: _Grid, a: np.ndarray, b: np.ndarray, radius: float) -> tuple[_Box, np.ndarray] | None:
    """Voxels within ``radius`` of the segment a-b (z, y, x mm): a straight tube with round ends."""
    lo = np.minimum(a, b) - radius
    hi = np.maximum(a, b) + radius
    box = grid.box(tuple(lo), tuple(hi))  # type: ignore[arg-type]
    if box is None:
        return None
    ab = b - a
    length2 = float(ab @ ab) or 1e-6
    pz, py, px = box.Z - a[0], box.Y - a[1], box.X - a[2]
    t = np.clip((pz * ab[0] + py * ab[1] + px * ab[2]) / length2, 0.0, 1.0)
    d2 = (pz - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (px - t * ab[2]) ** 2
    return box, d2 < radius * radius


def _superellipse_p(values: np.ndarray, p: float) -> np.ndarray:
    return np.abs(values) ** p


# --- the anatomy ------------------------------------------------------------------------------------------
@dataclass
class _Body:
    """Outline of the thoracic/abdominal cavity (inside the muscle wall), per canonical z."""

    ax: np.ndarray  # cavity semi-axis along x, per slice
    ay: np.ndarray  # along y (anterior half; the posterior half is flattened by POSTERIOR)
    yc: float
    dome: np.ndarray  # (ny, nx) height of the diaphragm (canonical z mm)

    P = 2.2
    POSTERIOR = 0.94  # backs are flatter than bellies


