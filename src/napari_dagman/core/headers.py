"""What a volume file's header says, read by us and checked before SimpleITK reads the data.

ITK is forgiving in ways that give wrong data without a word: a NIfTI voxel size of 0 or NaN becomes 1 mm, a
sheared NIfTI affine is forced orthogonal (a rotated volume), NaN and infinite NIfTI voxels become 0, a cut
MetaImage is reported as "No such file or directory", a NIfTI sform that disagrees with its pixdim or qform is
read by rules of ITK's own, an absurd scl_slope is applied. The functions here read the few header fields that
decide those cases (NIfTI-1/2, MetaImage) and say in one line what is wrong; `core.dicom_headers` does the same for
the slices of a DICOM series.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
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

#: How far the voxel size the NIfTI sform implies (the length of each of its first three columns) may be from
#: pixdim[1..3] and still agree: relative 1e-3 plus 1e-4 mm. Writers store both as float32 of one number
#: (rounding about 1e-7 relative); ITK itself only warns ("unexpected scales in sform", on stderr) beyond 1e-3 mm,
#: then reads pixdim. A real disagreement is a factor (3 mm against 1 mm), never a rounding.
NIFTI_VOXEL_SIZE_RTOL = 1e-3
NIFTI_VOXEL_SIZE_ATOL_MM = 1e-4
#: How far apart (degrees) an axis of the NIfTI qform may be from the same axis of the sform and still agree.
#: A NIfTI-1 qform is a float32 quaternion whose first component is recomputed as sqrt(1 - b² - c² - d²): it loses
#: up to about 0.05 degrees near 180-degree rotations; 0.5 degrees is ten times that and far below a real
#: disagreement (another orientation, a flipped axis, a registration: degrees to 180).
NIFTI_QFORM_SFORM_DEGREES = 0.5
#: How far apart (mm) the qform's and the sform's origins may be and still agree, plus 1e-5 of their size: both
#: are float32 copies of one position (rounding about 1e-4 mm at 1 m); 0.01 mm is far below any voxel.
NIFTI_QFORM_SFORM_MM = 1e-2
#: The largest magnitude a scaled NIfTI value may have and still be taken for a CT value. Hounsfield units of real
#: CT lie in about -1024..+3071 (12 bits), up to about +30000 for metal in extended-scale CTs; 1e5 leaves room
#: for other units while catching absurd scaling (a scl_slope of 1e30 gives values of 1e33).
NIFTI_VALUE_LIMIT = 1e5
#: ITK's test for a NIfTI scale factor of "zero" (``std::numeric_limits<double>::epsilon()``).
_EPS = float(np.finfo(np.float64).eps)


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
    qform_code: int = 0
    qfac: float = 1.0  # pixdim[0]: -1 flips the qform's third axis, anything else is +1
    quatern: tuple[float, ...] = (0.0,) * 6  # quatern_b, quatern_c, quatern_d, qoffset_x, qoffset_y, qoffset_z
    scl_slope: float = float("nan")  # NaN or 0: no scaling (nibabel writes NaN)
    scl_inter: float = float("nan")

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * self.bitpix // 8

    @property
    def scaled(self) -> bool:
        """Whether the NIfTI standard says the stored values are scaled (``scl_slope`` a number other than 0)."""
        return bool(np.isfinite(self.scl_slope) and self.scl_slope != 0)

    @property
    def scaling_applied(self) -> bool:
        """Whether ITK changes the stored values: what ``NiftiImageIO`` does (non-finite slope or intercept taken
        as 0, a slope of 0 as 1, then values rescaled unless slope 1 and intercept 0)."""
        slope = self.scl_slope if np.isfinite(self.scl_slope) else 0.0
        inter = self.scl_inter if np.isfinite(self.scl_inter) else 0.0
        slope = 1.0 if abs(slope) < _EPS else slope
        return abs(slope - 1.0) > _EPS or abs(inter) > _EPS


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
          "vox_offset": (108, "f"), "scl_slope": (112, "f"), "scl_inter": (116, "f"), "qform_code": (252, "h"),
          "sform_code": (254, "h"), "quatern": (256, "6f"), "srow": (280, "12f")},
    540: {"dim": (16, "8q"), "datatype": (12, "h"), "bitpix": (14, "h"), "pixdim": (104, "8d"),
          "vox_offset": (168, "q"), "scl_slope": (176, "d"), "scl_inter": (184, "d"), "qform_code": (344, "i"),
          "sform_code": (348, "i"), "quatern": (352, "6d"), "srow": (400, "12d")},
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
        qform_code=field("qform_code")[0],
        qfac=-1.0 if field("pixdim")[0] < 0 else 1.0,  # as niftilib: only a negative qfac flips
        quatern=tuple(float(v) for v in field("quatern")),
        scl_slope=float(field("scl_slope")[0]),
        scl_inter=float(field("scl_inter")[0]),
    )


def check_nifti(path: str | os.PathLike) -> NiftiHeader | None:
    """Refuse a NIfTI file whose voxel size, affine or length is wrong; returns its header (None: not parsed).

    Raises `DagmanInputError` for a voxel size of 0 or NaN (ITK would read 1 mm), a sheared sform (ITK would
    force it orthogonal, rotating the volume), a header whose geometries disagree (see `_check_nifti_affines`),
    a scaling ITK would apply otherwise than the NIfTI standard says (see `_check_nifti_scaling`) and data that
    end before the header says they do (ITK would read the missing voxels as 0).
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
    if len(header.dims) >= 3:
        _check_nifti_affines(header, path.name)
    _check_nifti_scaling(header, path.name)
    if not nifti_complete(path, header):
        raise DagmanInputError(f"{path.name} is truncated or corrupt: its data end before the header says they do")
    return header


_FIX_HEADER = "fix the header (e.g. rewrite it with nibabel or 3D Slicer)"


def _check_nifti_affines(header: NiftiHeader, name: str) -> None:
    """Refuse a header whose voxel size (pixdim), sform and qform do not describe the same grid.

    What ITK 5.4 (SimpleITK 2.5) reads: the voxel size always from pixdim[1..3] (absolute values), whatever the
    sform says (it only warns "unexpected scales in sform" on stderr); the direction and origin from the sform
    when it is orthonormal and qform_code is 0, or sform_code is 1 (scanner), or the two agree within 1e-4;
    otherwise from the qform (qform_code > 0). So with qform_code 1 and sform_code 2 (aligned), 3 or 4 (MNI) that
    disagree it reads the qform, with sform_code 1 the sform, and nibabel (which prefers the sform whenever
    sform_code > 0) may place the same file elsewhere. Files whose qform and sform are float32 copies of one
    geometry (SimpleITK, nibabel, dcm2niix, TotalSegmentator write both) agree within the tolerances.
    """
    sizes = np.abs(np.asarray(header.pixdim[:3], dtype=float))
    # 1. The sform's voxel size (the lengths of its first three columns) against pixdim, when the sform is set:
    #    ITK takes pixdim, nibabel and 3D Slicer the sform, so a file where they differ has no one voxel size.
    if header.sform_code > 0:
        implied = np.linalg.norm(header.srow[:, :3], axis=0)
        if not np.allclose(implied, sizes, rtol=NIFTI_VOXEL_SIZE_RTOL, atol=NIFTI_VOXEL_SIZE_ATOL_MM):
            raise DagmanInputError(
                f"{name}: the header's voxel size disagrees with itself: sform {_mm(implied)} mm, pixdim "
                f"{_mm(sizes)} mm; {_FIX_HEADER}"
            )
    # 2. The qform's axes and origin against the sform's, when both are set: ITK picks one by the codes (see
    #    above), other readers by other rules, so a file where they differ is placed differently by each.
    if header.qform_code > 0 and header.sform_code > 0:
        q_axes, q_origin = _qform(header)
        s_axes = header.srow[:, :3] / np.linalg.norm(header.srow[:, :3], axis=0)
        s_origin = header.srow[:, 3]
        cosines = np.clip(np.sum(q_axes * s_axes, axis=0), -1.0, 1.0)
        degrees = float(np.degrees(np.arccos(cosines)).max())
        apart = float(np.linalg.norm(q_origin - s_origin))
        allowed = NIFTI_QFORM_SFORM_MM + 1e-5 * max(np.linalg.norm(q_origin), np.linalg.norm(s_origin))
        if not degrees <= NIFTI_QFORM_SFORM_DEGREES or not apart <= allowed:
            used = "sform" if header.sform_code == 1 else "qform"
            raise DagmanInputError(
                f"{name}: the header's two affines disagree: qform (code {header.qform_code}) and sform (code "
                f"{header.sform_code}) axes {degrees:.3g} degrees and origins {apart:.3g} mm apart (ITK would "
                f"read the {used}); {_FIX_HEADER}"
            )


def _mm(sizes: np.ndarray) -> str:
    return " x ".join(f"{s:.4g}" for s in sizes)


def _qform(header: NiftiHeader) -> tuple[np.ndarray, np.ndarray]:
    """The unit axes (columns) and origin of the qform, computed as niftilib's ``nifti_quatern_to_mat44`` does
    (non-finite fields read as 0, as niftilib's ``FIXED_FLOAT`` does)."""
    b, c, d, *offset = (v if np.isfinite(v) else 0.0 for v in header.quatern)
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:  # a 180-degree rotation (or a quaternion too long): niftilib normalises (b, c, d), a = 0
        norm = np.sqrt(b * b + c * c + d * d)
        b, c, d = (b / norm, c / norm, d / norm) if norm > 0 else (0.0, 0.0, 0.0)
        a = 0.0
    else:
        a = np.sqrt(a)
    rotation = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])  # fmt: skip
    rotation[:, 2] *= header.qfac
    return rotation, np.array(offset, dtype=float)


def _check_nifti_scaling(header: NiftiHeader, name: str) -> None:
    """Refuse a ``scl_slope``/``scl_inter`` that ITK would apply otherwise than the NIfTI standard says.

    The standard: values = stored * scl_slope + scl_inter, unless scl_slope is 0 (no scaling at all; nibabel also
    takes NaN, which it writes, as no scaling). What ITK 5.4 does: niftilib reads a NaN or infinite slope or
    intercept as 0; then a slope of 0 (or below 2.2e-16 in size) becomes 1, and the intercept is still added. So
    slope 0 or NaN with an intercept of -1024 gives values 1024 lower than the standard says, a slope of 1e-20
    is taken as 1, and a NaN intercept as 0 (nibabel refuses it). Slope 0 or NaN with intercept 0 or NaN, and any
    finite slope with a finite intercept, are read as the standard says.
    """
    slope, inter = header.scl_slope, header.scl_inter
    if np.isinf(slope):
        raise DagmanInputError(f"{name}: the header's scl_slope is {slope:g}, not a scale factor; {_FIX_HEADER}")
    if header.scaled and not np.isfinite(inter):
        raise DagmanInputError(
            f"{name}: the header's scl_inter is {inter:g} (with scl_slope {slope:g}), not a number; {_FIX_HEADER}"
        )
    if header.scaled and abs(slope) < _EPS:
        raise DagmanInputError(
            f"{name}: the header's scl_slope {slope:g} is too small for ITK, which would read it as 1; {_FIX_HEADER}"
        )
    if not header.scaled and np.isfinite(inter) and abs(inter) > _EPS:
        raise DagmanInputError(
            f"{name}: the header's scl_slope is {slope:g} (no scaling, says the NIfTI standard) but its scl_inter "
            f"is {inter:g}, which ITK would add anyway; set scl_slope to 1 or scl_inter to 0"
        )


def check_nifti_values(name: str, array: np.ndarray, header: NiftiHeader) -> None:
    """Refuse a NIfTI whose values, once ITK has applied ``scl_slope``/``scl_inter``, cannot be Hounsfield units.

    Only when the scaling changes the values (a file without scaling holds what it holds). ``array`` is what ITK
    read (a view will do); NaN is ignored, and infinite values stored in a float file are left to the NaN check.
    """
    if not header.scaling_applied or array.size == 0:
        return
    low, high = float(np.fmin.reduce(array, axis=None)), float(np.fmax.reduce(array, axis=None))
    if not (np.isfinite(low) and np.isfinite(high)) and header.datatype in _NIFTI_FLOATS:
        finite = np.isfinite(array)
        if not finite.any():
            return
        low = float(np.min(array, where=finite, initial=np.inf))
        high = float(np.max(array, where=finite, initial=-np.inf))
    if not (low >= -NIFTI_VALUE_LIMIT and high <= NIFTI_VALUE_LIMIT):
        raise DagmanInputError(
            f"{name}: its values span {low:.3g} to {high:.3g} (scl_slope {header.scl_slope:g}, scl_inter "
            f"{header.scl_inter:g}): not Hounsfield units; check the header's scl_slope/scl_inter"
        )


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
    _metaimage_direction(fields, len(dims), path.name)
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


def _metaimage_direction(fields: dict[str, str], ndims: int, name: str) -> None:
    """Refuse a direction matrix (``TransformMatrix``, or its aliases) that is singular or not finite: ITK fails on
    it with the matrix's last row as its only word. One that is not numbers at all is left to ITK."""
    key = next((k for k in ("TransformMatrix", "Rotation", "Orientation") if k in fields), None)
    if key is None:
        return
    text = fields[key]
    try:
        values = np.array([float(v) for v in text.split()], dtype=float)
    except ValueError:
        return
    if values.size != ndims * ndims:
        return
    matrix = values.reshape(ndims, ndims)
    if not np.all(np.isfinite(matrix)):
        raise DagmanInputError(f"{name}: its direction matrix ({key} {text}) is not finite")
    if abs(np.linalg.det(matrix)) < 1e-6:
        raise DagmanInputError(
            f"{name}: its direction matrix ({key} {text}) is singular: its axes do not span the volume's "
            "space, so the orientation of the voxels is unknown"
        )


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
