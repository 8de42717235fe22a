"""Reading a DICOM series with SimpleITK once its headers are checked (`core.dicom_headers`): the series of a
folder, each with the slices of its volume (localizers and slices of another size left out), its modality, and
slices that are unevenly spaced refused or interpolated onto even ones. `core.io.read_volumes` makes the volume.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from napari_dagman.core.dicom_headers import (
    DicomSlice,
    check_dicom_slices,
    dicom_rescale,
    dicom_volume_slices,
    even_slices,
    slice_geometry,
)
from napari_dagman.core.errors import DagmanInputError, env_flag

#: What to do with a DICOM series whose slices are unevenly spaced when the caller does not say: "refuse"
#: (default) or "resample" (interpolate onto even slices, with a note). Read from this environment variable.
UNEVEN_SLICES_ENV = "NAPARI_DAGMAN_UNEVEN_SLICES"
UNEVEN_SLICES_CHOICES = ("refuse", "resample")
#: Set to 1 to read DICOM of a modality other than CT (MR, PET, ...) when the caller does not say; by default it
#: is refused: the models here are trained on and for CT, in HU.
ANY_MODALITY_ENV = "NAPARI_DAGMAN_ANY_MODALITY"

_DICOM_TAGS = {
    "0008|103e": "series_description",
    "0008|0060": "modality",
    "0020|0011": "series_number",
    "0020|000e": "series_uid",
    "0010|0020": "patient_id",
    "0008|0020": "study_date",
    "0028|1050": "window_center",
    "0028|1051": "window_width",
}


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    files: tuple[str, ...]  # the slices of the volume, in stacking order (localizers and odd sizes left out)
    description: str
    number: str = ""
    notes: tuple[str, ...] = ()  # what was left out, and why
    headers: tuple[DicomSlice, ...] = field(default=(), compare=False, repr=False)  # of ``files``, in order

    @property
    def name(self) -> str:
        label = self.description or (f"series {self.number}" if self.number else "DICOM series")
        return f"{label} ({len(self.files)} slices)"


def dicom_tags(file: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    return {
        key: reader.GetMetaData(tag).strip() for tag, key in _DICOM_TAGS.items() if reader.HasMetaDataKey(tag)
    }


def _dicom_header(file: str) -> tuple[dict[str, str], DicomSlice]:
    """One file's descriptive tags (as `_dicom_tags`) and its `DicomSlice`, from one read of its header."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        return {}, DicomSlice(file, unreadable=itk_reason(err))

    def text(tag: str) -> str | None:
        return reader.GetMetaData(tag) if reader.HasMetaDataKey(tag) else None

    tags = {key: reader.GetMetaData(tag).strip() for tag, key in _DICOM_TAGS.items() if reader.HasMetaDataKey(tag)}
    size = reader.GetSize()
    return tags, DicomSlice(
        file,
        modality=text("0008|0060"),
        image_type=text("0008|0008") or "",
        position=text("0020|0032"),
        orientation=text("0020|0037"),
        size=(size[0], size[1]) if len(size) >= 2 else None,
        slope=text("0028|1053"),
        intercept=text("0028|1052"),
        sop_class=text("0008|0016"),
    )


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """All DICOM series directly inside ``folder`` (one entry per SeriesInstanceUID), each with the files of its
    volume: localizers and slices of another size are left out, with a note (see `dicom_volume_slices`)."""
    folder = str(folder)
    with quiet_itk():  # GDCM's "No Series were found" would reach stderr for a folder without DICOM
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    series = []
    for uid in uids:
        with quiet_itk():
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        if not files:
            continue
        read = [_dicom_header(f) for f in files]
        tags = read[0][0]
        listed = DicomSeries(uid, files, tags.get("series_description", ""), tags.get("series_number", ""))
        kept, notes = dicom_volume_slices([h for _, h in read], name=f"'{listed.name}' in {folder}")
        files = tuple(h.file for h in kept)
        series.append(replace(listed, files=files, notes=tuple(notes), headers=tuple(kept)))
    return series


def any_modality_allowed(value: bool | None) -> bool:
    """Whether DICOM of another modality than CT is read: ``value``, else ``$NAPARI_DAGMAN_ANY_MODALITY``."""
    return value if value is not None else env_flag(ANY_MODALITY_ENV)


def _check_modality(slices: Iterable[DicomSlice], what: str, any_modality: bool, notes: list[str]) -> None:
    """Refuse DICOM that says it is not CT, naming its modality (unless any is allowed); none said: a note."""
    said = [(s, (s.modality or "").strip().upper()) for s in slices]
    other = next(((s, m) for s, m in said if m and m != "CT"), None)
    if other is not None:
        modality = other[1]
        article = "an" if modality[0] in "AEFHILMNORSX" else "a"  # an MR, an RT, a PT, a US
        kind = f"{article} {modality} series ({other[0].name})" if len(said) > 1 else f"{article} {modality} image"
        if not any_modality:
            raise DagmanInputError(
                f"{what} is {kind}; this tool reads CT (values in HU); set {ANY_MODALITY_ENV}=1 to read it anyway"
            )
        notes.append(f"{what} is {kind}, read as asked although this tool is made for CT")
    elif not any(m for _, m in said):
        notes.append(f"{what} does not say its modality (no Modality (0008,0060)): read as CT")


def read_series_image(
    series: DicomSeries, folder: Path, uneven_slices: str, any_modality: bool
) -> tuple[sitk.Image, dict[str, Any]]:
    """The series' image as SimpleITK stacks it once its headers are checked (evenly spaced, or interpolated
    onto even slices), and its metadata (tags, notes); `core.io` makes the `Volume`."""
    name = f"'{series.name}' in {folder}"
    headers = series.headers or tuple(_dicom_header(f)[1] for f in series.files)
    notes = [f"DICOM series {name}: {note}" for note in series.notes]
    _check_modality(headers, f"DICOM series {name}", any_modality, notes)
    mixed_rescale = check_dicom_slices(headers, name=name)  # before the pixels: a refused series is not decoded
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    reader.MetaDataDictionaryArrayUpdateOn()  # every slice's position, without reading the files again
    if mixed_rescale:
        # ITK rescales each slice with its own slope and intercept, but into the pixel type the first slice's
        # needs: an integer type would round or overflow the others'
        reader.SetOutputPixelType(sitk.sitkFloat32)
        notes.append(
            f"DICOM series {name}: its slices have different RescaleSlope/RescaleIntercept; each slice was "
            "rescaled with its own (read as floating point)"
        )
    try:
        with quiet_itk():  # its warning about uneven slices is replaced by our check below
            image = reader.Execute()
    except RuntimeError as err:
        raise DagmanInputError(
            f"cannot read DICOM series '{series.name}' in {folder}: {itk_reason(err)}"
        ) from None
    image = _even_series(image, reader, f"'{series.name}' in {folder}", uneven_slices, notes)
    try:
        tags = dicom_tags(series.files[0])
    except RuntimeError:
        tags = {}
    meta: dict[str, Any] = {"source_path": str(folder), "name": series.description or folder.name, **tags}
    meta["series_uid"] = series.uid
    if notes:
        meta["notes"] = notes
    return image, meta


def _even_series(
    image: sitk.Image, reader: sitk.ImageSeriesReader, name: str, policy: str, notes: list[str]
) -> sitk.Image:
    """The series as read when its slices are evenly spaced; else refused, or interpolated onto even slices.

    ITK stacks the slices at their average distance, which puts every slice after a gap in the wrong place.
    """
    count = image.GetSize()[2] if image.GetDimension() == 3 else 0
    try:
        positions = [[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")] for k in range(count)]
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        return image  # no positions (a secondary capture): nothing to check
    if count < 2 or len(cosines) != 6 or any(len(p) != 3 for p in positions):
        return image
    normal = np.cross(cosines[:3], cosines[3:])
    if not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 0.5:
        raise DagmanInputError(
            f"DICOM series {name}: its slice orientation (ImageOrientationPatient) is broken"
        )
    geometry = slice_geometry(positions, normal, name=name)
    if geometry.uneven is None:
        return image
    if policy != "resample":
        raise DagmanInputError(
            f"DICOM series {name} has unevenly spaced slices: {geometry.uneven}; set {UNEVEN_SLICES_ENV}=resample "
            "to interpolate it onto even slices"
        )
    array = even_slices(sitk.GetArrayFromImage(image), geometry.distances, geometry.spacing)
    even = sitk.GetImageFromArray(array)
    even.SetOrigin(image.GetOrigin())
    even.SetDirection(image.GetDirection())
    even.SetSpacing((*image.GetSpacing()[:2], geometry.spacing))
    notes.append(
        f"DICOM series {name} has unevenly spaced slices ({geometry.uneven}); interpolated onto "
        f"{array.shape[0]} slices {geometry.spacing:.2f} mm apart"
    )
    return even


@contextlib.contextmanager
def quiet_itk():
    """ITK's own warnings off during a read: they reach the terminal as multi-line C++ traces, and every case
    they warn about (uneven slices, odd headers) is checked here and said in one line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def itk_reason(err: BaseException) -> str:
    """SimpleITK errors are multi-line C++ traces; keep the informative last line."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def check_dicom_file(path: Path, any_modality: bool, notes: list[str]) -> tuple[dict[str, str], bool]:
    """Refuse a single DICOM file that is not CT or whose rescale is not a number or 0 (ITK reads 1); its tags, and
    whether it is a DICOM Segmentation (read as a label map, not checked as a CT), from one read of its header."""
    tags, header = _dicom_header(str(path))
    if header.unreadable:
        return tags, False  # not DICOM after all, or broken: ITK says which
    if header.is_segmentation:
        return tags, True
    _check_modality([header], path.name, any_modality, notes)
    dicom_rescale(header, where=path.name)
    return tags, False
