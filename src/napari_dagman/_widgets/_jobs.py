"""The background jobs of the pretraining and attention docks: thin wrappers over `core` (Qt-free).

They run either in a worker thread or in a child process (`_subprocess`), so they take and return only
picklable values and import torch lazily. No science here: every number comes from `core`.
"""

from __future__ import annotations

import pickle
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman.core.errors import DagmanInputError

if TYPE_CHECKING:
    from napari_dagman.core.attention import AttentionMaps, CropPreview
    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import CancelToken
    from napari_dagman.core.volume import Volume

#: Where a map is computed: the crop around a point, the displayed axial slice (2D models) or every window.
SCOPES: tuple[str, ...] = ("crop", "slice", "volume")


def picklable_volume(volume: Volume) -> Volume:
    """The same volume with only the metadata that pickles (another reader plugin may store anything there)."""
    from napari_dagman.core.volume import Volume

    meta = {}
    for key, value in volume.metadata.items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        meta[key] = value
    return Volume(volume.array, volume.spacing, volume.origin, volume.direction, meta)


# --- pretraining ----------------------------------------------------------------------------------------------
def pretrain_job(
    config: PretrainConfig,
    volumes: Sequence[Volume] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str = "napari-dagman pretraining dock",
) -> Generator[Any, None, Any]:
    """`core.training.run_pretraining` on the chosen layers *and* the files in ``config.images``.

    The engine trains on in-memory volumes or on files; the dock offers both at once, so the files are read
    here (by the engine's own reader) and appended to the layers. ``config.images`` still lists the files, so
    config.json and run.json record them.
    """
    from napari_dagman.core.training import load_inputs, run_pretraining

    pool = list(volumes or [])
    if pool and config.images:
        pool.extend(load_inputs(config, None))
    result = yield from run_pretraining(config, pool or None, resume=resume, cancel=cancel, command=command)
    return result


# --- attention explorer ---------------------------------------------------------------------------------------
@dataclass
class ExplorerResult:
    """What the attention dock draws: maps per head (token grid), the crop's masks, head-diversity figures."""

    maps: AttentionMaps | None
    preview: CropPreview | None
    diversity: dict[str, Any]
    scope: str
    model: dict[str, Any] = field(default_factory=dict)
    encoder: PretrainedEncoder | None = None  # returned by thread jobs so the dock can reuse it


def describe_encoder(pretrained: PretrainedEncoder) -> dict[str, Any]:
    """Plain facts about a loaded encoder for the dock's labels (picklable)."""
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
    from napari_dagman.core.volume import Volume

    if not 0 <= z < volume.shape[0]:
        raise DagmanInputError(f"slice {z} is outside the image (0..{volume.shape[0] - 1})")
    origin = volume.index_to_physical((z, 0, 0))
    return Volume(
        volume.array[z : z + 1], volume.spacing, origin, volume.direction.copy(), dict(volume.metadata)
    )


def load_encoder(run: str, which: str, weights: str, device: str) -> PretrainedEncoder:
    from napari_dagman.core.checkpoint import load_pretrained_encoder
    from napari_dagman.core.devices import resolve_device

    if not run:
        raise DagmanInputError("no run folder chosen: pick a pretraining run (or train one first)")
    return load_pretrained_encoder(run, which, weights=weights, device=resolve_device(device))


def explorer_job(
    volume: Volume,
    *,
    run: str = "",
    which: str = "auto",
    weights: str = "last",
    encoder: PretrainedEncoder | None = None,
    scope: str = "crop",
    maps: bool = True,
    center: Sequence[float] | None = None,
    slice_index: int = 0,
    overlap: float = 0.25,
    ratio: float = 0.6,
    noise_rate: float = 0.2,
    seed: int = 0,
    device: str = "auto",
    keep_encoder: bool = True,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, ExplorerResult]:
    """Attention maps for ``scope`` (when ``maps``) and the masks of every strategy for the crop at ``center``.

    ``encoder`` reuses an already loaded network (thread jobs); otherwise ``run`` is loaded, and returned with
    the result when ``keep_encoder`` (a child process passes False: the network is not worth pickling back).
    ``center`` is a physical (LPS mm) point; ``slice_index`` the axial slice of ``volume`` for scope ``slice``.
    """
    from napari_dagman.core.attention import (
        AttentionMaps,
        attention_maps,
        crop_preview,
        map_head_diversity,
    )
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.events import LogEvent

    if scope not in SCOPES:
        raise DagmanInputError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    pretrained = encoder or load_encoder(run, which, weights, device)
    model = describe_encoder(pretrained)
    torch_device = resolve_device(device)
    if maps and scope == "slice" and pretrained.arch.dims == 3:
        raise DagmanInputError(
            "this run's model is 3D: it sees volumes, not slices; choose 'crop' or 'whole volume'"
        )
    if not pretrained.trains_class_attention:
        yield LogEvent(
            f"{pretrained.method} does not train the class attention: its maps show an untrained module",
            "warning",
        )
    preview = crop_preview(
        pretrained, volume, center, ratio=ratio, noise_rate=noise_rate, seed=seed, device=torch_device
    )
    result_maps: AttentionMaps | None = None
    if maps and scope == "crop":
        result_maps = AttentionMaps(
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
    elif maps:
        source = volume_slab(volume, slice_index) if scope == "slice" else volume
        result_maps = yield from attention_maps(
            pretrained, source, overlap=overlap, device=torch_device, cancel=cancel
        )
    diversity = map_head_diversity(result_maps.maps) if result_maps is not None else dict(preview.diversity)
    return ExplorerResult(result_maps, preview, diversity, scope, model, pretrained if keep_encoder else None)


def export_explorer(
    result: ExplorerResult, image: Volume, folder: str | Path, *, on_image_grid: bool
) -> list[str]:
    """Write the shown maps (mean and per head) and the crop's masks as NIfTI files; returns the paths.

    The files carry the physical geometry (spacing, origin, direction, source orientation), so they overlay
    the CT in any viewer. ``on_image_grid`` resamples them onto the CT's own voxel grid instead of the token
    or mask-cell grid (linear for maps, nearest for masks; zero outside the crop).
    """
    from napari_dagman.core.io import resample_like, write_volume
    from napari_dagman.core.volume import Volume

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in image.metadata.items() if k.startswith("source_")}
    written: list[str] = []
    if result.maps is not None:
        for name, vol in result.maps.volumes().items():
            if on_image_grid:
                vol = resample_like(vol, image, is_label=False)
            written += write_volume(vol, out / f"attention_{result.scope}_{name}.nii.gz")
    if result.preview is not None:
        p = result.preview
        for strategy, mask in p.masks.items():
            vol = Volume(
                mask.astype(np.uint8), p.mask_scale, p.mask_translate, image.direction.copy(), dict(meta)
            )
            if on_image_grid:
                vol = resample_like(vol, image, is_label=True)
            written += write_volume(vol, out / f"mask_{strategy}.nii.gz", label_names={1: "masked"})
        vol = Volume(
            p.teacher_dropped.astype(np.uint8), p.mask_scale, p.mask_translate, image.direction.copy(), dict(meta)
        )
        if on_image_grid:
            vol = resample_like(vol, image, is_label=True)
        written += write_volume(
            vol, out / "teacher_dropped.nii.gz", label_names={1: "not seen by the noisy teacher"}
        )
    return written


def export_job(
    result: ExplorerResult,
    image: Volume,
    folder: str | Path,
    *,
    on_image_grid: bool,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, list[str]]:
    """`export_explorer` as a job (resampling onto a large CT takes seconds: not in the GUI thread)."""
    from napari_dagman.core.events import ProgressEvent

    yield ProgressEvent(0, 1, "export")
    paths = export_explorer(result, image, folder, on_image_grid=on_image_grid)
    yield ProgressEvent(1, 1, "export")
    return paths
