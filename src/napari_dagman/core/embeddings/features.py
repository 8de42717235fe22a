"""Step 1: patch features of a whole volume, from the run's encoder or a control on exactly the same patches.

The CT is resampled to the run's spacing and HU window (`core.data.model_volume`, the encoder's own input),
the encoder runs over it in overlapping windows of the run's ROI, and the chosen stage's feature map (averaged
where windows overlap) is averaged over each patch, or kept per token. The controls: an untrained encoder of
the same architecture (random-init), the histogram of the encoder's input intensities (intensity) and the
patch-centre coordinates (position).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman.core.data import PreparedVolume, model_volume
from napari_dagman.core.embeddings.cache import FEATURE_SETTINGS, EmbeddingCache, embedding_key
from napari_dagman.core.embeddings.patches import (
    PatchEmbeddings,
    axis_sizes,
    box_counts,
    grid_starts,
    organ_centred_starts,
    patch_organs,
    pool_patches,
)
from napari_dagman.core.errors import CheckpointError, DagmanError, DagmanInputError
from napari_dagman.core.events import CancelToken, LogEvent, ProgressEvent, check_cancelled
from napari_dagman.core.io import resample_like, resample_to_spacing
from napari_dagman.core.labels import names_in
from napari_dagman.core.volume import Volume, require_same_grid, window_starts

if TYPE_CHECKING:
    import torch

    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.config import EmbedConfig


def stage_feature_map(
    encoder: Any,
    array: np.ndarray,
    *,
    stage: int,
    roi: int,
    overlap: float,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, tuple[np.ndarray, tuple[int, int, int]]]:
    """Sliding-window feature map of one encoder stage over a model volume; raises `JobCancelled` when cancelled.

    Returns ``(features, factor)``: features (C, *grid) on the stage's token grid (averaged where windows
    overlap) and the voxels per token along z, y, x. Windows step by a multiple of the token size so their
    token grids line up; the volume is padded with air (0) at its far end. 2D models run on every slice.
    """
    import torch

    from napari_dagman.core.models.encoder import set_fused_window_attention

    arch = encoder.arch
    token = arch.stage_stride(stage)
    step = max(token, int(round(roi * (1.0 - overlap) / token)) * token)
    plane = (0, 1, 2) if arch.dims == 3 else (1, 2)
    starts = {a: window_starts(array.shape[a], roi, step) for a in plane}
    padded_shape = list(array.shape)
    for axis in plane:
        padded_shape[axis] = max(roi, starts[axis][-1] + roi)
    padded = np.zeros(padded_shape, np.float32)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    factor = (token, token, token) if arch.dims == 3 else (1, token, token)
    grid = tuple(s // f for s, f in zip(padded_shape, factor, strict=True))

    if arch.dims == 3:
        windows = [(None, (z, y, x)) for z in starts[0] for y in starts[1] for x in starts[2]]
    else:
        windows = [(z, (y, x)) for z in range(array.shape[0]) for y in starts[1] for x in starts[2]]
    acc = np.zeros((arch.stage_channels(stage), *grid), np.float32)
    count = np.zeros(grid, np.float32)
    encoder = encoder.to(device).eval()
    set_fused_window_attention(encoder, True)  # inference only: about twice as fast, equal up to rounding
    total = len(windows)
    for first in range(0, total, batch_size):
        check_cancelled(cancel, "the embedding")
        chunk = windows[first : first + batch_size]
        crops = []
        for z, corner in chunk:
            region = tuple(slice(c, c + roi) for c in corner)
            crops.append(padded[region] if z is None else padded[z][region])
        batch = torch.from_numpy(np.stack(crops)[:, None]).to(device)
        with torch.inference_mode():
            feats = encoder(batch, class_attention=False).stages[stage].float().cpu().numpy()
        for (z, corner), feat in zip(chunk, feats, strict=True):
            cells = tuple(
                slice(c // token, c // token + n) for c, n in zip(corner, feat.shape[1:], strict=True)
            )
            target = cells if z is None else (slice(z, z + 1), *cells)
            acc[(slice(None), *target)] += feat if z is None else feat[:, None]
            count[target] += 1
        yield ProgressEvent(min(first + batch_size, total), total, "encoder features")
    return acc / np.maximum(count, 1), factor  # type: ignore[return-value]


def random_init_encoder(arch: Any, seed: int, kind: type | None = None) -> Any:
    """An untrained encoder of ``arch`` (a `SwinEncoder`, or ``kind``: the class of the run's published encoder,
    e.g. CASS's CNN), initialised from ``seed`` (the random-init control)."""
    import torch

    from napari_dagman.core.models.encoder import SwinEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (kind or SwinEncoder)(arch).eval()


def model_spacing_mm(volume: Volume, pretrained: PretrainedEncoder) -> float:
    """The finest spacing of the grid the encoder reads (the run's; the image's own in-plane spacing when the run
    keeps it): what a patch given in mm is counted in."""
    if pretrained.spacing is not None:
        return float(pretrained.spacing)
    return float(min(volume.spacing[1:]))


def init_seed(config: EmbedConfig) -> int:
    """The seed of the random-init control's weights: ``init_seed``, else the job's ``seed``."""
    return config.seed if config.init_seed is None else int(config.init_seed)


def load_encoder(config: EmbedConfig) -> PretrainedEncoder:
    """The run's encoder named in ``config.checkpoint``, with a message that says what is wrong otherwise."""
    from napari_dagman.core.checkpoint import load_pretrained_encoder

    if not config.checkpoint:
        raise DagmanInputError(
            "no run folder given: choose a pretraining run (its encoder describes the patches)"
        )
    try:
        return load_pretrained_encoder(config.checkpoint, config.which, weights=config.weights)
    except CheckpointError as err:
        raise CheckpointError(f"cannot use {config.checkpoint} as an encoder: {err}") from None


def _labels_on_model_grid(
    labels: Volume, volume: Volume, pv: PreparedVolume, resample: bool
) -> tuple[np.ndarray, dict[int, str]]:
    if not volume.same_grid(labels):
        if not resample:
            require_same_grid(volume, labels)
        labels = resample_like(labels, volume, is_label=True)
    array = np.asarray(labels.array)
    if array.dtype.kind not in "ui" or (array.size and array.min() < 0):
        raise DagmanInputError(f"the label map must hold non-negative integers, got {array.dtype}")
    names = names_in(array, labels.metadata.get("label_names"))
    on_model = resample_to_spacing(labels, pv.spacing, is_label=True)
    if on_model.shape != pv.array.shape or not np.allclose(on_model.origin, pv.origin, atol=1e-3):
        raise DagmanError("internal error: the label map and the image resampled to different grids")
    return np.asarray(on_model.array), names


@dataclass
class _Layout:
    """Where the patches of one volume lie on its model grid."""

    patch: tuple[int, int, int]  # patch side per axis, model voxels
    factor: tuple[int, int, int]  # model voxels per token of the chosen stage
    starts: np.ndarray  # (N, 3) first voxel of each patch
    sampled: np.ndarray  # (N,) index into SAMPLING_NAMES
    tokens: bool  # one patch per token (token pooling)


def _layout(config: EmbedConfig, arch: Any, pv: PreparedVolume, label_array: np.ndarray | None) -> _Layout:
    """Patch size and starts: the lattice and/or organ-centred patches, or the token grid."""
    tokens = config.pooling == "token"
    token = arch.stage_stride(config.stage)
    factor = (token,) * 3 if arch.dims == 3 else (1, token, token)
    patch = factor if tokens else axis_sizes(config.patch, arch.dims, pv.spacing)
    stride = factor if tokens else axis_sizes(config.stride, arch.dims, pv.spacing)
    shape = pv.array.shape
    if any(s < p for s, p in zip(shape, patch, strict=True)):
        size_mm = " x ".join(f"{s * sp:.0f}" for s, sp in zip(shape, pv.spacing, strict=True))
        raise DagmanInputError(
            f"the image is {' x '.join(map(str, shape))} voxels ({size_mm} mm) at the run's spacing, smaller "
            f"than one patch of {' x '.join(map(str, patch))} voxels; use a smaller patch"
        )
    starts = (
        grid_starts(shape, patch, stride) if config.sampling in ("grid", "both") else np.zeros((0, 3), int)
    )
    sampled = np.zeros(len(starts), np.uint8)
    if config.sampling in ("organs", "both") and label_array is not None:
        organ_starts = organ_centred_starts(label_array, patch, config.per_organ, config.seed, pv.spacing)
        starts = np.concatenate([starts, organ_starts]).astype(np.int64)
        sampled = np.concatenate([sampled, np.ones(len(organ_starts), np.uint8)])
    if len(starts) == 0:
        raise DagmanInputError("no patch to embed: the label map holds no organ to sample")
    patch = tuple(int(p) for p in patch)
    return _Layout(patch, tuple(int(f) for f in factor), starts, sampled, tokens)  # type: ignore[arg-type]


def _patch_features(
    config: EmbedConfig,
    pretrained: PretrainedEncoder,
    pv: PreparedVolume,
    layout: _Layout,
    cancel: CancelToken | None,
) -> Generator[ProgressEvent | LogEvent, None, np.ndarray]:
    """Features (N, C) of the patches of ``layout`` as ``config.features`` asks (`JobCancelled` when cancelled)."""
    from napari_dagman.core.devices import resolve_device

    patch, starts = layout.patch, layout.starts
    if config.features in ("encoder", "random-init"):
        token = pretrained.arch.stage_stride(config.stage)
        if not layout.tokens and min(patch[1:]) < token:
            yield LogEvent(
                f"patches of {config.patch} voxels are smaller than stage {config.stage}'s tokens ({token} "
                "voxels): patches inside one token get the same features; use a shallower stage or larger "
                "patches",
                "warning",
            )
        encoder = (
            pretrained.encoder
            if config.features == "encoder"
            else random_init_encoder(pretrained.encoder.arch, init_seed(config), type(pretrained.encoder))
        )
        result = yield from stage_feature_map(
            encoder,
            pv.array,
            stage=config.stage,
            roi=pretrained.roi,
            overlap=config.overlap,
            batch_size=config.batch_size,
            device=resolve_device(config.device),
            cancel=cancel,
        )
        fmap, _ = result
        if layout.tokens:
            n = [s // f for s, f in zip(pv.array.shape, layout.factor, strict=True)]
            return fmap[:, : n[0], : n[1], : n[2]].reshape(fmap.shape[0], -1).T
        return pool_patches(fmap, layout.factor, starts, patch)
    if config.features == "intensity":
        # the histogram of exactly what the encoder sees: the run's HU window scaled to [0, 1]
        bins = np.minimum((pv.array * config.hist_bins).astype(np.int64), config.hist_bins - 1) + 1
        counts = box_counts(bins, starts, patch, top=config.hist_bins)
        return counts[:, 1:] / float(np.prod(patch))
    # position
    centres = starts + (np.asarray(patch, float) - 1.0) / 2.0
    return pv.index_to_physical(centres)


def embed_volume(
    volume: Volume,
    pretrained: PretrainedEncoder,
    config: EmbedConfig,
    *,
    labels: Volume | None = None,
    cache: EmbeddingCache | None = None,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent | LogEvent, None, PatchEmbeddings]:
    """Patch (or token) features of a whole volume; yields progress, returns `PatchEmbeddings` (`JobCancelled` when
    cancelled: the one cancel contract of `core.events`).

    ``config.features`` picks the run's encoder or a control computed on the same patches. ``labels`` must be on
    the image grid (or ``config.resample_labels`` set). Raises `DagmanInputError` for a volume smaller than one
    patch, labels on another grid and organ sampling without labels.
    """
    config = config.resolved(model_spacing_mm(volume, pretrained), labels is not None)
    if config.sampling != "grid" and labels is None:
        raise DagmanInputError(f"sampling '{config.sampling}' places patches inside organs: give a label map")
    key = embedding_key(config, volume, labels, pretrained) if cache is not None else ""
    if cache is not None:
        hit = cache.load(key)
        if hit is not None:
            yield LogEvent(f"embeddings loaded from the cache ({len(hit)} patches)")
            return hit

    pv = model_volume(
        volume, dims=pretrained.arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range
    )
    label_array, names = (None, {})
    if labels is not None:
        label_array, names = _labels_on_model_grid(labels, volume, pv, config.resample_labels)
    layout = _layout(config, pretrained.arch, pv, label_array)
    features = yield from _patch_features(config, pretrained, pv, layout, cancel)

    emb = PatchEmbeddings(
        features=np.ascontiguousarray(features, dtype=np.float32),
        starts=layout.starts,
        patch=layout.patch,
        sampled=layout.sampled,
        model_spacing=tuple(pv.spacing),
        model_origin=tuple(pv.origin),
        model_direction=np.asarray(pv.direction),
        source_geometry=volume.geometry(),
        organ_names=names,
        settings={
            **{name: getattr(config, name) for name in FEATURE_SETTINGS},
            "checkpoint": pretrained.source,
            "which": pretrained.which,
            "method": pretrained.method,
            "run_spacing": pretrained.spacing,
            "hu_range": list(pretrained.hu_range),
            "roi": pretrained.roi,
            "seed": config.seed,
            "init_seed": init_seed(config),
        },
        key=key,
    )
    if label_array is not None:
        emb.organ_id, emb.purity = patch_organs(label_array, layout.starts, layout.patch)
    if cache is not None:
        cache.save(emb)
        yield from cache.warnings()
    return emb
