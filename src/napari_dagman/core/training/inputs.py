"""A pretraining run's files, read and prepared one at a time, through the prepared-volume cache.

Each source (a file or a DICOM folder) is read, checked (a label map, NaNs, a constant or all-air volume are
refused, naming the file), resampled, scaled and cropped to the body, stored in the cache (`core.volume_cache`),
and its raw volume dropped before the next is read: the peak memory is one raw CT, not the cohort. With a warm
cache nothing is read but the manifests. Under ``torchrun`` only the first process prepares; the others wait for
it and map what it stored. Progress is reported per source.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from napari_dagman.core.data import PreparedVolume, prepare_volume, refine_volume
from napari_dagman.core.dicom_io import ANY_MODALITY_ENV, UNEVEN_SLICES_ENV
from napari_dagman.core.errors import DagmanInputError, LabelMapAsCTError
from napari_dagman.core.events import PREPARING, CancelToken, LogEvent, ProgressEvent, check_cancelled
from napari_dagman.core.files import stem_of
from napari_dagman.core.io import IMAGE_IS_CT_ENV, label_map_message, read_volumes
from napari_dagman.core.volume import Volume
from napari_dagman.core.volume_cache import VolumeCache


@dataclass
class Preparation:
    """What `prepare_sources` hands on: prepared volumes (and MIRAM's refined ones), in the order of the sources."""

    volumes: list[PreparedVolume] = field(default_factory=list)
    high_res: list[PreparedVolume] = field(default_factory=list)
    cached: int = 0  # sources found in the cache
    built: int = 0  # sources prepared by this process


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that changes a prepared array: the cache key's settings."""

    dims: int
    spacing: float | None
    hu_range: tuple[float, float]
    roi: int  # the padded size: one crop of this side fits
    high_res: int = 1  # MIRAM: refine the grid by this factor too

    def key_parts(self) -> dict[str, Any]:
        return {
            "dims": self.dims,
            "spacing": self.spacing,
            "hu_range": list(self.hu_range),
            "roi": self.roi,
            "high_res": self.high_res,
            # how files are read: a resampled uneven series, another modality, a label-map-looking CT let through
            "env": {name: os.environ.get(name, "") for name in (UNEVEN_SLICES_ENV, ANY_MODALITY_ENV, IMAGE_IS_CT_ENV)},
        }


def prepare_one(volume: Volume, settings: PrepareSettings, name: str) -> dict[str, PreparedVolume | None]:
    """Check and prepare one raw volume (and its refined grid for MIRAM)."""
    looks = label_map_message(volume)
    if looks:  # a segmentation among the CTs: refused before it is trained on
        raise LabelMapAsCTError(looks)
    pv = prepare_volume(
        volume, roi=settings.roi, dims=settings.dims, spacing=settings.spacing, hu_range=settings.hu_range, name=name
    )
    high = None
    if settings.high_res > 1:
        high = refine_volume(pv, volume, settings.high_res, dims=settings.dims, hu_range=settings.hu_range)
    return {"volume": pv, "high_res": high}


def _read(path: str) -> list[Volume]:
    try:
        volumes = read_volumes(path)
    except DagmanInputError as err:
        raise DagmanInputError(f"cannot use {path}: {err}") from None
    for i, v in enumerate(volumes):
        v.metadata.setdefault("source_path", str(path))
        if not v.metadata.get("name"):
            v.metadata["name"] = stem_of(path) + (f" #{i + 1}" if len(volumes) > 1 else "")
    return volumes


def prepare_sources(
    paths: Sequence[str],
    settings: PrepareSettings,
    *,
    cache: VolumeCache | None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    cancel: CancelToken | None = None,
    check_memory: Callable[[Volume], None] | None = None,
) -> Generator[Any, None, Preparation]:
    """Prepare every source once (see the module's text); yields `ProgressEvent`s, returns a `Preparation`.

    ``cache`` None prepares in memory. ``is_main`` / ``barrier``: under ``torchrun`` the first process builds
    the missing entries, then every process passes the barrier and maps them. ``check_memory(raw)`` refuses a
    volume that cannot be prepared in the memory left (before it is).
    """

    def build(path: str) -> list[dict[str, PreparedVolume | None]]:
        """A source's volumes read and prepared, each checked against the memory left before it is prepared."""
        built = []
        for volume in _read(path):
            if check_memory is not None:
                check_memory(volume)
            built.append(prepare_one(volume, settings, str(volume.metadata["name"])))
        return built

    total = len(paths)
    keys = [cache.key(p, settings.key_parts()) for p in paths] if cache is not None else [None] * total
    records: list[list[dict[str, Any]] | None] = [None] * total
    out = Preparation()
    if is_main or cache is None:
        for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
            check_cancelled(cancel, "the preparation of the volumes")
            yield ProgressEvent(i, total, PREPARING)
            records[i] = cache.load(key) if cache is not None else None
            if records[i] is not None:
                out.cached += 1
                continue
            built = build(path)
            stored = cache.save(key, built) if cache is not None else None
            records[i] = stored or built  # not writable: kept in memory
            out.built += 1
        yield ProgressEvent(total, total, PREPARING)
    barrier()
    for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
        if records[i] is None:  # another process built it; or it could not store it: this one prepares its own
            records[i] = cache.load(key) if cache is not None else None
            if records[i] is None:
                records[i] = build(path)
                out.built += 1
            else:
                out.cached += 1
        for record in records[i] or []:
            out.volumes.append(record["volume"])
            if record.get("high_res") is not None:
                out.high_res.append(record["high_res"])
    if cache is not None:
        for warning in cache.warnings:
            yield LogEvent(warning, "warning")
        cache.warnings.clear()
    return out


__all__ = ["PrepareSettings", "Preparation", "prepare_one", "prepare_sources"]
