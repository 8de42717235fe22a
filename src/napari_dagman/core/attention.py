"""Attention maps of the semantic class attention, mask previews and head-diversity figures."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_dagman.core.config import AttentionConfig
from napari_dagman.core.data import model_volume
from napari_dagman.core.diversity import head_diversity
from napari_dagman.core.events import CancelToken, JobCancelled, ProgressEvent, check_cancelled
from napari_dagman.core.masking import attention_to_cells, make_mask, random_mask, strategy_names
from napari_dagman.core.models.encoder import cell_stage_token_mask, cell_token_mask
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


def attention_maps(
    pretrained: PretrainedEncoder,
    volume: Volume,
    *,
    overlap: float = 0.25,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, AttentionMaps]:
    """Sliding-window class attention over a whole volume; yields progress, returns `AttentionMaps`.

    The volume is resampled to the run's spacing and HU range; windows of the run's ROI step by a multiple of
    the token size (so their token grids line up) and the volume is padded with air at its far end to fit.
    A 2D model runs over every axial slice.
    """
    from monai.data.utils import dense_patch_slices

    arch = pretrained.arch
    roi, token = pretrained.roi, arch.attention_stride
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    array = pv.array
    step = max(token, int(round(roi * (1.0 - overlap) / token)) * token)
    plane_axes = (0, 1, 2) if arch.dims == 3 else (1, 2)
    padded_shape = list(array.shape)
    for axis in plane_axes:
        starts = window_starts(array.shape[axis], roi, step)
        padded_shape[axis] = max(roi, starts[-1] + roi)
    padded = np.zeros(padded_shape, np.float32)
    padded[tuple(slice(0, s) for s in array.shape)] = array

    factor = (token, token, token) if arch.dims == 3 else (1, token, token)
    grid_shape = [-(-s // f) for s, f in zip(padded_shape, factor, strict=True)]
    heads = arch.sca_heads
    acc = np.zeros((heads, *grid_shape), np.float64)
    count = np.zeros(grid_shape, np.float64)
    diversities: list[float] = []
    entropies: list[float] = []

    if arch.dims == 3:
        slices = dense_patch_slices(padded_shape, (roi,) * 3, (step,) * 3)
        windows = [(s, None) for s in slices]
    else:
        in_plane = dense_patch_slices(padded_shape[1:], (roi, roi), (step, step))
        windows = [(s, z) for z in range(padded_shape[0]) for s in in_plane]
    encoder = pretrained.encoder.to(device)
    total = len(windows)
    for first in range(0, total, batch_size):
        check_cancelled(cancel, "the attention computation")
        chunk = windows[first : first + batch_size]
        crops = [padded[sl] if z is None else padded[z][sl] for sl, z in chunk]
        batch = torch.from_numpy(np.stack(crops)[:, None]).to(device)
        rel = _window_attention(encoder, batch).cpu().numpy()
        flat = rel.reshape(rel.shape[0], heads, -1)
        div = head_diversity(torch.from_numpy(flat / flat.sum(axis=-1, keepdims=True)))
        diversities.append(div["diversity"])
        entropies.append(div["entropy_mean"])
        for (sl, z), window in zip(chunk, rel, strict=True):
            target = tuple(slice(s.start // token, s.stop // token) for s in sl)
            if z is not None:  # a 2D window on slice z: (heads, 1, gy, gx) onto (heads, z, ...)
                target = (slice(z, z + 1), *target)
                window = window[:, None]
            acc[(slice(None), *target)] += window
            count[target] += 1
        yield ProgressEvent(min(first + batch_size, total), total, "attention")

    maps = (acc / np.maximum(count, 1)).astype(np.float32)
    keep = tuple(-(-s // f) for s, f in zip(array.shape, factor, strict=True))
    maps = maps[(slice(None), *(slice(0, k) for k in keep))]
    scale, translate = grid_placement(pv.origin, pv.spacing, factor)
    meta = {k: v for k, v in volume.metadata.items() if k.startswith("source_") or k == "name"}
    return AttentionMaps(
        maps=maps,
        scale=scale,
        translate=translate,
        direction=pv.direction.copy(),
        token_size=factor,
        windows=total,
        diversity={
            "diversity_mean_over_windows": float(np.mean(diversities)),
            "entropy_mean_over_windows": float(np.mean(entropies)),
            "windows": total,
        },
        metadata=meta,
    )


#: the name this exception had before every job shared one cancel contract (`core.events.JobCancelled`)
DagmanCancelled = JobCancelled


# ---------------------------------------------------------------------------------------------------------
# One crop: attention and the mask each strategy would draw
# ---------------------------------------------------------------------------------------------------------
#: The mask previews offered, in display order (the noisy teacher is attention-high after input dropout).
PREVIEW_STRATEGIES: tuple[str, ...] = (
    "random",
    "block",
    "attention-high",
    "attention-low",
    "attention-hint",
    "noisy-teacher",
)


@dataclass
class CropPreview:
    """A crop of the model volume, its class attention and the masks of each strategy, in physical space."""

    image: np.ndarray  # (z, y, x) model intensities; z = 1 for a 2D model
    image_scale: list[float]
    image_translate: list[float]
    attention: np.ndarray  # (heads, *token grid) relative attention
    attention_scale: list[float]
    attention_translate: list[float]
    masks: dict[str, np.ndarray]  # strategy -> (*cell grid) uint8
    #: cells the noisy teacher dropped from its input when it drew the ``noisy-teacher`` mask
    teacher_dropped: np.ndarray
    mask_scale: list[float]
    mask_translate: list[float]
    diversity: dict[str, Any]
    start: tuple[int, int, int]  # crop start in the model volume (z, y, x)


def crop_start(shape: Sequence[int], center: Sequence[float], roi: int, dims: int) -> tuple[int, int, int]:
    """Start index of a ``roi`` crop centred on ``center`` (model-volume voxels), clamped inside the volume."""
    out = []
    for axis, (size, c) in enumerate(zip(shape, center, strict=True)):
        if dims == 2 and axis == 0:
            out.append(int(np.clip(round(c), 0, size - 1)))
            continue
        out.append(int(np.clip(round(c - roi / 2), 0, max(0, size - roi))))
    return tuple(out)  # type: ignore[return-value]


def crop_preview(
    pretrained: PretrainedEncoder,
    volume: Volume,
    center: Sequence[float] | None = None,
    *,
    ratio: float = 0.6,
    mask_cell: int | None = None,
    noise_rate: float = 0.2,
    hint_fraction: float = 0.1,
    hint_pool: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CropPreview:
    """Attention and mask previews for the crop around a physical point (default: the body's centre).

    ``center`` is a physical (napari world) position z, y, x in mm. The masks use the same generators as
    training; ``noisy-teacher`` is attention-high on the attention the encoder gives when ``noise_rate`` of
    the cells are dropped from its input (DAGMaN's teacher).
    """
    arch = pretrained.arch
    roi, token = pretrained.roi, arch.attention_stride
    cell = mask_cell or int(pretrained.run_config.get("mask_cell", token))
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    shape = pv.array.shape
    need = (1, roi, roi) if arch.dims == 2 else (roi, roi, roi)
    array = pv.array
    if any(s < n for s, n in zip(shape, need, strict=True)):
        pad = [(0, max(0, n - s)) for s, n in zip(shape, need, strict=True)]
        array = np.pad(array, pad)
    if center is None:
        body = np.argwhere(pv.array > 0)
        index = body.mean(axis=0) if len(body) else np.asarray(shape) / 2
    else:
        p = np.asarray(center, float) - np.asarray(pv.origin)
        index = (p @ np.linalg.inv(pv.direction).T) / np.asarray(pv.spacing)
    start = crop_start(array.shape, index, roi, arch.dims)
    if arch.dims == 3:
        crop = array[start[0] : start[0] + roi, start[1] : start[1] + roi, start[2] : start[2] + roi]
        x = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
        factor_cells, factor_tokens = (cell,) * 3, (token,) * 3
        image = crop
    else:
        crop = array[start[0], start[1] : start[1] + roi, start[2] : start[2] + roi]
        x = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
        factor_cells, factor_tokens = (1, cell, cell), (1, token, token)
        image = crop[None]
    encoder = pretrained.encoder.to(device)
    with torch.no_grad():
        clean = encoder(x.to(device))
    grid = clean.grid
    cells = (roi // cell,) * arch.dims
    attention = clean.attention.float().cpu()
    generator = torch.Generator().manual_seed(seed)
    mean_cells = attention_to_cells(attention.mean(1).reshape(1, *grid), cells)

    masks: dict[str, np.ndarray] = {}
    for strategy in strategy_names():
        m = make_mask(
            strategy,
            batch=1,
            grid=cells,
            ratio=ratio,
            attention=mean_cells,
            generator=generator,
            hint_fraction=hint_fraction,
            hint_pool=hint_pool,
        )
        masks[strategy] = m[0].numpy().astype(np.uint8)
    # the noisy teacher as in training (methods/dagman.py): drop cells, leave their tokens out of the class
    # attention, rank the seen cells and hide the dropped ones at the same ratio; its own seeded stream
    noisy_gen = torch.Generator().manual_seed(seed)
    dropped = random_mask(1, cells, noise_rate, noisy_gen)
    with torch.no_grad():
        noisy = encoder(
            x.to(device),
            cell_token_mask(dropped, cell, arch.patch_size, arch.dims).to(device),
            attention_ignore=cell_stage_token_mask(dropped, cell, token, arch.dims).to(device)
            if bool(dropped.any())
            else None,
        )
    noisy_cells = attention_to_cells(noisy.attention.float().cpu().mean(1).reshape(1, *grid), cells)
    masks["noisy-teacher"] = (
        make_mask(
            "attention-high",
            batch=1,
            grid=cells,
            ratio=ratio,
            attention=noisy_cells,
            generator=noisy_gen,
            unseen=dropped,
        )[0]
        .numpy()
        .astype(np.uint8)
    )
    teacher_dropped = dropped[0].numpy().astype(np.uint8)

    rel = (attention[0] * attention.shape[-1]).reshape(attention.shape[1], *grid).numpy()
    if arch.dims == 2:
        rel = rel[:, None]
        masks = {k: v[None] for k, v in masks.items()}
        teacher_dropped = teacher_dropped[None]
    origin = pv.index_to_physical(start)
    image_scale = list(pv.spacing)
    mask_scale, mask_translate = grid_placement(origin, pv.spacing, factor_cells)
    att_scale, att_translate = grid_placement(origin, pv.spacing, factor_tokens)
    return CropPreview(
        image=np.asarray(image, np.float32),
        image_scale=image_scale,
        image_translate=[float(o) for o in origin],
        attention=rel.astype(np.float32),
        attention_scale=att_scale,
        attention_translate=att_translate,
        masks=masks,
        teacher_dropped=teacher_dropped,
        mask_scale=mask_scale,
        mask_translate=mask_translate,
        diversity=head_diversity(attention),
        start=start,
    )


def save_preview_figure(preview: CropPreview, path: str | Path, *, title: str = "") -> None:
    """PNG of the crop's middle axial slice: the mean attention and each strategy's mask side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    z = preview.image.shape[0] // 2
    image = preview.image[z]
    token = int(round(preview.attention_scale[-1] / preview.image_scale[-1]))
    cell = int(round(preview.mask_scale[-1] / preview.image_scale[-1]))
    token_z = min(
        preview.attention.shape[1] - 1,
        z // max(1, int(round(preview.attention_scale[0] / preview.image_scale[0]))),
    )
    cell_z = min(
        next(iter(preview.masks.values())).shape[0] - 1,
        z // max(1, int(round(preview.mask_scale[0] / preview.image_scale[0]))),
    )
    attention = np.kron(preview.attention.mean(axis=0)[token_z], np.ones((token, token)))
    panels = [("mean attention", attention, "inferno")] + [
        (name, np.kron(mask[cell_z], np.ones((cell, cell))), "Reds") for name, mask in preview.masks.items()
    ]
    fig = Figure(figsize=(2.2 * len(panels), 2.6), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (name, overlay, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if cmap == "Reds":  # hidden cells in red, visible cells untouched
            ax.imshow(np.ma.masked_equal(overlay, 0), cmap=cmap, vmin=0, vmax=1.2, alpha=0.55)
        else:
            ax.imshow(overlay, cmap=cmap, alpha=0.5)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(str(path), dpi=110)


# ---------------------------------------------------------------------------------------------------------
# The attention job (CLI `napari-dagman attention` and the explorer dock) and its writer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class AttentionResult:
    """Maps per head (token grid, when computed), the crop's masks, head-diversity figures, the model's facts."""

    maps: AttentionMaps | None
    preview: CropPreview | None
    diversity: dict[str, Any]
    scope: str
    model: dict[str, Any] = field(default_factory=dict)
    encoder: PretrainedEncoder | None = None  # returned to thread jobs so the dock can reuse it
    settings: dict[str, Any] = field(default_factory=dict)  # the AttentionConfig that made it


def describe_encoder(pretrained: PretrainedEncoder) -> dict[str, Any]:
    """Plain facts about a loaded encoder for labels and reports (picklable)."""
    return {
        "method": pretrained.method,
        "which": pretrained.which,
        "step": pretrained.step,
        "source": pretrained.source,
        "dims": pretrained.arch.dims,
        "roi": pretrained.roi,
        "heads": pretrained.arch.sca_heads,
        "trains_class_attention": pretrained.trains_class_attention,
    }


def volume_slab(volume: Volume, z: int) -> Volume:
    """Axial slice ``z`` of a volume as a one-slice volume at its physical place (2D models' "this slice")."""
    from napari_dagman.core.errors import DagmanInputError

    if not 0 <= z < volume.shape[0]:
        raise DagmanInputError(f"slice {z} is outside the image (0..{volume.shape[0] - 1})")
    origin = volume.index_to_physical((z, 0, 0))
    return Volume(volume.array[z : z + 1], volume.spacing, origin, volume.direction.copy(), dict(volume.metadata))


def load_attention_encoder(config: AttentionConfig) -> PretrainedEncoder:
    """The run's encoder the config asks for, on its device."""
    from napari_dagman.core.checkpoint import load_pretrained_encoder
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.errors import DagmanInputError

    if not config.checkpoint:
        raise DagmanInputError("no run folder chosen: pick a pretraining run (or train one first)")
    return load_pretrained_encoder(
        config.checkpoint, config.which, weights=config.weights, device=resolve_device(config.device)
    )


def attention_job(
    config: AttentionConfig,
    volume: Volume,
    *,
    encoder: PretrainedEncoder | None = None,
    keep_encoder: bool = True,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, AttentionResult]:
    """Attention maps for ``config.scope`` (when ``config.maps``) and the masks of every strategy for the crop at
    ``config.center``; yields progress and warnings, returns an `AttentionResult`.

    ``encoder`` reuses an already loaded network (thread jobs); otherwise the run is loaded, and returned with
    the result when ``keep_encoder`` (a child process passes False: the network is not worth pickling back).
    """
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.events import LogEvent

    config.validate()
    pretrained = encoder or load_attention_encoder(config)
    if pretrained.kind != "swin":
        raise DagmanInputError(
            f"the run's '{pretrained.which}' encoder is a {pretrained.kind}: it has no attention; choose one of "
            f"{', '.join(n for n in pretrained.available if n != pretrained.which) or 'its other encoders'}"
        )
    device = resolve_device(config.device)
    scope = config.scope
    if config.maps and scope == "slice" and pretrained.arch.dims == 3:
        raise DagmanInputError("this run's model is 3D: it sees volumes, not slices; choose 'crop' or 'volume'")
    if not pretrained.trains_class_attention:
        yield LogEvent(
            f"{pretrained.method} does not train the class attention: its maps show an untrained module",
            "warning",
        )
    preview = crop_preview(
        pretrained,
        volume,
        config.center or None,
        ratio=config.ratio,
        noise_rate=config.noise_rate,
        seed=config.seed,
        device=device,
    )
    maps: AttentionMaps | None = None
    if config.maps and scope == "crop":
        maps = AttentionMaps(
            maps=preview.attention,
            scale=list(preview.attention_scale),
            translate=list(preview.attention_translate),
            direction=volume.direction.copy(),
            token_size=tuple(
                int(round(a / i)) for a, i in zip(preview.attention_scale, preview.image_scale, strict=True)
            ),
            windows=1,
            diversity=dict(preview.diversity),
            metadata={k: v for k, v in volume.metadata.items() if k.startswith("source_") or k == "name"},
        )
    elif config.maps:
        source = volume_slab(volume, config.slice_index) if scope == "slice" else volume
        maps = yield from attention_maps(
            pretrained, source, overlap=config.overlap, batch_size=config.batch_size, device=device, cancel=cancel
        )
    diversity = map_head_diversity(maps.maps) if maps is not None else dict(preview.diversity)
    return AttentionResult(
        maps,
        preview,
        diversity,
        scope,
        describe_encoder(pretrained),
        pretrained if keep_encoder else None,
        config.to_dict(),
    )


def write_attention(
    result: AttentionResult,
    image: Volume,
    folder: str | Path,
    *,
    on_image_grid: bool = False,
    prefix: str = "attention",
    figure: bool = False,
) -> list[str]:
    """Write the maps (mean and per head), the crop's masks and the noisy teacher's dropped cells as NIfTI.

    The files carry the physical geometry (spacing, origin, direction, source orientation), so they overlay the
    CT in any viewer. With ``on_image_grid`` the maps (linear) and masks (nearest) are resampled onto the CT's
    own voxel grid instead of the token or mask-cell grid. ``figure`` adds the crop's model input, a PNG of the
    masks side by side and ``head_diversity.json``. Returns the paths written.
    """
    import json

    from napari_dagman.core.io import atomic_write_text, resample_like, write_volume

    out = Path(folder)
    meta = {k: v for k, v in image.metadata.items() if k.startswith("source_")}
    written: list[str] = []

    def put(vol: Volume, name: str, *, label: str | None = None) -> None:
        nonlocal written
        if on_image_grid:
            vol = resample_like(vol, image, is_label=label is not None)
        written += write_volume(vol, out / name, label_names=None if label is None else {1: label})

    if result.maps is not None:
        for name, vol in result.maps.volumes().items():
            put(vol, f"{prefix}_{name}.nii.gz")
    p = result.preview
    if p is not None:
        direction = image.direction.copy()
        for strategy, mask in p.masks.items():
            vol = Volume(mask.astype(np.uint8), p.mask_scale, p.mask_translate, direction, dict(meta))
            put(vol, f"mask_{strategy}.nii.gz", label="masked")
        vol = Volume(p.teacher_dropped.astype(np.uint8), p.mask_scale, p.mask_translate, direction, dict(meta))
        put(vol, "teacher_dropped.nii.gz", label="not seen by the noisy teacher")
    if figure and p is not None:
        crop = Volume(p.image, p.image_scale, p.image_translate, image.direction.copy(), dict(meta))
        written += write_volume(crop, out / "crop_model_input.nii.gz")
        m = result.model
        save_preview_figure(p, out / "mask_previews.png", title=f"{m.get('method')} ({m.get('which')}), step {m.get('step')}")
        written.append(str(out / "mask_previews.png"))
        report = {
            "checkpoint": m.get("source"),
            "which": m.get("which"),
            "method": m.get("method"),
            "step": m.get("step"),
            "image": str(image.metadata.get("source_path", image.metadata.get("name", ""))),
            "scope": result.scope,
            "maps": result.maps.diversity if result.maps is not None else None,
            "shown_maps": {k: v for k, v in result.diversity.items()},
            "crop": dict(p.diversity),
            "crop_start_model_voxels": list(p.start),
            "mask_ratio": result.settings.get("ratio"),
            "masked_cells": {k: int(v.sum()) for k, v in p.masks.items()},
            "teacher_dropped_cells": int(p.teacher_dropped.sum()),
            "trains_class_attention": m.get("trains_class_attention"),
        }
        atomic_write_text(out / "head_diversity.json", json.dumps(report, indent=2) + "\n")
        written.append(str(out / "head_diversity.json"))
    return written


def export_attention_job(
    result: AttentionResult,
    image: Volume,
    folder: str | Path,
    *,
    on_image_grid: bool,
    prefix: str = "attention",
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, list[str]]:
    """`write_attention` as a job (resampling onto a large CT takes seconds: not in the GUI thread)."""
    yield ProgressEvent(0, 1, "export")
    paths = write_attention(result, image, folder, on_image_grid=on_image_grid, prefix=prefix)
    yield ProgressEvent(1, 1, "export")
    return paths
