"""What a volume file's header says, read by us and checked before SimpleITK reads the data.

ITK is forgiving in ways that give wrong data without a word: a NIfTI voxel size of 0 or NaN becomes 1 mm, a
sheared NIfTI affine is forced orthogonal (a rotated volume), NaN and infinite NIfTI voxels become 0, a cut
MetaImage is reported as "No such file or directory", a DICOM series with a missing slice is stacked at the
average spacing. The functions here read the few header fields that decide those cases (NIfTI-1/2,
MetaImage) and the slice positions of a DICOM series, and say in one line what is wrong.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from napari_dagman.core.errors import DagmanInputError

#: How far apart (1 - |cos|) two axes of a direction matrix may be from a right angle and still count as
#: orthogonal: 1e-3 is about a twentieth of a degree, far above the rounding of real headers.
ORTHOGONALITY_TOLERANCE = 1e-3

#: What reading a damaged header raises (a short or cut file, a broken gzip stream, nonsense numbers).
_UNREADABLE = (OSError, EOFError, ValueError, struct.error, zlib.error, OverflowError)

#: NIfTI datatype codes of floating-point voxels -> numpy type (the only ones that can hold NaN).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


# --- NIfTI ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that decide whether its geometry and data can be trusted."""

    version: int
    endian: str  # "<" or ">"
    dims: tuple[int, ...]  # voxels per axis, dim[1..dim[0]]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]  # voxel size per axis, pixdim[1..dim[0]]
    vox_offset: int
    sform_code: int
    srow: np.ndarray  # 3x4 affine of the sform

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * self.bitpix // 8


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it is gzipped."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_nifti_header(path: str | os.PathLike) -> NiftiHeader | None:
    """The header of a ``.nii``/``.nii.gz`` file, or None when it is not a readable NIfTI-1/2 header."""
    path = Path(path)
    try:
        with _open(path) as fh:
            raw = fh.read(540)
        return _parse_nifti(raw)
    except _UNREADABLE:
        return None


#: Where the fields that matter lie in a NIfTI-1 (348-byte) and a NIfTI-2 (540-byte) header: offset, format.
_LAYOUTS: dict[int, dict[str, tuple[int, str]]] = {
    348: {"dim": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"),
          "vox_offset": (108, "f"), "sform_code": (254, "h"), "srow": (280, "12f")},
    540: {"dim": (16, "8q"), "datatype": (12, "h"), "bitpix": (14, "h"), "pixdim": (104, "8d"),
          "vox_offset": (168, "q"), "sform_code": (348, "i"), "srow": (400, "12d")},
}  # fmt: skip


def _parse_nifti(raw: bytes) -> NiftiHeader | None:
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size in _LAYOUTS and len(raw) >= size:
            return _nifti_fields(raw, endian, size)
    return None


def _nifti_fields(raw: bytes, e: str, size: int) -> NiftiHeader:
    def field(name: str) -> tuple:
        offset, fmt = _LAYOUTS[size][name]
        return struct.unpack_from(e + fmt, raw, offset)

    dim = field("dim")
    n = dim[0]
    if not 1 <= n <= 7:
        raise ValueError("dim[0] out of range")
    return NiftiHeader(
        version=1 if size == 348 else 2,
        endian=e,
        dims=tuple(int(d) for d in dim[1 : n + 1]),
        datatype=field("datatype")[0],
        bitpix=field("bitpix")[0],
        pixdim=field("pixdim")[1 : n + 1],
        vox_offset=int(field("vox_offset")[0]),
        sform_code=field("sform_code")[0],
        srow=np.array(field("srow"), dtype=float).reshape(3, 4),
    )


def check_nifti(path: str | os.PathLike) -> NiftiHeader | None:
    """Refuse a NIfTI file whose voxel size, affine or length is wrong; returns its header (None: not parsed).

    Raises `DagmanInputError` for a voxel size of 0 or NaN (ITK would read 1 mm), a sheared sform (ITK would
    force it orthogonal, rotating the volume) and data that end before the header says they do (ITK would read
    the missing voxels as 0).
    """
    path = Path(path)
    header = read_nifti_header(path)
    if header is None:
        return None
    sizes = header.pixdim[:3]
    if any(not np.isfinite(s) or s == 0 for s in sizes):
        shown = ", ".join(f"{s:g}" for s in sizes)
        raise DagmanInputError(
            f"{path.name}: the header gives a voxel size of {shown} mm (pixdim); 0 or NaN is not a size"
        )
    if header.sform_code > 0 and len(header.dims) >= 3:
        matrix = header.srow[:, :3]
        if not np.all(np.isfinite(matrix)) or not np.all(np.linalg.norm(matrix, axis=0) > 0):
            raise DagmanInputError(f"{path.name}: the header's affine (sform) is not a valid geometry")
        angle = skew_degrees(matrix)
        if angle is not None:
            raise DagmanInputError(
                f"{path.name}: the voxel grid is sheared (axes {angle:.1f} degrees from a right angle in the "
                "sform); resample it onto an orthogonal grid first"
            )
    if not nifti_complete(path, header):
        raise DagmanInputError(f"{path.name} is truncated or corrupt: its data end before the header says they do")
    return header


def nifti_complete(path: str | os.PathLike, header: NiftiHeader | None = None) -> bool:
    """Whether a NIfTI file holds all the data its header announces (True when the header cannot be read).

    For ``.nii.gz`` the expected size is compared with the gzip trailer (uncompressed size modulo 2**32), which
    a cut file does not have.
    """
    path = Path(path)
    header = header or read_nifti_header(path)
    if header is None:
        return True
    expected = header.vox_offset + header.data_bytes
    try:
        if path.name.lower().endswith(".gz"):
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                stored = int.from_bytes(fh.read(4), "little")
            return stored == expected % 2**32
        return path.stat().st_size >= expected
    except OSError:
        return False


def nifti_non_finite(path: str | os.PathLike, header: NiftiHeader) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (file order, x fastest) and values of the NaN/infinite voxels of a float NIfTI file.

    ITK reads them as 0; the caller puts them back so that the NaN check refuses the volume. Read in chunks, so
    a large file is never held twice.
    """
    code = _NIFTI_FLOATS.get(header.datatype)
    empty = np.zeros(0, np.int64), np.zeros(0, np.float64)
    if code is None:
        return empty
    dtype = np.dtype(header.endian + code)
    total = int(np.prod(header.dims, dtype=np.int64))
    chunk = (32 << 20) // dtype.itemsize
    indices, values = [], []
    try:
        with _open(Path(path)) as fh:
            fh.seek(header.vox_offset)
            for start in range(0, total, chunk):
                block = np.frombuffer(fh.read(min(chunk, total - start) * dtype.itemsize), dtype=dtype)
                bad = np.flatnonzero(~np.isfinite(block))
                if bad.size:
                    indices.append(bad + start)
                    values.append(block[bad].astype(np.float64))
    except _UNREADABLE:
        return empty
    if not indices:
        return empty
    return np.concatenate(indices), np.concatenate(values)


def skew_degrees(matrix: np.ndarray) -> float | None:
    """The largest departure (degrees) of two columns of ``matrix`` from a right angle; None when orthogonal."""
    m = np.asarray(matrix, dtype=float)
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(m)):
        return 90.0
    unit = m / norms
    cos = np.abs(unit.T @ unit - np.eye(m.shape[1]))
    worst = float(cos.max())
    if worst <= ORTHOGONALITY_TOLERANCE:
        return None
    return float(np.degrees(np.arcsin(min(1.0, worst))))


# --- MetaImage (.mha / .mhd) ----------------------------------------------------------------------------------
_META_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def check_metaimage(path: str | os.PathLike) -> None:
    """Refuse a MetaImage whose dimensions are broken or whose data are missing or shorter than its header says
    (one line, before ITK reads: it crashes on some broken dimensions and reports a cut file as "No such file
    or directory"). A header that cannot be parsed otherwise is left to ITK."""
    path = Path(path)
    try:
        fields, offset = _metaimage_fields(path)
    except _UNREADABLE:
        return
    if not fields:
        return  # not a MetaImage at all: ITK says so
    dims = _metaimage_dims(fields, path.name)
    if offset is None:
        raise DagmanInputError(f"{path.name} is truncated or corrupt: its header ends before ElementDataFile")
    try:
        item = _META_BYTES[fields["ElementType"].strip()] * int(fields.get("ElementNumberOfChannels", "1"))
        data_file = fields["ElementDataFile"].strip()
        compressed = fields.get("CompressedData", "False").strip().lower() == "true"
        expected = int(np.prod(dims, dtype=np.int64)) * item
        if compressed:
            expected = int(fields.get("CompressedDataSize", "0") or 0)
    except (KeyError, *_UNREADABLE):
        return
    if data_file == "LOCAL":
        available = path.stat().st_size - offset
    elif " " in data_file or data_file.startswith("LIST"):
        return  # a list of slice files: left to ITK
    else:
        data_path = path.parent / data_file
        if not data_path.is_file():
            raise DagmanInputError(f"{path.name}: its data file {data_file} (named in the header) is missing")
        available = data_path.stat().st_size
    if expected > 0 and available < expected:
        raise DagmanInputError(
            f"{path.name} is truncated or corrupt: {available} bytes of data where the header announces {expected}"
        )


def _metaimage_dims(fields: dict[str, str], name: str) -> list[int]:
    """``DimSize``, checked against ``NDims``: whole positive numbers, as many as there are dimensions."""
    try:
        ndims = int(fields.get("NDims", "3"))
        dims = [int(v) for v in fields.get("DimSize", "").split()]
    except ValueError:
        ndims, dims = -1, []
    if not 1 <= ndims <= 7 or len(dims) != ndims or any(d <= 0 for d in dims):
        raise DagmanInputError(
            f"{name}: its header is broken (NDims {fields.get('NDims')!r}, DimSize {fields.get('DimSize')!r})"
        )
    return dims


def _metaimage_fields(path: Path) -> tuple[dict[str, str], int | None]:
    """``key = value`` lines up to ``ElementDataFile`` (the last header line) and the byte offset after it (None
    when the header ends without it)."""
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as fh:
        for _ in range(200):
            line = fh.readline(4096)
            if not line:
                break
            offset += len(line)
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep:
                continue
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, offset
    return fields, None


# --- DICOM series -----------------------------------------------------------------------------------------------
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
