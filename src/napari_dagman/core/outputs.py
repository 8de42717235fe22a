"""Where a label map can be written, as one registry: the CLI's ``predict --out``, the results dock's export and
napari's writer all go through `write_labels`, so a new format is one entry here (and its suffix in napari.yaml for
napari's File > Save).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.volume import Volume


@dataclass(frozen=True)
class LabelFormat:
    """A way to write a label map: the file endings it takes, and whether it needs the source image (a DICOM SEG
    is written over the series it segments)."""

    name: str
    suffixes: tuple[str, ...]
    title: str
    write: Callable[[Volume, Path, dict[int, str], Volume | None], list[str]]
    needs_source: bool = False


def _write_volume(labels: Volume, path: Path, names: dict[int, str], _source: Volume | None) -> list[str]:
    from napari_dagman.core.io import write_volume

    return write_volume(labels, path, label_names=names)


def _write_dicom_seg(labels: Volume, path: Path, names: dict[int, str], source: Volume | None) -> list[str]:
    from napari_dagman.core.segmentation.dicom_seg import write_dicom_seg

    return write_dicom_seg(labels, source, path, names=names)


LABEL_FORMATS: dict[str, LabelFormat] = {}


def register_label_format(fmt: LabelFormat) -> LabelFormat:
    LABEL_FORMATS[fmt.name] = fmt
    return fmt


register_label_format(
    LabelFormat(
        "volume",
        (".nii.gz", ".nii", ".mha", ".nrrd"),
        "NIfTI / MHA / NRRD with the source geometry and a .labels.json sidecar of organ names",
        _write_volume,
    )
)
register_label_format(
    LabelFormat(
        "dicom-seg",
        (".dcm",),
        "DICOM SEG over the DICOM series segmented",
        _write_dicom_seg,
        needs_source=True,
    )
)


def label_format(path: str | Path) -> LabelFormat:
    """The format a file name asks for, or a one-line refusal naming the endings there are."""
    from napari_dagman.core.io import suffix_of

    suffix = suffix_of(Path(path))
    for fmt in LABEL_FORMATS.values():
        if suffix in fmt.suffixes:
            return fmt
    endings = ", ".join(s for f in LABEL_FORMATS.values() for s in f.suffixes)
    raise DagmanInputError(f"cannot write a label map as '{suffix or Path(path).name}': use one of {endings}")


def narrow_labels(array: np.ndarray) -> np.ndarray:
    """Label ids in the smallest unsigned type that holds them (uint8, else uint16), as every label file expects."""
    array = np.asarray(array)
    low, high = array.min(initial=0), array.max(initial=0)
    if low < 0 or high > 65535:
        raise DagmanInputError(f"label ids must lie in 0..65535, got {low}..{high}")
    return array.astype(np.uint8 if high <= 255 else np.uint16)


def write_labels(
    labels: Volume, path: str | Path, names: dict[int, str], *, source: Volume | None = None
) -> list[str]:
    """Write a label map (ids narrowed, organ names kept) in the format its file name asks for; ``source`` is the
    image it segments (required by formats that write over it). Returns the paths written."""
    fmt = label_format(path)
    if fmt.needs_source and source is None:
        raise DagmanInputError(f"a {fmt.title} needs the image it segments, and none was given")
    return fmt.write(labels.with_array(narrow_labels(labels.array)), Path(path), dict(names), source)


def label_suffixes(*, with_source: bool = True) -> tuple[str, ...]:
    """Every ending `write_labels` takes (``with_source=False``: those that need no source image, e.g. napari's
    writer, which is given the layer alone)."""
    return tuple(s for f in LABEL_FORMATS.values() if with_source or not f.needs_source for s in f.suffixes)


def describe_formats() -> list[dict[str, Any]]:
    return [{"name": f.name, "suffixes": list(f.suffixes), "title": f.title} for f in LABEL_FORMATS.values()]
