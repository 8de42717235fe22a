"""Features of each row: the encoder's stage feature map pooled over a box around the lesion (or the body).

Each image is read, resampled to the run's spacing and HU window (`core.data.model_volume`, what the encoder
was trained on) and run through the encoder **once**, over the smallest region holding every box of its rows;
each row then averages the feature map over its box. So 200 lesions of one CT cost one sliding-window pass, not
200. A box is ``context`` x the lesion's size (its surroundings: margins and spiculae are what tells lesions
apart), ``box_mm`` without a size, whatever the stage (the feature map is averaged over the tokens the box
touches); a row without a centre uses the body (the voxels above the HU window's floor) of its whole volume.

The controls see exactly the same boxes: a random-init encoder of the same architecture, and the histogram of
the encoder's input intensities (``intensity``), so a probe that only reads mean HU shows up as such.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman.core.classification.table import ClassTable
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import CancelToken, LogEvent, ProgressEvent, check_cancelled

if TYPE_CHECKING:
    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.config.classify import ClassifyConfig
    from napari_dagman.core.data import PreparedVolume
    from napari_dagman.core.volume import Volume

#: what the encoder's input is floored at, on the [0, 1] scale: a voxel above it is body (the HU window's floor)
BODY_LEVEL = 0.02


def _rows_by_image(table: ClassTable) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, image in enumerate(table.images):
        groups.setdefault(image, []).append(i)
    return groups


def _read(image: str, rows: list[int]) -> Volume:
    from napari_dagman.core.io import check_ct, read_volume

    try:
        return check_ct(read_volume(image))
    except DagmanInputError as err:
        raise DagmanInputError(f"row {rows[0] + 1}: {err}") from None


def check_images(table: ClassTable, cancel: CancelToken | None = None) -> Generator[ProgressEvent, None, None]:
    """Read every image once and refuse a row whose image cannot be read or whose centre lies outside it, before
    any feature is computed."""
    groups = _rows_by_image(table)
    for done, (image, rows) in enumerate(groups.items(), 1):
        check_cancelled(cancel, "the check of the images")
        volume = _read(image, rows)
        if table.centres is not None:
            for i in rows:
                if not volume.contains(table.centres[i]):
                    z, y, x = table.centres[i]
                    raise DagmanInputError(
                        f"row {i + 1}: the centre x {x:g}, y {y:g}, z {z:g} mm lies outside its image "
                        f"({volume.describe_extent()})"
                    )
        yield ProgressEvent(done, len(groups), "checking images")


def centre_index(volume: Volume | PreparedVolume, centre_zyx: np.ndarray) -> np.ndarray:
    """The (fractional) voxel index of a world LPS point (z, y, x mm) on a volume's grid."""
    p = np.asarray(centre_zyx, float) - np.asarray(volume.origin)
    return (p @ np.linalg.inv(np.asarray(volume.direction)).T) / np.asarray(volume.spacing)


def row_boxes(
    table: ClassTable, rows: list[int], pv: PreparedVolume, config: ClassifyConfig, token: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) (len(rows), 3) of each row's box in model voxels, clipped to the volume."""
    shape = np.asarray(pv.array.shape)
    if table.centres is None:  # whole volumes: every row of this image is its body's box
        body = np.argwhere(pv.array > BODY_LEVEL)
        lo, hi = (body.min(axis=0), body.max(axis=0) + 1) if len(body) else (np.zeros(3, int), shape)
        return np.tile(lo, (len(rows), 1)).astype(int), np.tile(hi, (len(rows), 1)).astype(int)
    starts, stops = [], []
    for i in rows:
        side_mm = config.context * table.sizes[i] if np.isfinite(table.sizes[i]) else config.box_mm
        # the box is the lesion's, whatever the stage: the encoder pools the tokens it touches, and the
        # intensity control reads the same voxels (a box grown to one 48 mm token would drown a 10 mm lesion)
        side = np.maximum(np.rint(side_mm / np.asarray(pv.spacing)).astype(int), 1)
        if token[0] == 1:  # a 2D model: the lesion's own slice
            side[0] = 1
        centre = np.rint(centre_index(pv, table.centres[i])).astype(int)
        lo = np.clip(centre - side // 2, 0, shape - 1)
        starts.append(lo)
        stops.append(np.clip(lo + side, 1, shape))
    return np.asarray(starts, int), np.asarray(stops, int)


def _region(starts: np.ndarray, stops: np.ndarray, shape: tuple[int, ...], roi: int, dims: int) -> tuple[slice, ...]:
    """The smallest region holding every box, grown to one ROI per axis (the encoder's window) where it can."""
    lo, hi = starts.min(axis=0), stops.max(axis=0)
    out = []
    for axis in range(3):
        if dims == 2 and axis == 0:
            out.append(slice(int(lo[0]), int(hi[0])))
            continue
        need = max(0, roi - (hi[axis] - lo[axis]))
        a = max(0, lo[axis] - need // 2)
        b = min(shape[axis], max(hi[axis], a + roi))
        a = max(0, min(a, b - roi))
        out.append(slice(int(a), int(b)))
    return tuple(out)


def pool_boxes(fmap: np.ndarray, factor: tuple[int, ...], starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """(len(boxes), C) mean of a (C, *grid) feature map over the tokens each voxel box touches."""
    f = np.asarray(factor)
    out = np.empty((len(starts), fmap.shape[0]), np.float32)
    for k, (lo, hi) in enumerate(zip(starts, stops, strict=True)):
        a = lo // f
        b = np.maximum(a + 1, -(-hi // f))
        out[k] = fmap[:, a[0] : b[0], a[1] : b[1], a[2] : b[2]].mean(axis=(1, 2, 3))
    return out


def intensity_features(array: np.ndarray, starts: np.ndarray, stops: np.ndarray, bins: int) -> np.ndarray:
    """Normalised histogram of the encoder's input ([0, 1]) in each box."""
    out = np.empty((len(starts), bins), np.float32)
    for k, (lo, hi) in enumerate(zip(starts, stops, strict=True)):
        values = array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].ravel()
        counts = np.bincount(np.minimum((values * bins).astype(np.int64), bins - 1), minlength=bins)
        out[k] = counts / max(1, values.size)
    return out


def table_features(
    table: ClassTable,
    pretrained: PretrainedEncoder,
    encoders: dict[str, Any],
    config: ClassifyConfig,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent | LogEvent, None, dict[str, np.ndarray]]:
    """Features (n, C) of every row for each of ``encoders`` (name -> network) and, with controls, ``intensity``.

    Every image is read and run through each encoder once (see the module docstring).
    """
    from napari_dagman.core.data import model_volume
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.embeddings.features import stage_feature_map

    arch = pretrained.arch
    token = arch.stage_stride(config.stage)
    factor = (token,) * 3 if arch.dims == 3 else (1, token, token)
    device = resolve_device(config.device)
    groups = _rows_by_image(table)
    out: dict[str, np.ndarray] = {}
    for done, (image, rows) in enumerate(groups.items(), 1):
        volume = _read(image, rows)
        pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
        del volume
        starts, stops = row_boxes(table, rows, pv, config, factor)  # type: ignore[arg-type]
        region = _region(starts, stops, pv.array.shape, pretrained.roi, arch.dims)
        offset = np.asarray([r.start for r in region])
        array = np.ascontiguousarray(pv.array[region])
        for name, encoder in encoders.items():
            fmap, _ = yield from _quiet(
                stage_feature_map(
                    encoder,
                    array,
                    stage=config.stage,
                    roi=pretrained.roi,
                    overlap=config.overlap,
                    batch_size=config.batch_size,
                    device=device,
                    cancel=cancel,
                )
            )
            features = pool_boxes(fmap, factor, starts - offset, stops - offset)
            out.setdefault(name, np.zeros((len(table), features.shape[1]), np.float32))[rows] = features
        if config.controls:
            hist = intensity_features(pv.array, starts, stops, config.hist_bins)
            out.setdefault("intensity", np.zeros((len(table), config.hist_bins), np.float32))[rows] = hist
        yield ProgressEvent(done, len(groups), "features")
    return out


def _quiet(events: Generator[Any, None, Any]) -> Generator[LogEvent, None, Any]:
    """Run a sub-generator, passing on its log lines but not its progress (the job counts images)."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        if isinstance(event, LogEvent):
            yield event
