"""What a DICOM series' headers say about where each slice lies and what its values mean, checked before
SimpleITK stacks the slices: positions and orientations on every slice, rescale slopes and intercepts, localizers
and slices of another size, and the spacing between neighbours (`core.headers` does the same for NIfTI and
MetaImage; `core.io` reads the series).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.headers import ORTHOGONALITY_TOLERANCE

# --- DICOM series -----------------------------------------------------------------------------------------------
#: How far (largest difference of a direction cosine) a slice's ImageOrientationPatient may be from the first
#: slice's and still count as the same orientation: 1e-3 is about a twentieth of a degree, far above rounding.
DICOM_ORIENTATION_TOLERANCE = 1e-3
#: A slice whose normal is within this |cosine| of perpendicular to the series' is a localizer (about 6 degrees).
_PERPENDICULAR = 0.1


#: DICOM's Segmentation Storage SOP class.
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class DicomSlice:
    """What one DICOM file's header says about where its slice lies and what its values mean: the tags' text as
    stored (None when the tag is absent), read before any pixel data."""

    file: str
    modality: str | None = None
    image_type: str = ""
    position: str | None = None  # ImagePositionPatient (0020,0032)
    orientation: str | None = None  # ImageOrientationPatient (0020,0037)
    size: tuple[int, int] | None = None  # columns, rows
    slope: str | None = None  # RescaleSlope (0028,1053)
    intercept: str | None = None  # RescaleIntercept (0028,1052)
    unreadable: str | None = None  # why the header could not be read
    sop_class: str | None = None  # SOPClassUID (0008,0016)

    @property
    def name(self) -> str:
        return Path(self.file).name

    @property
    def is_segmentation(self) -> bool:
        """A DICOM Segmentation (its SOP class, or Modality SEG): segments over a series, not a CT slice."""
        uid = (self.sop_class or "").strip().rstrip("\x00")
        return uid == SEGMENTATION_SOP_CLASS or (self.modality or "").strip() == "SEG"


def _numbers(text: str | None, count: int) -> np.ndarray | None:
    """``count`` finite numbers from a DICOM multi-value (``a\\b\\c``), or None."""
    try:
        values = np.array([float(v) for v in (text or "").split("\\")], dtype=float)
    except ValueError:
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _normal(orientation: str | None) -> np.ndarray | None:
    """The unit normal of an ImageOrientationPatient, None when it is not two perpendicular unit vectors."""
    cosines = _numbers(orientation, 6)
    if cosines is None:
        return None
    row, col = cosines[:3], cosines[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2:
        return None
    if abs(row @ col) > ORTHOGONALITY_TOLERANCE:
        return None
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def _listed(slices: Sequence[DicomSlice]) -> str:
    names = [s.name for s in slices[:3]]
    return ", ".join(names) + (f" and {len(slices) - 3} more" if len(slices) > 3 else "")


def dicom_volume_slices(slices: Sequence[DicomSlice], *, name: str) -> tuple[list[DicomSlice], list[str]]:
    """The slices of a series that make up its volume, and a note for each kind left out.

    Localizers (ImageType LOCALIZER, or a normal perpendicular to the series') and slices of another matrix size
    than most are left out: they cannot belong to the stack, and a gap they leave is caught by the spacing check.
    Kept slices stay in GDCM's order unless something was left out (then by position: GDCM orders a series of
    mixed orientations otherwise). Raises `DagmanInputError` when the left-out ones are not clearly the few.
    """
    notes: list[str] = []
    localizers = [s for s in slices if "LOCALIZER" in [v.strip() for v in s.image_type.upper().split("\\")]]
    rest = [s for s in slices if s not in localizers]
    normals = [_normal(s.orientation) for s in rest]
    known = [n for n in normals if n is not None]
    if known:
        keys = [tuple(np.round(n, 2)) for n in known]
        main = known[max(range(len(keys)), key=keys.count)]
        across = [s for s, n in zip(rest, normals, strict=True) if n is not None and abs(n @ main) < _PERPENDICULAR]
        if across and 2 * len(across) >= len(rest):
            raise DagmanInputError(
                f"DICOM series {name}: its slices lie in perpendicular planes ({across[0].name} and another); "
                "which are localizers is unclear; keep one orientation per folder"
            )
        localizers += across
        rest = [s for s in rest if s not in across]
    if localizers:
        notes.append(f"left out {len(localizers)} localizer{'s' * (len(localizers) > 1)} ({_listed(localizers)})")
    sizes = [s.size for s in rest if s.size is not None]
    if sizes:
        usual = max(set(sizes), key=sizes.count)
        for size in sorted(set(sizes) - {usual}):
            other = [s for s in rest if s.size == size]
            if 2 * len(other) >= len(rest):
                raise DagmanInputError(
                    f"DICOM series {name}: its slices have two matrix sizes ({other[0].name} is {size[0]} x "
                    f"{size[1]}, others {usual[0]} x {usual[1]}); keep one size per folder"
                )
            notes.append(
                f"left out {len(other)} slice{'s' * (len(other) > 1)} of another size {size[0]} x {size[1]} "
                f"({_listed(other)}; the others are {usual[0]} x {usual[1]})"
            )
            rest = [s for s in rest if s.size != size]
    if not rest:
        raise DagmanInputError(f"DICOM series {name} holds only localizers ({_listed(localizers)})")
    if len(rest) < len(slices) and known:
        positions = [_numbers(s.position, 3) for s in rest]
        if all(p is not None for p in positions):
            distance = [float(p @ main) for p in positions]  # type: ignore[operator]
            rest = [rest[k] for k in sorted(range(len(rest)), key=distance.__getitem__)]
    return rest, notes


def check_dicom_slices(slices: Sequence[DicomSlice], *, name: str) -> bool:
    """Refuse a series whose headers do not say where a slice lies or what its values are; True when the slices
    carry different rescales (the caller then reads them as floating point, so each slice gets its own exactly).

    Raises `DagmanInputError` naming the first file with an unreadable header, no or a broken
    ImagePositionPatient or ImageOrientationPatient (ITK would stack the slices 1 mm apart, or at a guessed
    spacing), an orientation other than the first slice's, or a RescaleSlope/RescaleIntercept that is not a
    number, or a slope of 0 (ITK reads both as 1).
    """
    first: tuple[DicomSlice, np.ndarray] | None = None
    rescales = set()
    for s in slices:
        where = f"DICOM series {name}: {s.name}"
        if s.unreadable:
            raise DagmanInputError(f"{where} has a header that cannot be read ({s.unreadable})")
        position, orientation = (s.position or "").strip(), (s.orientation or "").strip()
        if not position:
            raise DagmanInputError(f"{where} has no ImagePositionPatient (0020,0032), so where its slice lies is unknown")
        if not orientation:
            raise DagmanInputError(
                f"{where} has no ImageOrientationPatient (0020,0037), so how its slice is oriented is unknown"
            )
        if _numbers(position, 3) is None:
            raise DagmanInputError(
                f"{where} has ImagePositionPatient (0020,0032) '{position}', not three numbers, so where its slice "
                "lies is unknown"
            )
        cosines = _numbers(orientation, 6)
        if cosines is None or _normal(orientation) is None:
            raise DagmanInputError(
                f"{where} has ImageOrientationPatient (0020,0037) '{orientation}', not two perpendicular unit "
                "vectors, so how its slice is oriented is unknown"
            )
        if first is None:
            first = (s, cosines)
        elif np.abs(cosines - first[1]).max() > DICOM_ORIENTATION_TOLERANCE:
            raise DagmanInputError(
                f"{where} is oriented otherwise than {first[0].name} (ImageOrientationPatient '{orientation}' "
                f"against '{(first[0].orientation or '').strip()}'), so the slices are not one volume"
            )
        rescales.add(dicom_rescale(s, where=where))
    return len(rescales) > 1


def dicom_rescale(s: DicomSlice, *, where: str) -> tuple[float, float]:
    """A slice's (RescaleSlope, RescaleIntercept), 1 and 0 when absent; refused when not a number or a slope of 0
    (ITK reads both as 1: the values would be read wrong without a word)."""
    slope = _rescale(s.slope, "RescaleSlope (0028,1053)", where, default=1.0)
    if slope == 0:
        raise DagmanInputError(
            f"{where} has RescaleSlope (0028,1053) 0, which would make every voxel its intercept (ITK reads it as "
            "1), so its values in HU are unknown"
        )
    return slope, _rescale(s.intercept, "RescaleIntercept (0028,1052)", where, default=0.0)


def _rescale(text: str | None, tag: str, where: str, *, default: float) -> float:
    """A rescale value; absent or empty gives ``default`` (what ITK reads), one that is not a number is refused."""
    text = (text or "").strip()
    if not text:
        return default
    value = _numbers(text, 1)
    if value is None:
        raise DagmanInputError(f"{where} has {tag} '{text}', not a number, so its values in HU are unknown")
    return float(value[0])


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices of a series lie along its normal: distances (mm) from the first slice, in read order."""

    distances: np.ndarray
    spacing: float  # the usual distance between neighbours (median)
    uneven: str | None  # what is wrong with the spacing, None when even


def slice_geometry(
    positions: Sequence[Sequence[float]], normal: Sequence[float], *, name: str, tolerance: float = 0.1
) -> SliceGeometry:
    """Check DICOM slice positions (ImagePositionPatient, in the order the series is stacked) along ``normal``.

    Raises `DagmanInputError` for slices that repeat a position and for positions that drift sideways (a tilted
    gantry: a sheared grid). Uneven spacing (a missing or extra slice) is returned in ``uneven``: the caller
    refuses it or resamples. ``tolerance`` is the allowed deviation from the usual spacing, as a fraction.
    """
    p = np.asarray(positions, dtype=float)
    n = np.asarray(normal, dtype=float)
    n = n / np.linalg.norm(n)
    d = (p - p[0]) @ n
    if len(d) > 1 and d[-1] < 0:
        d = -d
    steps = np.diff(d)
    if np.any(steps <= 1e-3):
        order = np.argsort(d, kind="stable")
        same = np.flatnonzero(np.diff(d[order]) <= 1e-3)
        if same.size:
            a, b = sorted((int(order[same[0]]) + 1, int(order[same[0] + 1]) + 1))
            raise DagmanInputError(
                f"DICOM series {name}: slices {a} and {b} lie at the same position, {d[a - 1]:.2f} mm from the "
                "first (a duplicated file?)"
            )
        raise DagmanInputError(f"DICOM series {name}: the slices are not stacked in the order of their positions")
    # a slice shifted within its plane: a tilted gantry, whose voxel grid is sheared
    offsets = (p - p[0]) - np.outer((p - p[0]) @ n, n)
    shift = np.linalg.norm(offsets, axis=1)
    if np.any(shift > 0.01 + ORTHOGONALITY_TOLERANCE * np.abs(d)):
        k = int(np.argmax(shift / np.maximum(np.abs(d), 1e-6)))
        tilt = float(np.degrees(np.arctan2(shift[k], abs(d[k]))))
        raise DagmanInputError(
            f"DICOM series {name}: the slices are shifted within their plane ({tilt:.1f} degrees, a tilted "
            "gantry?), so the voxel grid is sheared; reconstruct without tilt or resample it onto an orthogonal "
            "grid first"
        )
    if len(steps) == 0:
        return SliceGeometry(d, 0.0, None)
    spacing = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - spacing)))
    uneven = None
    if abs(steps[worst] - spacing) > tolerance * spacing + 0.01:
        uneven = (
            f"a gap of {steps[worst]:.2f} mm between slices {worst + 1} and {worst + 2} where the others are "
            f"{spacing:.2f} mm apart"
            + (" (a missing or unreadable file?)" if steps[worst] > spacing else " (an extra file?)")
        )
    return SliceGeometry(d, spacing, uneven)


def even_slices(array: np.ndarray, distances: np.ndarray, spacing: float) -> np.ndarray:
    """Linear interpolation of slices (axis 0) at uneven ``distances`` onto an even grid of ``spacing`` mm."""
    target = np.arange(0.0, distances[-1] + spacing / 2, spacing)
    upper = np.clip(np.searchsorted(distances, target, side="right"), 1, len(distances) - 1)
    lower = upper - 1
    w = np.clip((target - distances[lower]) / (distances[upper] - distances[lower]), 0.0, 1.0)
    shape = (-1,) + (1,) * (array.ndim - 1)
    out = array[lower] * (1.0 - w.reshape(shape)) + array[upper] * w.reshape(shape)
    return out.astype(np.float32 if array.dtype.itemsize <= 4 else np.float64)
