"""Class-attention maps over a volume: per head, in relative attention (1 = uniform), on the token grid or a
finer grid by shifted-window inference (sub-token maps)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_dagman.core.data import model_volume
from napari_dagman.core.diversity import head_diversity
from napari_dagman.core.events import CancelToken, ProgressEvent, check_cancelled
from napari_dagman.core.volume import Volume, grid_placement, window_starts

if TYPE_CHECKING:
    from napari_dagman.core.checkpoint import PretrainedEncoder


def map_head_diversity(maps: np.ndarray) -> dict[str, Any]:
    """`head_diversity` of per-head maps ``(heads, *grid)`` given in any positive unit (relative attention).

    Each head is first normalised to sum to 1, so the figures describe the maps as shown (e.g. a whole-volume
    map averaged over sliding windows), not one window.
    """
    flat = np.asarray(maps, dtype=np.float64).reshape(maps.shape[0], -1)
    flat = flat / np.maximum(flat.sum(axis=-1, keepdims=True), 1e-12)
    return head_diversity(torch.from_numpy(flat))


# ---------------------------------------------------------------------------------------------------------
# Attention maps of a whole volume (sliding window) and of one crop
# ---------------------------------------------------------------------------------------------------------
@dataclass
class AttentionMaps:
    """Per-head class attention on the attention-stage token grid, placed in physical space.

    ``maps`` is (heads, z, y, x), in *relative attention*: each window's weights times its number of
    tokens, so 1 means "as much as a uniform map" whatever the window size; overlapping windows are
    averaged. ``scale``/``translate`` place the token grid on the CT (napari world = physical LPS mm).
    """

    maps: np.ndarray
    scale: list[float]
    translate: list[float]
    direction: np.ndarray
    token_size: tuple[int, int, int]
    windows: int
    diversity: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return self.maps.mean(axis=0)

    def volumes(self) -> dict[str, Volume]:
        """``mean`` and ``head{h}`` as `Volume`s with the token grid's geometry (for NIfTI export)."""
        spacing = tuple(self.scale)
        origin = tuple(self.translate)
        out = {
            "mean": Volume(self.mean.astype(np.float32), spacing, origin, self.direction, dict(self.metadata))
        }
        for h in range(self.maps.shape[0]):
            out[f"head{h}"] = Volume(
                self.maps[h].astype(np.float32), spacing, origin, self.direction, dict(self.metadata)
            )
        return out


def _window_attention(encoder, batch: torch.Tensor) -> torch.Tensor:
    """(B, heads, *grid) relative attention of a batch of windows."""
    with torch.no_grad():
        out = encoder(batch)
    att = out.attention.float()
    n = att.shape[-1]
    return (att * n).reshape(att.shape[0], att.shape[1], *out.grid)


def _windows(shape: tuple[int, ...], roi: int, step: int, dims: int) -> tuple[list[int], list[tuple[Any, Any]]]:
    """The padded shape that fits whole windows, and every window (slices, axial slice or None)."""
    from monai.data.utils import dense_patch_slices

    plane_axes = (0, 1, 2) if dims == 3 else (1, 2)
    padded = list(shape)
    for axis in plane_axes:
        starts = window_starts(shape[axis], roi, step)
        padded[axis] = max(roi, starts[-1] + roi)
    if dims == 3:
        return padded, [(s, None) for s in dense_patch_slices(padded, (roi,) * 3, (step,) * 3)]
    in_plane = dense_patch_slices(padded[1:], (roi, roi), (step, step))
    return padded, [(s, z) for z in range(padded[0]) for s in in_plane]


def _token_maps(
    encoder: Any,
    array: np.ndarray,
    *,
    roi: int,
    token: int,
    step: int,
    heads: int,
    dims: int,
    batch_size: int,
    device: str | torch.device,
    cancel: CancelToken | None,
    progress: list[int],
    total: int,
    diversity: list[tuple[float, float]],
) -> Generator[ProgressEvent, None, np.ndarray]:
    """Sliding-window relative attention of one array on its token grid (heads, *grid), averaged where windows
    overlap; the array is padded with air (0) at its far end so that whole windows fit."""
    padded_shape, windows = _windows(array.shape, roi, step, dims)
    padded = np.zeros(padded_shape, np.float32)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    factor = (token,) * 3 if dims == 3 else (1, token, token)
    grid = [-(-s // f) for s, f in zip(padded_shape, factor, strict=True)]
    acc = np.zeros((heads, *grid), np.float64)
    count = np.zeros(grid, np.float64)
    for first in range(0, len(windows), batch_size):
        check_cancelled(cancel, "the attention computation")
        chunk = windows[first : first + batch_size]
        crops = [padded[sl] if z is None else padded[z][sl] for sl, z in chunk]
        rel = _window_attention(encoder, torch.from_numpy(np.stack(crops)[:, None]).to(device)).cpu().numpy()
        flat = rel.reshape(rel.shape[0], heads, -1)
        div = head_diversity(torch.from_numpy(flat / flat.sum(axis=-1, keepdims=True)))
        diversity.append((div["diversity"], div["entropy_mean"]))
        for (sl, z), window in zip(chunk, rel, strict=True):
            target = tuple(slice(s.start // token, s.stop // token) for s in sl)
            if z is not None:  # a 2D window on slice z: (heads, 1, gy, gx) onto (heads, z, ...)
                target = (slice(z, z + 1), *target)
                window = window[:, None]
            acc[(slice(None), *target)] += window
            count[target] += 1
        progress[0] += len(chunk)
        yield ProgressEvent(min(progress[0], total), total, "attention")
    return acc / np.maximum(count, 1)


def attention_maps(
    pretrained: PretrainedEncoder,
    volume: Volume,
    *,
    overlap: float = 0.25,
    batch_size: int = 2,
    subtoken: int = 1,
    device: str | torch.device = "cpu",
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, AttentionMaps]:
    """Sliding-window class attention over a whole volume; yields progress, returns `AttentionMaps`.

    The volume is resampled to the run's spacing and HU range; windows of the run's ROI step by a multiple of
    the token size (so their token grids line up). A 2D model runs over every axial slice.

    ``subtoken`` k > 1 gives maps finer than one token by shifted-window inference: the volume is read again
    with its token grid shifted by every multiple of 1/k token along each axis (in-plane only in 2D), and each
    cell of the grid of spacing token/k takes the mean of the attention of the tokens that covered it. With
    k = 1 (one shift, none) this is the token map. The maps are cropped to the CT's extent (the last cell may
    reach past it by less than one cell).
    """
    import itertools

    arch = pretrained.arch
    roi, token = pretrained.roi, arch.attention_stride
    if subtoken not in (1, 2, 4) or token % subtoken:
        raise ValueError(f"subtoken must be 1, 2 or 4 and divide the token size {token}, got {subtoken}")
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    array, dims, heads = pv.array, arch.dims, arch.sca_heads
    step = max(token, int(round(roi * (1.0 - overlap) / token)) * token)
    cell = token // subtoken
    plane = (0, 1, 2) if dims == 3 else (1, 2)
    shifts = [dict(zip(plane, o, strict=True)) for o in itertools.product(range(subtoken), repeat=len(plane))]
    total = sum(len(_windows(_shifted(array, s, cell).shape, roi, step, dims)[1]) for s in shifts)
    factor = (cell,) * 3 if dims == 3 else (1, cell, cell)
    fine = [-(-n // f) for n, f in zip(array.shape, factor, strict=True)]
    acc = np.zeros((heads, *fine), np.float64)
    count = np.zeros(fine, np.float64)
    progress, diversity = [0], []
    encoder = pretrained.encoder.to(device)
    for shift in shifts:
        token_maps = yield from _token_maps(
            encoder,
            _shifted(array, shift, cell),
            roi=roi,
            token=token,
            step=step,
            heads=heads,
            dims=dims,
            batch_size=batch_size,
            device=device,
            cancel=cancel,
            progress=progress,
            total=total,
            diversity=diversity,
        )
        # token j of the shifted array covers fine cells shift + j*k ... shift + j*k + k - 1
        for axis in plane:
            token_maps = token_maps.repeat(subtoken, axis=axis + 1)
        offset = [shift.get(axis, 0) for axis in range(3)]
        region = tuple(slice(o, min(n, o + t)) for o, n, t in zip(offset, fine, token_maps.shape[1:], strict=True))
        sizes = [r.stop - r.start for r in region]
        acc[(slice(None), *region)] += token_maps[(slice(None), *(slice(0, n) for n in sizes))]
        count[region] += 1
    maps = (acc / np.maximum(count, 1)).astype(np.float32)
    scale, translate = grid_placement(pv.origin, pv.spacing, factor)
    meta = {k: v for k, v in volume.metadata.items() if k.startswith("source_") or k == "name"}
    meta["attention_grid"] = f"{cell} voxels of {pv.spacing[-1]:g} mm ({'1/' + str(subtoken) + ' ' if subtoken > 1 else ''}token)"
    return AttentionMaps(
        maps=maps,
        scale=scale,
        translate=translate,
        direction=pv.direction.copy(),
        token_size=factor,
        windows=total,
        diversity={
            "diversity_mean_over_windows": float(np.mean([d for d, _ in diversity])),
            "entropy_mean_over_windows": float(np.mean([e for _, e in diversity])),
            "windows": total,
            "subtoken": subtoken,
        },
        metadata=meta,
    )


def _shifted(array: np.ndarray, shift: dict[int, int], cell: int) -> np.ndarray:
    """The array without its first ``shift[axis] * cell`` voxels along each shifted axis."""
    return array[tuple(slice(shift.get(axis, 0) * cell, None) for axis in range(array.ndim))]
