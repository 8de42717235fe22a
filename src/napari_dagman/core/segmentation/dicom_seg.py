"""A prediction as a DICOM Segmentation (highdicom) over the DICOM series it was made from.

One binary segment per organ the run segments, labelled with the organ name and coded with SNOMED CT
(`segment_coding`: the organ's row of a coding table when there is one, `segment_codes`; else pydicom's SCT
dictionary, left/right as a modifier, and a generic "Tissue" code when the dictionary has no concept for the
organ; `coding_notes` says which). Frames are the source slices themselves: each references its source
instance (SOP Instance UID) and lies in that slice's geometry, so the object opens over the series in 3D
Slicer, OHIF or a PACS viewer.

De-identified series sometimes lack UIDs a SEG must carry. A blank SOP Instance/Class UID is taken from the
file's meta header (the standard makes them equal); a blank Study/Series Instance UID is replaced by one
derived from the instances' UIDs (the same for every export of that series) and said by `check_dicom_source`.

highdicom and pydicom are optional (``pip install napari-dagman[dicom]``); the imports are lazy.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.segmentation.segment_codes import SEGMENT_CODES_ENV, coding_table, coding_table_source
from napari_dagman.core.volume import Volume

INSTALL_HINT = "DICOM SEG needs highdicom: pip install 'napari-dagman[dicom]'"

#: Our organ names (TotalSegmentator's) whose SNOMED CT concept pydicom names differently.
SCT_KEYWORDS: dict[str, str] = {
    "small_bowel": "SmallIntestine",
    "urinary_bladder": "UrinaryBladderStructure",
    "thyroid_gland": "Thyroid",
    "clavicula": "Clavicle",
    "costal_cartilages": "CostalCartilage",
    "portal_vein_and_splenic_vein": "PortalVein",
    "iliac_vena": "IliacVein",
    "autochthon": "ErectorSpinaeMuscle",
    "lung_upper_lobe": "UpperLobeOfLung",
    "lung_lower_lobe": "LowerLobeOfLung",
    "lung_middle_lobe": "MiddleLobeOfRightLung",
    "atrial_appendage": "AuricularAppendage",
    "rib": "Rib",
}


@dataclass(frozen=True)
class SegmentCoding:
    """How a segment is coded: property category and type (SNOMED CT), laterality modifier, whether generic."""

    category: Any
    type: Any
    modifier: Any | None = None
    generic: bool = False


def require_highdicom() -> None:
    """Refuse, with one line, when highdicom (or pydicom) is not installed."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("highdicom", "pydicom")):
        raise DagmanInputError(INSTALL_HINT)


def _camel(words: list[str]) -> str:
    return "".join(w[:1].upper() + w[1:] for w in words)


def segment_coding(name: str, table: dict[str, Any] | None = None) -> SegmentCoding:
    """SNOMED CT coding of an organ name: its row of a coding table (`segment_codes`), else from pydicom's code
    dictionary (see the module)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    sct = codes.SCT
    entry = (table or {}).get(name)
    if entry is not None:
        category = Code(*entry["category"]) if entry.get("category") else sct.AnatomicalStructure
        modifier = Code(*entry["modifier"]) if entry.get("modifier") else None
        return SegmentCoding(category, Code(*entry["type"]), modifier)
    known = set(sct.dir())
    words = name.split("_")
    side = next((w for w in words if w in ("left", "right")), None)
    rest = [w for w in words if w not in ("left", "right")]
    base = "_".join(rest)
    vertebra = re.fullmatch(r"vertebrae_([CTLS]\d+)", base)
    bases = [
        _camel(rest),
        f"{vertebra.group(1)}Vertebra" if vertebra else "",
        SCT_KEYWORDS.get(base, ""),
        SCT_KEYWORDS.get(re.sub(r"_\d+$", "", base), ""),  # rib_left_7 -> rib
    ]
    for keyword in filter(None, bases):
        if side and _camel([side]) + keyword in known:  # a concept that says the side (RightSubclavianArtery)
            return SegmentCoding(sct.AnatomicalStructure, getattr(sct, _camel([side]) + keyword))
        if keyword in known:
            modifier = getattr(sct, _camel([side])) if side else None
            return SegmentCoding(sct.AnatomicalStructure, getattr(sct, keyword), modifier)
    return SegmentCoding(sct.Tissue, sct.Tissue, None, generic=True)


# --- the source series ---------------------------------------------------------------------------------------------
#: The metadata key of a label map that names the DICOM series folder it lies on (with ``series_uid``): a
#: prediction's own ``source_path`` is dropped (it is the CT's, not the label map's), this one is not.
SERIES_KEY = "dicom_series"


def series_source(metadata: dict[str, Any]) -> dict[str, str]:
    """``{SERIES_KEY: folder, "series_uid": uid}`` of the DICOM series ``metadata`` lies on: an image read from a
    series folder (``source_path``), or a label map that names one (`SERIES_KEY`); empty when there is none."""
    folder = metadata.get(SERIES_KEY) or metadata.get("source_path")
    # present but blank in a de-identified series: GDCM then lists the series under "" too
    if "series_uid" not in metadata or not folder or not Path(folder).is_dir():
        return {}
    return {SERIES_KEY: str(folder), "series_uid": str(metadata["series_uid"])}


def _series_files(image: Volume) -> list[str]:
    from napari_dagman.core.io import list_dicom_series

    source = series_source(image.metadata)
    if not source:
        raise DagmanInputError(
            "a DICOM SEG is written over the DICOM series it segments: give a DICOM series folder as input "
            "(this image is not one)"
        )
    folder = source[SERIES_KEY]
    series = [s for s in list_dicom_series(folder) if s.uid == source["series_uid"]]
    if not series:
        raise DagmanInputError(f"the DICOM series of the image is no longer in {folder}")
    return list(series[0].files)


def _derived_uid(kind: str, instances: list[str]) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[f"napari-dagman {kind}", *instances]))


def read_source_series(image: Volume) -> tuple[list[Any], list[str]]:
    """The series' headers (no pixel data), blank UIDs filled in (see the module), and what to tell about it."""
    import pydicom

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in _series_files(image)]
    notes = []
    for ds in datasets:
        meta = ds.file_meta
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
    instances = [str(ds.get("SOPInstanceUID", "")) for ds in datasets]
    if not all(instances):
        raise DagmanInputError(
            "the DICOM series has instances without a SOP Instance UID: a SEG cannot reference them"
        )
    for keyword, kind in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series")):
        if not all(ds.get(keyword) for ds in datasets):
            uid = _derived_uid(kind, instances)
            for ds in datasets:
                if not ds.get(keyword):
                    setattr(ds, keyword, uid)
            notes.append(
                f"the DICOM series has no {keyword} (de-identified?); the SEG references {uid}, derived from its "
                "instances: viewers that match instance UIDs overlay it, a PACS will not file it with the series"
            )
    return datasets, notes


def check_dicom_source(image: Volume) -> list[str]:
    """Refuse (one line) an image that is not a DICOM series, a missing highdicom or a broken coding table, before
    any inference; returns warnings about the series (UIDs it lacks)."""
    require_highdicom()
    coding_table()  # a table that is not one is said now, not after the inference
    return read_source_series(image)[1]


def frames_on_source(labels: Volume, datasets: list[Any]) -> np.ndarray:
    """The label map on each source slice's own pixel grid: (slices, rows, columns), in ``datasets``' order.

    Every source pixel centre must fall on a voxel centre of ``labels`` (the prediction keeps the input grid).
    """
    frames = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), labels.array.dtype)
    for n, ds in enumerate(datasets):
        rows, cols = int(ds.Rows), int(ds.Columns)
        row_dir, col_dir = np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3)
        d_row, d_col = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        xyz = (
            np.asarray(ds.ImagePositionPatient, float)
            + (c[..., None] * d_col) * row_dir
            + (r[..., None] * d_row) * col_dir
        )
        index = labels.physical_to_index(xyz[..., ::-1])  # Volume points are z, y, x
        nearest = np.rint(index).astype(np.int64)
        if np.abs(index - nearest).max() > 1e-2 or (nearest < 0).any() or (nearest >= labels.shape).any():
            raise DagmanInputError(
                f"the prediction is not on the grid of the DICOM series (slice {n + 1} falls between its voxels)"
            )
        frames[n] = labels.array[nearest[..., 0], nearest[..., 1], nearest[..., 2]]
    return frames


def segment_descriptions(ids: list[int], names: dict[int, str], source: str) -> list[Any]:
    """One highdicom segment description per organ id (segment numbers 1..K in the order of ``ids``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import napari_dagman
    from napari_dagman.core.labels import organ_colour

    # no model named (a label map drawn in napari, not a prediction): MANUAL segments, which carry no algorithm,
    # rather than crediting the model with the user's drawing
    algorithm, kind = None, hd.seg.SegmentAlgorithmTypeValues.MANUAL
    if source:
        algorithm = hd.AlgorithmIdentificationSequence(
            name="napari-dagman SwinUNETR",
            family=codes.cid7162.ArtificialIntelligence,
            version=napari_dagman.__version__,
            source=source[:64],
        )
        kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    out = []
    table = coding_table()
    for number, organ in enumerate(ids, start=1):
        name = names.get(organ, f"label {organ}")
        coding = segment_coding(name, table)
        rgb = tuple(int(round(255 * v)) for v in organ_colour(name)[:3])
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=coding.category,
            segmented_property_type=coding.type,
            algorithm_type=kind,
            algorithm_identification=algorithm,
            tracking_id=f"{name} ({organ})"[:64],
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*rgb),
        )
        if coding.modifier is not None:
            concept = hd.sr.CodedConcept.from_code(coding.modifier)
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                concept
            ]
        out.append(description)
    return out


def coding_notes(names: dict[int, str] | list[str]) -> list[str]:
    """What a reader of the SEG should know about its codes: the table they come from, and the segments left with
    the generic "Tissue" code (said once, with how to give them their own)."""
    path, source = coding_table_source()
    table = coding_table()
    organs = list(names.values()) if isinstance(names, dict) else list(names)
    generic = [n for n in organs if segment_coding(n, table).generic]
    notes = [f"DICOM SEG segment codes from {source}"] if path is not None else []
    if generic:
        shown = ", ".join(generic[:8]) + (f" and {len(generic) - 8} more" if len(generic) > 8 else "")
        notes.append(
            f"{len(generic)} of {len(organs)} segments have no SNOMED CT code of their own and are coded 'Tissue' "
            f"({shown}): give a coding table (${SEGMENT_CODES_ENV}=codes.csv) or install TotalSegmentator, "
            "whose table is then used"
        )
    return notes


def write_dicom_seg(
    labels: Volume, image: Volume, out: str | os.PathLike, *, names: dict[int, str] | None = None
) -> list[str]:
    """Write the label map ``labels`` (on ``image``'s grid) as a DICOM SEG over ``image``'s DICOM series.

    ``image`` is the series as read (its metadata names the folder and series); ``names`` maps label ids to
    organ names (default: ``labels.metadata["label_names"]``). One segment per named organ, in id order.
    Returns the paths written. The function the results dock calls for its DICOM SEG export.
    """
    require_highdicom()
    import highdicom as hd

    import napari_dagman
    from napari_dagman.core.io import atomic_write

    names = {int(k): str(v) for k, v in (names or labels.metadata.get("label_names") or {}).items() if int(k)}
    if not names:
        raise DagmanInputError("the label map names no organs: nothing to describe in a DICOM SEG")
    datasets, _ = read_source_series(image)
    ids = sorted(names)
    lut = np.zeros(max(max(ids), int(labels.array.max(initial=0))) + 1, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1)
    frames = lut[frames_on_source(labels, datasets).astype(np.int64)]
    source = str(labels.metadata.get("prediction_source", ""))
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames.astype(np.uint8 if len(ids) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(ids, names, source),
        series_instance_uid=hd.UID(),
        series_number=int(datasets[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-dagman",
        manufacturer_model_name="napari-dagman SwinUNETR",
        software_versions=napari_dagman.__version__,
        device_serial_number="none",
        content_label="DAGMAN",
        content_description="organ segmentation by napari-dagman",
        series_description=f"napari-dagman segmentation of {datasets[0].get('SeriesDescription', 'the series')}"[
            :64
        ],
    )

    def verify(tmp: Path) -> None:
        import pydicom

        back = pydicom.dcmread(tmp, stop_before_pixels=True)
        if back.SOPInstanceUID != seg.SOPInstanceUID:
            raise DagmanInputError("the written DICOM SEG does not read back")

    atomic_write(out, lambda tmp: seg.save_as(tmp), verify=verify)
    return [str(out)]


# --- reading -----------------------------------------------------------------------------------------------------
def read_dicom_seg(path: str | os.PathLike) -> Volume:
    """A DICOM Segmentation as one label map on its own geometry (LPS), segment numbers as ids and segment labels
    as names (``metadata["label_names"]``): what `predict --out *.dcm` writes reads back voxel for voxel.

    ITK read a SEG as an image of its frames (80 x 512 x 512 at 1 mm, values 0/255) without a word."""
    require_highdicom()
    import highdicom as hd

    from napari_dagman.core.io import from_sitk, stem_of

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
        numbers = list(seg.get_segment_numbers())
        volume = seg.get_volume(combine_segments=True, relabel=False, segment_numbers=numbers, dtype=np.uint16)
    except Exception as err:  # noqa: BLE001 (highdicom's many reasons become one line)
        raise DagmanInputError(f"cannot read the DICOM SEG {path.name}: {str(err).splitlines()[0]}") from None
    names = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    image = volume.to_simpleitk()
    out = from_sitk(image, {"source_path": str(path), "name": stem_of(path), "label_names": names})
    if out.array.max() <= 255:
        out = out.with_array(out.array.astype(np.uint8))
    return out
