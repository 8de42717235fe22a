"""Organs of a segmentation run: label ids <-> contiguous classes, organ names, label-map checks.

The chosen label ids (TotalSegmentator ids, say liver 5, spleen 1) become classes 1..K (0 = background; every
other id is background too) and go back to their ids after prediction (`LabelMap`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.io import MAX_LABEL_VALUES
from napari_dagman.core.labels import default_names
from napari_dagman.core.volume import Volume


@dataclass(frozen=True)
class LabelMap:
    """The organs a model segments: label id ``ids[k]`` is class ``k + 1``; class 0 is background."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.ids:
            raise DagmanInputError("no organs chosen")
        if len(set(self.ids)) != len(self.ids):
            raise DagmanInputError(f"organ ids repeat: {list(self.ids)}")
        if any(i <= 0 for i in self.ids):
            raise DagmanInputError("organ label ids must be positive (0 is background)")
        if len(self.names) != len(self.ids):
            raise DagmanInputError("one name per organ id")

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background + organs."""
        return len(self.ids) + 1

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("background", *self.names)

    @property
    def id_names(self) -> dict[int, str]:
        return dict(zip(self.ids, self.names, strict=True))

    def describe(self) -> str:
        return ", ".join(f"{n} ({i})" for i, n in zip(self.ids, self.names, strict=True))

    def to_classes(self, labels: np.ndarray) -> np.ndarray:
        """Label ids -> classes 0..K (ids that are not chosen become background)."""
        labels = np.asarray(labels)
        top = int(max(labels.max(initial=0), max(self.ids)))
        lut = np.zeros(top + 1, dtype=np.uint8 if self.num_classes <= 256 else np.uint16)
        lut[list(self.ids)] = np.arange(1, self.num_classes)
        return lut[labels.astype(np.int64, copy=False)]

    def to_labels(self, classes: np.ndarray) -> np.ndarray:
        """Classes 0..K -> the original label ids (uint8 when they fit, else uint16)."""
        dtype = np.uint8 if max(self.ids) <= 255 else np.uint16
        lut = np.array((0, *self.ids), dtype=dtype)
        classes = np.asarray(classes)
        if classes.size and int(classes.max()) >= self.num_classes:
            raise DagmanInputError(
                f"class {int(classes.max())} out of range (the model has {self.num_classes})"
            )
        if classes.ndim == 0:
            return lut[int(classes)]
        out = np.empty(classes.shape, dtype=dtype)
        # a slab at a time: indexing converts the indices to int64, 8 bytes a voxel of a whole CT otherwise
        step = max(1, (1 << 24) // max(1, int(np.prod(classes.shape[1:]))))
        for first in range(0, classes.shape[0], step):
            out[first : first + step] = lut[classes[first : first + step].astype(np.int64, copy=False)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        try:
            return cls(tuple(int(i) for i in data["ids"]), tuple(str(n) for n in data["names"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("the run's organ table (ids and names) is missing or broken") from None


def label_names_of(labels: Volume) -> dict[int, str]:
    """Id -> name for a label map: its sidecar/metadata names, TotalSegmentator v2 names, or ``label_<id>``."""
    ids = present_ids(labels.array)
    names = {int(k): str(v) for k, v in (labels.metadata.get("label_names") or {}).items()}
    fallback, _ = default_names(ids)
    return {i: names.get(i, fallback.get(i, f"label_{i}")) for i in sorted(set(ids) | set(names))}


def present_ids(array: np.ndarray) -> list[int]:
    """Non-zero label ids that occur in ``array`` (bincount: much faster than np.unique on big volumes)."""
    flat = np.asarray(array).ravel()
    if flat.size == 0:
        return []
    if np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0 and flat.max() <= 65535:
        counts = np.bincount(flat.astype(np.int64, copy=False))
        return [int(i) for i in np.flatnonzero(counts) if i != 0]
    return [int(i) for i in np.unique(flat) if int(i) != 0]


def parse_organs(spec: str | Sequence[str | int], names: Mapping[int, str] | None = None) -> list[int]:
    """Organ ids from ``"5,1,2"``, ``"liver, spleen, 2"`` or a list of ids/names (names looked up in ``names``)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    by_name = {v.lower(): int(k) for k, v in (names or {}).items()}
    out: list[int] = []
    for item in items:
        if isinstance(item, int | np.integer):
            out.append(int(item))
            continue
        if not item:
            continue
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif item.lower() in by_name:
            out.append(by_name[item.lower()])
        else:
            raise DagmanInputError(f"unknown organ '{item}': give label ids or names of the label map")
    if any(i <= 0 for i in out):
        raise DagmanInputError("organ label ids must be positive (0 is background)")
    return list(dict.fromkeys(out))


def choose_organs(label_volumes: Sequence[Volume], organs: Sequence[int] = ()) -> LabelMap:
    """The `LabelMap` of a run: ``organs`` (default: every id found), named from the label maps.

    Raises `DagmanInputError` when a chosen id occurs in none of the label maps.
    """
    names: dict[int, str] = {}
    found: set[int] = set()
    for volume in label_volumes:
        table = label_names_of(volume)
        ids = present_ids(volume.array)
        found.update(ids)
        for i in ids:
            names.setdefault(i, table[i])
    chosen = [int(i) for i in organs] if organs else sorted(found)
    if not chosen:
        raise DagmanInputError("the label maps are empty (all background): nothing to segment")
    missing = [i for i in chosen if i not in found]
    if missing:
        fallback, _ = default_names(missing)
        raise DagmanInputError(
            "organ(s) "
            + ", ".join(f"{fallback.get(i, f'label_{i}')} ({i})" for i in missing)
            + " occur in none of the label maps"
        )
    return LabelMap(tuple(chosen), tuple(names[i] for i in chosen))


def check_label_volume(labels: Volume, what: str) -> Volume:
    """Integer, non-negative label ids; float arrays holding whole numbers are accepted (napari may give those)."""
    arr = labels.array
    if arr.dtype == np.bool_:
        return labels.with_array(arr.astype(np.uint8))
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DagmanInputError(f"{what} is not a label map: it holds non-integer values")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DagmanInputError(f"{what} is not a label map: it holds negative values")
    if arr.size and arr.max() > 65535:
        raise DagmanInputError(f"{what}: label ids above 65535 are not supported")
    if arr.size and len(np.unique(arr)) > MAX_LABEL_VALUES:  # whole, non-negative grey values: a CT stored raw
        raise DagmanInputError(
            f"{what} looks like a CT, not a label map: it holds {len(np.unique(arr))} distinct values (a label map "
            f"holds at most {MAX_LABEL_VALUES}); choose the label map"
        )
    return labels if arr is labels.array else labels.with_array(arr.astype(np.uint16))


def align_labels(
    image: Volume, labels: Volume, *, resample: bool, image_name: str, labels_name: str
) -> Volume:
    """The label map on the image's grid: as it is when the grids match, else resampled (only if asked)."""
    if labels.same_grid(image):
        return labels
    if not resample:

        def fmt(values: Sequence[float]) -> str:
            return "(" + ", ".join(f"{v:g}" for v in values) + ")"

        raise DagmanInputError(
            f"label map '{labels_name}' is not on the grid of image '{image_name}': shape {labels.shape} vs "
            f"{image.shape}, spacing {fmt(labels.spacing)} vs {fmt(image.spacing)} mm, origin {fmt(labels.origin)} "
            f"vs {fmt(image.origin)} mm; resample it onto the image (or pass --resample-labels)"
        )
    from napari_dagman.core.io import resample_like

    return resample_like(labels, image, is_label=True)
