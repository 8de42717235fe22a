"""Reading and writing CT volumes and label maps with SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM).

Everything read is reoriented to LPS (see :mod:`napari_dagman.core.volume`); everything written gets the
orientation of its source back, so a label map saved from napari overlays the original file in 3D Slicer or
ITK-SNAP voxel for voxel.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from napari_dagman.core.dicom_io import (  # noqa: F401  (re-exported: the readers' callers use io)
    ANY_MODALITY_ENV,
    UNEVEN_SLICES_CHOICES,
    UNEVEN_SLICES_ENV,
    DicomSeries,
    any_modality_allowed,
    check_dicom_file,
    itk_reason,
    list_dicom_series,
    quiet_itk,
    read_series_image,
)
from napari_dagman.core.errors import DagmanInputError, LabelMapAsCTError, env_flag
from napari_dagman.core.files import (  # noqa: F401  (re-exported: the writers and readers' callers use io)
    atomic_write,
    atomic_write_text,
    check_output_file,
    check_output_folder,
    is_temporary,
    publish,
    remove_temporaries,
    stem_of,
    suffix_of,
)
from napari_dagman.core.headers import (
    check_metaimage,
    check_nifti,
    check_nifti_values,
    nifti_complete,
    nifti_non_finite,
)
from napari_dagman.core.volume import Volume

#: File name endings that SimpleITK reads as 3D volumes here.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
#: Endings the writer accepts (single-file formats, so the write can be atomic).
WRITE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")
#: Largest number of distinct values an integer volume may hold to be treated as a label map.
MAX_LABEL_VALUES = 1024


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
def read_volumes(
    path: str | os.PathLike, *, uneven_slices: str | None = None, any_modality: bool | None = None
) -> list[Volume]:
    """Read a file, or every DICOM series in a folder, as LPS-oriented volumes.

    ``uneven_slices`` says what to do with a DICOM series whose slices are not evenly spaced (a missing or
    unreadable file): "refuse" or "resample" (interpolate onto even slices; the volume's ``metadata["notes"]``
    says so); default: ``$NAPARI_DAGMAN_UNEVEN_SLICES``, else refuse. ``any_modality`` reads DICOM that says it
    is not CT (MR, PET, ...; refused by default); default: ``$NAPARI_DAGMAN_ANY_MODALITY`` set to 1.

    Raises
    ------
    DagmanInputError
        When the path does not exist, is not a readable 3D single-channel volume, is a folder without DICOM
        series, or its header or slices give a geometry that cannot be trusted (voxel size 0 or NaN, a sheared
        grid, uneven DICOM slices), a DICOM header does not say where a slice lies or what its values are
        (ImagePositionPatient, ImageOrientationPatient, RescaleSlope/Intercept), it is not CT, or its data are cut
        short.
    """
    path = Path(path)
    if not path.exists():
        raise DagmanInputError(f"{path} does not exist")
    if path.is_dir():
        policy = uneven_slices or os.environ.get(UNEVEN_SLICES_ENV) or "refuse"
        if policy not in UNEVEN_SLICES_CHOICES:
            raise DagmanInputError(
                f"{UNEVEN_SLICES_ENV} must be one of {', '.join(UNEVEN_SLICES_CHOICES)}, got '{policy}'"
            )
        series = list_dicom_series(path)
        if not series:
            raise DagmanInputError(f"no DICOM series found in folder {path}")
        allowed = any_modality_allowed(any_modality)
        return [from_sitk(*read_series_image(s, path, policy, allowed)) for s in series]
    if path.stat().st_size == 0:
        raise DagmanInputError(f"{path.name} is an empty file")
    suffix = suffix_of(path)
    # checked before ITK reads the data: it would read wrong geometry or zeros without a word
    header = check_nifti(path) if suffix in (".nii", ".nii.gz") else None
    if suffix in (".mha", ".mhd"):
        check_metaimage(path)
    notes: list[str] = []
    dicom = suffix == ".dcm" or looks_like_dicom(path)
    tags, segmentation = check_dicom_file(path, any_modality_allowed(any_modality), notes) if dicom else ({}, False)
    if segmentation:  # a DICOM SEG, not a CT: its segments on its own geometry
        from napari_dagman.core.segmentation.dicom_seg import read_dicom_seg

        return [read_dicom_seg(path)]
    try:
        with quiet_itk():
            image = _itk_read(path)
    except RuntimeError as err:
        if "Unable to determine ImageIO reader" in str(err):
            raise DagmanInputError(
                f"cannot read {path.name}: not an image file (NIfTI, NRRD, MHA/MHD or DICOM) despite its name"
            ) from None
        reason = itk_reason(err)
        if "No such file or directory" in reason:  # ITK's stale errno: the file is there, its data are not
            reason = "its data cannot be read"
        raise DagmanInputError(f"cannot read {path.name}: broken or truncated file ({reason})") from None
    if header is not None:
        image = _restore_non_finite(image, path, header)
        check_nifti_values(path.name, sitk.GetArrayViewFromImage(image), header)  # scl_slope/inter gave HU?
    meta: dict[str, Any] = {"source_path": str(path), "name": stem_of(path), **tags}
    if notes:
        meta["notes"] = notes
    try:
        volume = from_sitk(image, meta)
    except DagmanInputError as err:
        raise DagmanInputError(f"{path.name}: {err}") from None
    if is_label_map(volume):
        names = read_label_names(path)
        if names is not None:
            volume.metadata["label_names"] = names
        _note_unnamed(volume, path)
    return [volume]


def _note_unnamed(volume: Volume, path: Path) -> None:
    """Say once, in the volume's notes, which of its ids have no name (they are called ``label_<id>``)."""
    from napari_dagman.core.label_names import totalsegmentator_asked, unnamed_note
    from napari_dagman.core.segmentation.labels import present_ids

    if totalsegmentator_asked():
        return
    named = volume.metadata.get("label_names") or {}
    unnamed = [i for i in present_ids(volume.array) if i not in named]
    if unnamed:
        volume.metadata.setdefault("notes", []).append(unnamed_note(unnamed, path.name))


def _itk_read(path: Path) -> sitk.Image:
    """``sitk.ReadImage``, except that a ``.nii.gz`` beside a ``.nii`` of the same name is read, not its twin.

    niftilib looks for the uncompressed name first: asked for ``ct.nii.gz`` it reads ``ct.nii`` when that exists,
    without a word. The file is then read through a link of another name in a folder of its own.
    """
    twin = path.with_name(stem_of(path) + ".nii")
    if suffix_of(path) != ".nii.gz" or not twin.exists():
        return sitk.ReadImage(str(path))
    with tempfile.TemporaryDirectory(prefix="dagman-read-") as folder:
        link = Path(folder) / "volume.nii.gz"
        try:
            link.symlink_to(path.resolve())
        except OSError:
            raise DagmanInputError(
                f"{path.name} lies beside {twin.name}, which ITK would read in its place; rename one of them"
            ) from None
        return sitk.ReadImage(str(link))


def _restore_non_finite(image: sitk.Image, path: Path, header: Any) -> sitk.Image:
    """Put back the NaN/infinite voxels of a float NIfTI file, which ITK reads as 0 (so the NaN check sees them)."""
    indices, values = nifti_non_finite(path, header)
    if not indices.size:
        return image
    array = sitk.GetArrayFromImage(image)
    if indices.max() >= array.size:
        return image
    array.reshape(-1)[indices] = values.astype(array.dtype)
    restored = sitk.GetImageFromArray(array, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    restored.CopyInformation(image)
    return restored


def expand_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """The CT images in ``paths`` and what was left out (`core.datasets.find_cases`): files stay, a DICOM folder is
    one series, other folders are searched recursively, a dataset.json or a list gives its images; label maps
    known by their place (labelsTr/) or name (``case_seg.nii.gz`` beside ``case.nii.gz``) are left out."""
    from napari_dagman.core.datasets import find_cases

    cohort = find_cases([str(p) for p in paths], labels=False)
    return [case.image for case in cohort.cases], list(cohort.notes)


def read_volume(
    path: str | os.PathLike, *, uneven_slices: str | None = None, any_modality: bool | None = None
) -> Volume:
    """Read exactly one volume; a folder holding several DICOM series is an error (name the series)."""
    volumes = read_volumes(path, uneven_slices=uneven_slices, any_modality=any_modality)
    if len(volumes) > 1:
        names = ", ".join(repr(v.metadata.get("name")) for v in volumes)
        raise DagmanInputError(
            f"{path} holds {len(volumes)} DICOM series ({names}); choose one folder per series"
        )
    return volumes[0]


# --- label maps -------------------------------------------------------------------------------------------
#: Set to 1 to read an image that looks like a label map as a CT anyway (napari: the CT window dock's 'it is a CT').
IMAGE_IS_CT_ENV = "NAPARI_DAGMAN_IMAGE_IS_CT"


def label_map_message(volume: Volume, what: str | None = None) -> str | None:
    """The refusal for an "image" that holds a label map (whole numbers, few distinct values), else None: one rule
    for the CLI, the docks and the jobs. A volume marked ``is_ct`` (a layer the user says is a CT) or
    ``$NAPARI_DAGMAN_IMAGE_IS_CT=1`` passes: a CT stored with few grey values exists."""
    if volume.metadata.get("is_ct") or env_flag(IMAGE_IS_CT_ENV):
        return None
    if not is_label_map(volume) or np.ptp(volume.array) == 0:  # a constant volume is refused as such elsewhere
        return None
    what = what or f"'{volume.metadata.get('source_path') or volume.metadata.get('name') or 'an image'}'"
    values = np.unique(volume.array)
    return (
        f"{what} looks like a label map, not a CT ({len(values)} distinct whole numbers from {values.min()} to "
        f"{values.max()}): choose the CT as the image, or, if it is one, set {IMAGE_IS_CT_ENV}=1 (in napari: "
        "'it is a CT' in the CT window dock)"
    )


def check_ct(volume: Volume, what: str | None = None) -> Volume:
    """``volume`` when it can be a CT; a label map given as the CT is refused (`label_map_message`): trained on, it
    teaches nothing, and segmented, it gives nonsense. One rule for the CLI, the docks and the jobs."""
    message = label_map_message(volume, what)
    if message:
        raise LabelMapAsCTError(message)
    return volume


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
    """Id -> name of a label file, never guessed (`core.label_names`): its ``<stem>.labels.json``, the label table
    in its NIfTI header (TotalSegmentator's), a ``labels.json`` in its folder, or an MSD/nnU-Net dataset.json."""
    from napari_dagman.core.label_names import dataset_json_names, header_label_names

    path = Path(path)
    side = sidecar_path(path)
    if side.is_file():
        return _names_file(side)
    header = header_label_names(path)
    if header:
        return header
    folder = path.with_name("labels.json")
    if folder.is_file():
        return _names_file(folder)
    return dataset_json_names(path)


def _names_file(path: Path) -> dict[int, str]:
    from napari_dagman.core.files import read_json

    raw = read_json(path)
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError):
        raise DagmanInputError(f"{path} is not a JSON object of label id -> name") from None


# --- writing ----------------------------------------------------------------------------------------------
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
        raise DagmanInputError(f"cannot write {path}: {itk_reason(err)}") from None

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as err:
            raise DagmanInputError(itk_reason(err)) from None

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
        raise DagmanInputError(f"the written file does not read back ({itk_reason(err)})") from None
    if tuple(reader.GetSize()) != tuple(size):
        raise DagmanInputError(f"the written file has size {reader.GetSize()}, not {size}")
    if suffix_of(path) in (".nii", ".nii.gz") and not nifti_complete(path):
        raise DagmanInputError("the written file is incomplete (is the disk full?)")


# --- resampling -------------------------------------------------------------------------------------------
def padding_value(volume: Volume, *, is_label: bool) -> float:
    """What fills the part of a resampled grid outside the volume: background (0) for labels, and for images
    the volume's own minimum (air, or the scanner's outside-the-field value, in a CT), never water (0 HU)."""
    if is_label or volume.array.size == 0:
        return 0.0
    return float(np.min(volume.array))


def resample_like(
    volume: Volume, reference: Volume, *, is_label: bool, default: float | None = None
) -> Volume:
    """Resample ``volume`` onto the grid of ``reference`` in physical space (nearest for labels).

    Outside ``volume`` the grid gets ``default``, by default `padding_value` (the image's minimum, 0 for labels).
    """
    moving = to_sitk(volume, restore_orientation=False)
    ref = to_sitk(reference.with_array(np.zeros(reference.shape, np.uint8)), restore_orientation=False)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    fill = padding_value(volume, is_label=is_label) if default is None else float(default)
    out = sitk.Resample(moving, ref, sitk.Transform(), interp, fill, moving.GetPixelID())
    meta = dict(volume.metadata)
    return Volume(
        sitk.GetArrayFromImage(out), reference.spacing, reference.origin, reference.direction.copy(), meta
    )


def resample_to_spacing(volume: Volume, spacing: tuple[float, float, float], *, is_label: bool) -> Volume:
    """Resample to a new voxel spacing (z, y, x mm) covering the same physical extent.

    Every new voxel centre lies within the old voxels' edges, but ITK counts a centre exactly on the last edge as
    outside and would give it the fill value (a one-voxel slab of 0 HU on a 3 -> 2 mm CT); the nearest voxel
    is taken there instead.
    """
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
        padding_value(volume, is_label=is_label),
        image.GetPixelID(),
        True,  # useNearestNeighborExtrapolator: the edge voxels, not a fill value, at the edges
    )
    return Volume(
        sitk.GetArrayFromImage(out),
        spacing,
        tuple(np.asarray(out.GetOrigin())[::-1]),
        volume.direction.copy(),
        dict(volume.metadata),
    )
