"""Lesions marked in napari as a classification table: what the classification dock runs.

The dock's lesions are points on one CT layer, each with a class (and optionally a size) in the Points layer's
``features``. The job writes that CT (as shown: the layer's geometry) and a table of the points into the output
folder, so the run can be repeated on the command line with the same files, then runs `classify_job` on it.

With one CT every lesion is counted as its own patient: lesions of one patient are not independent, so the
intervals are narrower than a cohort's would be, and the notes say so.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.classification.job import classify_job
from napari_dagman.core.classification.table import check_classes
from napari_dagman.core.config.classify import ClassifyConfig
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import CancelToken, LogEvent
from napari_dagman.core.volume import Volume

IMAGE_FILE = "image.nii.gz"
TABLE_FILE = "lesions.csv"
ONE_IMAGE_NOTE = (
    "one CT: each lesion is counted as its own patient; lesions of one patient are not independent, so the "
    "intervals are narrower than a cohort's would be"
)


def check_points(volume: Volume, centres_zyx: np.ndarray, labels: list[str]) -> None:
    """Refuse, before anything is written, too few lesions per class or a lesion outside the CT."""
    if len(centres_zyx) == 0:
        raise DagmanInputError("no lesions marked: add points with a class to the lesion layer")
    if any(not str(label).strip() or str(label).lower() == "nan" for label in labels):
        raise DagmanInputError("a lesion has no class: set the class column of every point")
    check_classes([str(label).strip() for label in labels])
    for k, centre in enumerate(centres_zyx, 1):
        if not volume.contains(centre):
            raise DagmanInputError(f"lesion {k} lies outside the CT ({volume.describe_extent()})")


def write_points_table(
    path: Path, image: str, centres_zyx: np.ndarray, labels: list[str], sizes: np.ndarray | None
) -> Path:
    """The table `read_table` reads, one row per point (each its own patient)."""
    import pandas as pd

    from napari_dagman.core.files import atomic_write

    frame = pd.DataFrame(
        {
            "image": image,
            "label": [str(label).strip() for label in labels],
            "x": centres_zyx[:, 2],
            "y": centres_zyx[:, 1],
            "z": centres_zyx[:, 0],
            "patient": [f"lesion_{k}" for k in range(1, len(labels) + 1)],
        }
    )
    if sizes is not None:
        frame["size"] = np.where(np.isfinite(sizes) & (sizes > 0), sizes, np.nan)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def points_job(
    config: ClassifyConfig,
    volume: Volume,
    centres_zyx: Any,
    labels: list[str],
    sizes: Any = None,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, None]:
    """Write the CT and the table of the points into ``config.out``, then classify them (`classify_job`)."""
    from napari_dagman.core.files import check_output_folder
    from napari_dagman.core.io import write_volume

    centres = np.asarray(centres_zyx, float).reshape(-1, 3)
    check_points(volume, centres, labels)
    if not config.out:
        raise DagmanInputError("choose an output folder")
    check_output_folder(config.out)
    out = Path(config.out)
    yield LogEvent("writing the CT and the lesion table")
    write_volume(volume, out / IMAGE_FILE)
    table = write_points_table(
        out / TABLE_FILE, IMAGE_FILE, centres, labels, None if sizes is None else np.asarray(sizes, float)
    )
    yield LogEvent(ONE_IMAGE_NOTE, "warning")
    yield from classify_job(config.replace(table=str(table)), cancel)
