"""The encoder's input around each row, for fine-tuning: a lesion's window with room to shift, or a case's body.

A lesion row keeps one region of ROI + 2 x jitter voxels per axis centred on its box (padded with air outside
the image), so a training crop can be shifted by up to ``jitter`` voxels and still hold the lesion; the test
crop is the centred one. A row without a centre keeps the body of its volume (padded to at least one ROI): a
training crop is a random ROI window of it, and the test probabilities average a grid of windows over it.

Each image is read once (as the features are), at the run's spacing and HU window. Regions are stored as
float16 (the input is on [0, 1]; half precision keeps 3 decimals, far finer than the augmentation's noise) so a
table of hundreds of lesions holds a few hundred MB, not GB.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from napari_dagman.core.classification.features import _read, _rows_by_image, row_boxes
from napari_dagman.core.events import CancelToken, ProgressEvent, check_cancelled

if TYPE_CHECKING:
    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.classification.table import ClassTable
    from napari_dagman.core.config.classify import ClassifyConfig

#: most windows averaged for a whole-volume row's test probabilities (spread evenly over its grid)
MAX_TEST_WINDOWS = 16


@dataclass
class RowRegion:
    """One row's stored input: the region (float16, z, y, x), its box in region voxels, and its kind."""

    array: np.ndarray
    box_lo: np.ndarray
    box_hi: np.ndarray
    lesion: bool


def padded_region(array: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``array[lo:hi]`` with zeros (air, the window's floor) where the box leaves the array."""
    out = np.zeros(tuple(int(v) for v in hi - lo), np.float16)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, array.shape)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(src_lo, src_hi, lo, strict=True))
        out[dst] = array[tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi, strict=True))]
    return out


def _lesion_region(
    array: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: np.ndarray, jitter: np.ndarray
) -> RowRegion:
    centre = (lo + hi) // 2
    start = centre - window // 2 - jitter
    stop = start + window + 2 * jitter
    return RowRegion(padded_region(array, start, stop), lo - start, hi - start, lesion=True)


def _body_region(array: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: np.ndarray) -> RowRegion:
    stop = np.maximum(hi, lo + window)  # at least one window, grown past the far end with air
    region = padded_region(array, lo, stop)
    return RowRegion(region, np.zeros(3, int), np.asarray(region.shape), lesion=False)


def row_regions(
    table: ClassTable,
    pretrained: PretrainedEncoder,
    config: ClassifyConfig,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, list[RowRegion]]:
    """Every row's `RowRegion` (reading each image once)."""
    from napari_dagman.core.data import model_volume

    arch, roi = pretrained.arch, pretrained.roi
    token = arch.stage_stride(config.stage)
    factor = (token,) * 3 if arch.dims == 3 else (1, token, token)
    window = np.asarray(crop_window(arch.dims, roi))
    regions: list[RowRegion | None] = [None] * len(table)
    groups = _rows_by_image(table)
    for done, (image, rows) in enumerate(groups.items(), 1):
        check_cancelled(cancel, "the crops")
        volume = _read(image, rows)
        pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
        del volume
        jitter = np.rint(config.jitter_mm / np.asarray(pv.spacing)).astype(int)
        if arch.dims == 2:
            jitter[0] = 0  # a 2D model sees the lesion's own slice
        starts, stops = row_boxes(table, rows, pv, config, factor)  # type: ignore[arg-type]
        for i, lo, hi in zip(rows, starts, stops, strict=True):
            if table.centres is None:
                regions[i] = _body_region(pv.array, lo, hi, window)
            else:
                regions[i] = _lesion_region(pv.array, lo, hi, window, jitter)
        yield ProgressEvent(done, len(groups), "crops")
    return [r for r in regions if r is not None]


def crop_window(dims: int, roi: int) -> tuple[int, int, int]:
    """The encoder's input window as (z, y, x) voxels: ROI^3, or one slice of ROI^2 for a 2D model."""
    return (roi, roi, roi) if dims == 3 else (1, roi, roi)


def _cut(region: RowRegion, start: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    crop = region.array[tuple(slice(int(a), int(a + w)) for a, w in zip(start, window, strict=True))]
    lo = np.clip(region.box_lo - start, 0, window - 1)
    hi = np.clip(region.box_hi - start, lo + 1, window)
    return crop.astype(np.float32), lo, hi


def training_crop(
    region: RowRegion, window: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crop, box lo, box hi): a window shifted at random within the region (the box moves with it)."""
    room = np.asarray(region.array.shape) - window
    start = np.asarray([int(rng.integers(0, r + 1)) for r in room])
    return _cut(region, start, window)


def test_crops(region: RowRegion, window: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The crops a row is predicted from: the centred window of a lesion, or a grid of windows over a body."""
    room = np.asarray(region.array.shape) - window
    if region.lesion:
        return [_cut(region, room // 2, window)]
    axes = [np.unique(np.linspace(0, r, max(1, int(np.ceil(r / w)) + 1)).astype(int)) for r, w in zip(room, window, strict=True)]
    starts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    if len(starts) > MAX_TEST_WINDOWS:
        starts = starts[np.linspace(0, len(starts) - 1, MAX_TEST_WINDOWS).astype(int)]
    return [_cut(region, s, window) for s in starts]
