"""Reading and writing CT volumes and label maps with SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM).

Everything read is reoriented to LPS (see :mod:`napari_dagman.core.volume`); everything written gets the
orientation of its source back, so a label map saved from napari overlays the original file in 3D Slicer or
ITK-SNAP voxel for voxel.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.volume import Volume

#: File name endings that SimpleITK reads as 3D volumes here.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
#: Endings the writer accepts (single-file formats, so the write can be atomic).
WRITE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")
#: Largest number of distinct values an integer volume may hold to be treated as a label map.
MAX_LABEL_VALUES = 1024

_DICOM_TAGS = {
    "0008|103e": "series_description",
    "0008|0060": "modality",
    "0020|0011": "series_number",
    "0020|000e": "series_uid",
    "0010|0020": "patient_id",
    "0008|0020": "study_date",
}


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case file ending, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike) -> str:
    """File name without its (possibly double) suffix."""
    name = Path(path).name
    suffix = suffix_of(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def is_volume_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and suffix_of(path) in VOLUME_SUFFIXES


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """Cheap check: the 'DICM' magic at byte 128 (part 10 files)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def folder_has_dicom(folder: str | os.PathLike, *, max_files: int = 64) -> bool:
    """True when one of the first ``max_files`` files of ``folder`` is a DICOM file (cheap, no full scan)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for n, entry in enumerate(sorted(folder.iterdir())):
        if n >= max_files:
            break
        if entry.is_file() and looks_like_dicom(entry):
            return True
    return False


# --- SimpleITK <-> Volume ---------------------------------------------------------------------------------
def _zyx_matrix(direction_xyz: Iterable[float]) -> np.ndarray:
    """SimpleITK's row-major x-y-z direction cosines -> the z-y-x matrix used by `Volume`."""
    d = np.asarray(tuple(direction_xyz), dtype=float).reshape(3, 3)
    return d[::-1, ::-1].copy()


def _xyz_tuple(direction_zyx: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(direction_zyx)[::-1, ::-1].ravel())


def orientation_code(image: sitk.Image) -> str:
    """Three-letter orientation code of an image, in SimpleITK's naming."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def from_sitk(image: sitk.Image, metadata: dict[str, Any] | None = None, *, reorient: bool = True) -> Volume:
    """Convert a SimpleITK image to a `Volume`, reoriented to LPS unless ``reorient`` is False."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DagmanInputError(
            f"expected a single-channel (grey-value) CT, got {image.GetNumberOfComponentsPerPixel()} "
            "components per voxel (RGB or vector image)"
        )
    dim = image.GetDimension()
    if dim != 3:
        if dim == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise DagmanInputError(f"expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    meta = dict(metadata or {})
    meta.setdefault("source_orientation", orientation_code(image))
    meta.setdefault("source_spacing", list(image.GetSpacing())[::-1])
    meta.setdefault("source_origin", list(image.GetOrigin())[::-1])
    meta.setdefault("source_direction", _zyx_matrix(image.GetDirection()).tolist())
    if reorient and meta["source_orientation"] != "LPS":
        image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image)
    return Volume(
        array,
        spacing=image.GetSpacing()[::-1],
        origin=image.GetOrigin()[::-1],
        direction=_zyx_matrix(image.GetDirection()),
        metadata=meta,
    )


def to_sitk(volume: Volume, *, restore_orientation: bool = True) -> sitk.Image:
    """Convert a `Volume` to SimpleITK, back in its source orientation when known."""
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in volume.origin[::-1]))
    image.SetDirection(_xyz_tuple(volume.direction))
    source = volume.metadata.get("source_orientation")
    if restore_orientation and source and source != orientation_code(image):
        image = sitk.DICOMOrient(image, str(source))
    return image


# --- reading ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    files: tuple[str, ...]
    description: str
    number: str = ""

    @property
    def name(self) -> str:
        label = self.description or (f"series {self.number}" if self.number else "DICOM series")
        return f"{label} ({len(self.files)} slices)"


def _dicom_tags(file: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    return {
        key: reader.GetMetaData(tag).strip() for tag, key in _DICOM_TAGS.items() if reader.HasMetaDataKey(tag)
    }


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """All DICOM series directly inside ``folder`` (one entry per SeriesInstanceUID)."""
    folder = str(folder)
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    series = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        if not files:
            continue
        try:
            tags = _dicom_tags(files[0])
        except RuntimeError:
            tags = {}
        series.append(
            DicomSeries(uid, files, tags.get("series_description", ""), tags.get("series_number", ""))
        )
    return series


def _read_series(series: DicomSeries, folder: Path) -> Volume:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise DagmanInputError(
            f"cannot read DICOM series '{series.name}' in {folder}: {_first_line(err)}"
        ) from None
    try:
        tags = _dicom_tags(series.files[0])
    except RuntimeError:
        tags = {}
    meta: dict[str, Any] = {"source_path": str(folder), "name": series.description or folder.name, **tags}
    meta["series_uid"] = series.uid
    return from_sitk(image, meta)


def _first_line(err: BaseException) -> str:
    """SimpleITK errors are multi-line C++ traces; keep the informative last line."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def read_volumes(path: str | os.PathLike) -> list[Volume]:
    """Read a file, or every DICOM series in a folder, as LPS-oriented volumes.

    Raises
    ------
    DagmanInputError
        When the path does not exist, is not a readable 3D single-channel volume, or is a folder without
        DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise DagmanInputError(f"{path} does not exist")
    if path.is_dir():
        series = list_dicom_series(path)
        if not series:
            raise DagmanInputError(f"no DICOM series found in folder {path}")
        return [_read_series(s, path) for s in series]
    if path.stat().st_size == 0:
        raise DagmanInputError(f"{path.name} is an empty file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        if "Unable to determine ImageIO reader" in str(err):
            raise DagmanInputError(
                f"cannot read {path.name}: not an image file (NIfTI, NRRD, MHA/MHD or DICOM) despite its name"
            ) from None
        raise DagmanInputError(
            f"cannot read {path.name}: broken or truncated file ({_first_line(err)})"
        ) from None
    if suffix_of(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    meta: dict[str, Any] = {"source_path": str(path), "name": stem_of(path)}
    if suffix_of(path) == ".dcm" or looks_like_dicom(path):
        with contextlib.suppress(RuntimeError):
            meta.update(_dicom_tags(str(path)))
    volume = from_sitk(image, meta)
    if is_label_map(volume):
        names = read_label_names(path)
        if names is not None:
            volume.metadata["label_names"] = names
    return [volume]


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Files stay; a folder of volume files becomes its files; a DICOM folder stays a folder (one series)."""
    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not folder_has_dicom(path):
            files = sorted(str(f) for f in path.iterdir() if is_volume_file(f))
            if not files:
                raise DagmanInputError(
                    f"folder {path} holds no CT volumes (NIfTI, NRRD, MHA) and no DICOM series"
                )
            out.extend(files)
        else:
            out.append(str(path))
    return out


def _check_nifti_complete(path: Path) -> None:
    """Refuse truncated NIfTI files, which ITK reads without complaint (the missing voxels become 0)."""
    if not _nifti_complete(path):
        raise DagmanInputError(
            f"{path.name} is truncated or corrupt: its data end before the header says they do"
        )


def _nifti_complete(path: Path) -> bool:
    """Whether a NIfTI file holds all the data its header announces.

    The expected size is the header's data offset plus voxels x bytes per voxel; for ``.nii.gz`` it is compared
    with the gzip trailer (uncompressed size modulo 2**32), which a cut file does not have.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        ndim = int(reader.GetMetaData("dim[0]"))
        voxels = int(np.prod([int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]))
        expected = (
            int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
        )
    except (RuntimeError, ValueError):
        return True  # not enough header information to check; SimpleITK has read what it could
    if suffix_of(path) == ".nii.gz":
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            stored = int.from_bytes(fh.read(4), "little")
        return stored == expected % 2**32
    return path.stat().st_size >= expected


def read_volume(path: str | os.PathLike) -> Volume:
    """Read exactly one volume; a folder holding several DICOM series is an error (name the series)."""
    volumes = read_volumes(path)
    if len(volumes) > 1:
        names = ", ".join(repr(v.metadata.get("name")) for v in volumes)
        raise DagmanInputError(
            f"{path} holds {len(volumes)} DICOM series ({names}); choose one folder per series"
        )
    return volumes[0]


# --- label maps -------------------------------------------------------------------------------------------
def is_label_map(volume: Volume) -> bool:
    """Integer, non-negative, few distinct values: a segmentation rather than a CT."""
    arr = volume.array
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        return False
    if arr.size == 0 or arr.min() < 0:
        return False
    if int(arr.max()) > 65535:
        return False
    return len(np.unique(arr)) <= MAX_LABEL_VALUES


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<stem>.labels.json`` next to a label file: where its id -> name table is written."""
    path = Path(path)
    return path.with_name(stem_of(path) + ".labels.json")


def read_label_names(path: str | os.PathLike) -> dict[int, str] | None:
    """Id -> name from ``<stem>.labels.json`` or, failing that, a ``labels.json`` in the same folder."""
    path = Path(path)
    for candidate in (sidecar_path(path), path.with_name("labels.json")):
        if candidate.is_file():
            try:
                raw = json.loads(candidate.read_text())
                return {int(k): str(v) for k, v in raw.items()}
            except (ValueError, AttributeError, TypeError):
                raise DagmanInputError(f"{candidate} is not a JSON object of label id -> name") from None
    return None


# --- writing ----------------------------------------------------------------------------------------------
def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    *,
    verify: Callable[[Path], object] | None = None,
    suffix: str | None = None,
) -> Path:
    """Write ``path`` completely or not at all: the project's one way to write a whole file.

    ``write(tmp)`` fills a temporary file in the target's folder whose name ends like the target (or in
    ``suffix``), so writers that choose the format by extension (SimpleITK, numpy) write the right one.
    ``verify(tmp)``, when given, checks what was written and raises if it is wrong. The file is then fsynced,
    given the permissions of a plain ``open()`` and renamed onto ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was. An `OSError` (disk full, no
    permission, read-only file system) or a `DagmanError` from ``write``/``verify`` (whose message is the
    reason) is raised as one line, ``cannot write <path>: <reason>``, of the same `DagmanError` class
    (`DagmanInputError` for an `OSError`).
    """
    path = Path(path)
    ending = suffix_of(path) if suffix is None else suffix
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # hidden, and ".tmp" before the ending: a leftover from a killed process is recognisable as one
        fd, name = tempfile.mkstemp(prefix=f".{stem_of(path)}.", suffix=f".tmp{ending}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        if verify is not None:
            verify(tmp)
        publish(tmp, path)
        tmp = None  # renamed into place: nothing left to clean up
    except OSError as err:
        raise DagmanInputError(f"cannot write {path}: {_os_reason(err, path.parent)}") from None
    except DagmanError as err:
        raise type(err)(f"cannot write {path}: {err}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # gone with its folder: nothing more to clean
                tmp.unlink()
    return path


def _os_reason(err: OSError, folder: Path) -> str:
    """The system's reason, naming the file concerned when it lies outside the target's folder (a parent)."""
    reason = err.strerror or str(err)
    if isinstance(err.filename, (str, bytes, os.PathLike)):
        concerned = Path(os.fsdecode(err.filename))
        if concerned.parent != folder:
            return f"{reason} ({concerned})"
    return reason


def _umask_mode() -> int:
    """Permissions a normal ``open()`` would give a new file (mkstemp's are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync a finished temporary file, give it normal permissions and rename it onto ``path``.

    The last step of `atomic_write`; the caller removes ``tmp`` when this raises.
    """
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file and a rename (see `atomic_write`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_volume(
    volume: Volume,
    path: str | os.PathLike,
    *,
    label_names: dict[int, str] | None = None,
    compress: bool = True,
) -> list[str]:
    """Write a volume (in its source orientation) and, for label maps, a ``.labels.json`` sidecar.

    The file is written to a temporary name, checked and renamed, so an interrupted write or a full disk never
    leaves a broken file. Returns the paths written.
    """
    path = Path(path)
    if suffix_of(path) not in WRITE_SUFFIXES:
        raise DagmanInputError(f"cannot write '{path.name}': use one of {', '.join(WRITE_SUFFIXES)}")
    try:
        image = to_sitk(volume)
    except RuntimeError as err:
        raise DagmanInputError(f"cannot write {path}: {_first_line(err)}") from None

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as err:
            raise DagmanInputError(_first_line(err)) from None

    atomic_write(path, write, verify=lambda tmp: _verify_volume(tmp, image.GetSize()))
    written = [str(path)]
    if label_names:
        side = sidecar_path(path)
        atomic_write_text(side, json.dumps({str(k): v for k, v in sorted(label_names.items())}, indent=1))
        written.append(str(side))
    return written


def _verify_volume(path: Path, size: tuple[int, ...]) -> None:
    """Read back the header of a volume just written and check that all its data are there.

    SimpleITK's NIfTI writer does not report a full disk (the file just ends early, and reads back with zeros),
    so a write is only trusted once the file says it is complete.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DagmanInputError(f"the written file does not read back ({_first_line(err)})") from None
    if tuple(reader.GetSize()) != tuple(size):
        raise DagmanInputError(f"the written file has size {reader.GetSize()}, not {size}")
    if suffix_of(path) in (".nii", ".nii.gz") and not _nifti_complete(path):
        raise DagmanInputError("the written file is incomplete (is the disk full?)")


# --- resampling -------------------------------------------------------------------------------------------
def resample_like(volume: Volume, reference: Volume, *, is_label: bool, default: float = 0.0) -> Volume:
    """Resample ``volume`` onto the grid of ``reference`` in physical space (nearest for labels)."""
    moving = to_sitk(volume, restore_orientation=False)
    ref = to_sitk(reference.with_array(np.zeros(reference.shape, np.uint8)), restore_orientation=False)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    out = sitk.Resample(moving, ref, sitk.Transform(), interp, default, moving.GetPixelID())
    meta = dict(volume.metadata)
    return Volume(
        sitk.GetArrayFromImage(out), reference.spacing, reference.origin, reference.direction.copy(), meta
    )


def resample_to_spacing(volume: Volume, spacing: tuple[float, float, float], *, is_label: bool) -> Volume:
    """Resample to a new voxel spacing (z, y, x mm) covering the same physical extent."""
    spacing = tuple(float(s) for s in spacing)
    if np.allclose(spacing, volume.spacing):
        return volume
    image = to_sitk(volume, restore_orientation=False)
    old_size = np.array(image.GetSize(), dtype=float)
    old_sp = np.array(image.GetSpacing(), dtype=float)
    new_sp = np.array(spacing[::-1], dtype=float)
    new_size = [max(1, int(round(n))) for n in old_size * old_sp / new_sp]
    # keep the physical centre of the first voxel edge: shift the origin by half the spacing change
    dir_xyz = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + dir_xyz @ ((new_sp - old_sp) / 2.0)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    out = sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        interp,
        tuple(origin),
        tuple(new_sp),
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )
    return Volume(
        sitk.GetArrayFromImage(out),
        spacing,
        tuple(np.asarray(out.GetOrigin())[::-1]),
        volume.direction.copy(),
        dict(volume.metadata),
    )
