"""The table a classification reads: one row per case or lesion, checked whole before any feature is computed.

Columns: ``image`` (file or DICOM folder, relative to the table's folder), ``label`` (a class name or a 0/1
outcome); optional ``x``, ``y``, ``z`` (the lesion centre in world millimetres, LPS, as napari shows them for
this plugin's layers) and ``size`` (the lesion's diameter, mm), ``patient`` (rows of one patient are never split
apart; default: the image) and ``split`` (``train``/``test``; default: patient-level cross-validation).

Every refusal names the row by its number, counting the rows under the header from 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_dagman.core.errors import DagmanInputError

REQUIRED = ("image", "label")
CENTRE = ("x", "y", "z")
SPLITS = ("train", "test")
#: the most rows a table may hold (features are kept in memory: 100k rows of 768 floats is 300 MB)
MAX_ROWS = 100_000


@dataclass
class ClassTable:
    """A checked table: per-row arrays, the class names in index order and the positive class."""

    path: Path
    images: list[str]  # resolved paths, one per row
    y: np.ndarray  # class index per row
    class_names: list[str]
    patients: np.ndarray
    centres: np.ndarray | None  # (n, 3) z, y, x mm (LPS) or None (whole volumes)
    sizes: np.ndarray  # (n,) diameter mm, NaN where not given
    split: np.ndarray | None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def rows(self) -> np.ndarray:
        """Row numbers as the user counts them (1 = the first row under the header)."""
        return np.arange(1, len(self.y) + 1)


def _read_frame(path: Path):
    import pandas as pd

    if not path.is_file():
        raise DagmanInputError(f"the table {path} does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            from napari_dagman.core.embeddings.results import require_parquet

            require_parquet()
            return pd.read_parquet(path)
        return pd.read_csv(path, skipinitialspace=True)
    except DagmanInputError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DagmanInputError(f"cannot read the table {path.name}: {first}") from None


def _classes(labels: list[str], positive: str | None) -> tuple[list[str], np.ndarray]:
    """Class names in index order (numbers in numeric order, names alphabetically; ``positive`` last for two
    classes) and each row's index."""
    unique = sorted(set(labels), key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))
    if positive is not None:
        if positive not in unique:
            raise DagmanInputError(f"--positive {positive} is not a class of the table ({', '.join(unique)})")
        unique = [v for v in unique if v != positive] + [positive]
    index = {name: i for i, name in enumerate(unique)}
    return unique, np.asarray([index[v] for v in labels], int)


def check_classes(labels: list[str], positive: str | None = None) -> tuple[list[str], np.ndarray]:
    """Class names and row indices (see `_classes`); refuse one class, or a class with one row."""
    class_names, y = _classes(labels, positive)
    if len(class_names) < 2:
        raise DagmanInputError(f"the table has one class ({class_names[0]}): a classifier needs two or more")
    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < 2:
        raise DagmanInputError(
            f"the class {class_names[int(counts.argmin())]} has one row; each class needs two or more"
        )
    return class_names, y


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _label_text(value) -> str:
    """A label as text; 1.0 and 1 are one class."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _centres(frame, rows: np.ndarray) -> np.ndarray | None:
    present = [c for c in CENTRE if c in frame.columns]
    if not present:
        return None
    if len(present) < 3:
        raise DagmanInputError(f"the table gives {', '.join(present)} but not all of x, y, z")
    import pandas as pd

    values = frame[list(CENTRE)].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise DagmanInputError(f"row {rows[bad][0]}: the centre x, y, z is missing or not a number")
    x, y, z = values.T
    return np.stack([z, y, x], axis=1)  # the package's z, y, x order


def read_table(path: str | os.PathLike, *, positive: str | None = None) -> ClassTable:
    """Read and check a classification table (see the module docstring); one-line `DagmanInputError`s."""
    import pandas as pd

    path = Path(path)
    frame = _read_frame(path)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DagmanInputError(f"the table {path.name} has no column {', '.join(missing)}")
    if frame.empty:
        raise DagmanInputError(f"the table {path.name} holds no rows")
    if len(frame) > MAX_ROWS:
        raise DagmanInputError(f"the table {path.name} holds {len(frame)} rows, more than {MAX_ROWS}")
    rows = np.arange(1, len(frame) + 1)
    images = []
    for row, value in zip(rows, frame["image"], strict=True):
        if pd.isna(value) or not str(value).strip():
            raise DagmanInputError(f"row {row}: no image")
        image = Path(str(value).strip()).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.exists():
            raise DagmanInputError(f"row {row}: the image {value} does not exist")
        images.append(str(image))
    labels = []
    for row, value in zip(rows, frame["label"], strict=True):
        if pd.isna(value) or not _label_text(value):
            raise DagmanInputError(f"row {row}: no label")
        labels.append(_label_text(value))
    class_names, y = check_classes(labels, positive)
    sizes = np.full(len(frame), np.nan)
    if "size" in frame.columns:
        sizes = pd.to_numeric(frame["size"], errors="coerce").to_numpy(float)
        bad = ~(np.isnan(sizes) | (np.isfinite(sizes) & (sizes > 0)))
        if bad.any():
            raise DagmanInputError(f"row {rows[bad][0]}: the size must be a positive number of mm")
    patients = np.asarray(images, dtype=object)
    if "patient" in frame.columns:
        given = frame["patient"].astype(str).str.strip()
        patients = np.where(frame["patient"].isna() | (given == ""), patients, given.to_numpy(object))
    patients = patients.astype(str)
    split = None
    if "split" in frame.columns:
        split = frame["split"].astype(str).str.strip().str.lower().to_numpy(str)
        bad = ~np.isin(split, SPLITS)
        if bad.any():
            raise DagmanInputError(f"row {rows[bad][0]}: the split must be train or test, got {split[bad][0]!r}")
        for name in SPLITS:
            if not (split == name).any():
                raise DagmanInputError(f"the split column has no {name} row")
    return ClassTable(
        path=path,
        images=images,
        y=y,
        class_names=class_names,
        patients=patients,
        centres=_centres(frame, rows),
        sizes=sizes,
        split=split,
    )
