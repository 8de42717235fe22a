"""The attention job that ``napari-dagman attention`` and the explorer share, and its writer."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from napari_dagman.core.attention.maps import AttentionMaps, attention_maps, map_head_diversity
from napari_dagman.core.attention.preview import CropPreview, PreviewRecipe, crop_preview, save_preview_figure
from napari_dagman.core.config import AttentionConfig
from napari_dagman.core.events import CancelToken, ProgressEvent
from napari_dagman.core.io import check_ct
from napari_dagman.core.masking import attention_strategies
from napari_dagman.core.pictures import CropPictures, method_pictures
from napari_dagman.core.volume import Volume

if TYPE_CHECKING:
    from napari_dagman.core.checkpoint import PretrainedEncoder


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
    #: the method's own pictures of the crop (MiM's levels, MIRAM's reconstructions), when it has any
    pictures: CropPictures | None = None
    #: each head's attention per organ (see `core.attention.organs`), when a label map was given
    organs: pd.DataFrame | None = None
    #: the sanity checks of the maps and their sentences (`core.attention.stats`), when computed
    stats: dict[str, Any] | None = None


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
        "probe": probe_figures(pretrained.source, pretrained.which),
    }


def probe_figures(source: str | Path, which: str) -> dict[str, Any]:
    """The last probe figures the run logged for its encoder ``which`` (`core.runs.probe_figures`: ``step``,
    ``head_diversity``, ``head_js``, ``entropy_mean``...), {} when it logged none."""
    from napari_dagman.core.runs import probe_figures as run_probes

    return dict(run_probes(source).get(which, {}))


def preview_recipe(config: AttentionConfig, pretrained: PretrainedEncoder) -> PreviewRecipe:
    """The run's own mask recipe, with the ratio and the teacher's input dropout the job overrides."""
    recipe = PreviewRecipe.of_run(pretrained.run_config)
    if config.ratio is not None:
        recipe = recipe.replace(masks=replace(recipe.masks, ratio=float(config.ratio)))
    if config.noise_rate is not None:
        recipe = recipe.replace(noise_rate=float(config.noise_rate))
    return recipe


def volume_slab(volume: Volume, z: int) -> Volume:
    """Axial slice ``z`` of a volume as a one-slice volume at its physical place (2D models' "this slice")."""
    from napari_dagman.core.errors import DagmanInputError

    if not 0 <= z < volume.shape[0]:
        raise DagmanInputError(f"slice {z} is outside the image (0..{volume.shape[0] - 1})")
    origin = volume.index_to_physical((z, 0, 0))
    return Volume(
        volume.array[z : z + 1], volume.spacing, origin, volume.direction.copy(), dict(volume.metadata)
    )


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
    labels: Volume | None = None,
    encoder: PretrainedEncoder | None = None,
    keep_encoder: bool = True,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, AttentionResult]:
    """Attention maps for ``config.scope`` (when ``config.maps``) and the masks of every strategy for the crop at
    ``config.center``; yields progress and warnings, returns an `AttentionResult`.

    ``labels`` (a label map of the CT) adds each head's attention per organ. ``encoder`` reuses an already loaded
    network (thread jobs); otherwise the run is loaded, and returned with the result when ``keep_encoder`` (a
    child process passes False: the network is not worth pickling back).
    """
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.events import LogEvent

    config.validate()
    check_ct(volume, f"'{volume.metadata.get('name', 'the image')}'")
    pretrained = encoder or load_attention_encoder(config)
    refuse_unusable(config, pretrained)
    device = resolve_device(config.device)
    scope = config.scope
    trained = pretrained.trains_class_attention
    pictures = None if trained else (yield from own_pictures(config, pretrained, volume, device))
    preview = crop_preview(
        pretrained,
        volume,
        config.center or None,
        recipe=preview_recipe(config, pretrained),
        strategies=config.strategies,
        seed=config.seed,
        device=device,
    )
    if not trained:  # masks chosen by an untrained attention would be noise presented as a choice
        untrained = attention_strategies() | {"noisy-teacher"}
        preview.masks = {k: v for k, v in preview.masks.items() if k not in untrained}
    maps = (
        (yield from scope_maps(config, pretrained, volume, preview, device, cancel))
        if trained and config.maps
        else None
    )
    diversity = map_head_diversity(maps.maps) if maps is not None else dict(preview.diversity)
    organs = None
    if labels is not None and maps is not None:
        from napari_dagman.core.attention.organs import attention_by_organ
        from napari_dagman.core.labels import names_in

        organs = attention_by_organ(
            maps, labels, names_in(np.asarray(labels.array), labels.metadata.get("label_names") or {})
        )
    stats = None
    if trained and config.maps and config.checks:
        from napari_dagman.core.attention.stats import attention_stats

        yield LogEvent("sanity checks: the same maps from random networks, intensity, a shifted crop")
        stats = attention_stats(
            pretrained,
            volume,
            preview,
            scope=scope,
            slice_index=config.slice_index,
            seeds=config.check_seeds,
            device=device,
        )
        if maps is not None:  # the flat verdicts travel with the maps (layer names, tiles)
            maps.metadata["flat_heads"] = [stats["heads"][str(h)]["flat"] for h in range(maps.maps.shape[0])]
    return AttentionResult(
        maps,
        preview,
        diversity,
        scope,
        describe_encoder(pretrained),
        pretrained if keep_encoder else None,
        config.to_dict(),
        pictures,
        organs,
        stats,
    )


def refuse_unusable(config: AttentionConfig, pretrained: PretrainedEncoder) -> None:
    """One line, before any map is computed, for an encoder without attention or a slice of a 3D model."""
    from napari_dagman.core.errors import DagmanInputError

    if pretrained.kind != "swin":
        raise DagmanInputError(
            f"the run's '{pretrained.which}' encoder is a {pretrained.kind}: it has no attention; choose one of "
            f"{', '.join(n for n in pretrained.available if n != pretrained.which) or 'its other encoders'}"
        )
    if config.maps and config.scope == "slice" and pretrained.arch.dims == 3:
        raise DagmanInputError("this run's model is 3D: it sees volumes, not slices; choose 'crop' or 'volume'")


def own_pictures(
    config: AttentionConfig, pretrained: PretrainedEncoder, volume: Volume, device: Any
) -> Generator[Any, None, Any]:
    """What a method without class attention shows instead (MiM, MIRAM: its own pictures), with a warning saying
    so. Rebuilding a method and running one of its steps costs more than the crop's masks, so only these methods
    pay it."""
    from napari_dagman.core.events import LogEvent

    pictures = None
    if config.checkpoint and Path(config.checkpoint).is_dir():
        pictures = method_pictures(
            config.checkpoint, volume, config.center or None, seed=config.seed, weights=config.weights, device=device
        )
    shown = ", ".join(p.name for p in pictures.pictures) if pictures and pictures.pictures else "random and block masks"
    yield LogEvent(
        f"{pretrained.method} does not train the class attention, so there is no attention to show; showing "
        f"what the method has instead: {shown}",
        "warning",
    )
    return pictures


def scope_maps(
    config: AttentionConfig,
    pretrained: PretrainedEncoder,
    volume: Volume,
    preview: CropPreview,
    device: Any,
    cancel: CancelToken | None,
) -> Generator[Any, None, AttentionMaps]:
    """The maps of the config's scope: the crop's (the preview already computed them), or sliding windows over the
    displayed slice or the whole volume."""
    if config.scope == "crop":
        return AttentionMaps(
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
    source = volume_slab(volume, config.slice_index) if config.scope == "slice" else volume
    maps = yield from attention_maps(
        pretrained,
        source,
        overlap=config.overlap,
        batch_size=config.batch_size,
        subtoken=config.subtoken,
        device=device,
        cancel=cancel,
    )
    return maps


def check_comparable(a: PretrainedEncoder, b: PretrainedEncoder) -> None:
    """Refuse two runs whose maps cannot be laid over each other (architecture or input convention)."""
    from napari_dagman.core.errors import DagmanInputError

    diff = a.arch.differences(b.arch)
    for what, x, y in (
        ("ROI", a.roi, b.roi),
        ("spacing", a.spacing, b.spacing),
        ("HU range", a.hu_range, b.hu_range),
    ):
        if x != y:
            diff.append(f"{what} {x} vs {y}")
    if diff:
        raise DagmanInputError(
            f"cannot compare {Path(a.source).parent.name} with {Path(b.source).parent.name}: another "
            f"architecture or input ({'; '.join(diff)})"
        )


@dataclass
class Comparison:
    """Two runs' results on the same CT, crop and seed, and the difference of their mean maps (first - second)."""

    first: AttentionResult
    second: AttentionResult
    difference: AttentionMaps | None


def compare_job(
    config: AttentionConfig,
    volume: Volume,
    *,
    labels: Volume | None = None,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, Comparison]:
    """`attention_job` for ``config.checkpoint`` and for ``config.compare``, checked comparable before any work."""
    from napari_dagman.core.errors import DagmanInputError

    if not config.compare:
        raise DagmanInputError("no second run to compare with (--compare RUN)")
    other = config.replace(checkpoint=config.compare, compare=None)
    a, b = load_attention_encoder(config), load_attention_encoder(other)
    check_comparable(a, b)
    first = yield from attention_job(
        config, volume, labels=labels, encoder=a, keep_encoder=False, cancel=cancel
    )
    second = yield from attention_job(
        other, volume, labels=labels, encoder=b, keep_encoder=False, cancel=cancel
    )
    difference = None
    if first.maps is not None and second.maps is not None and first.maps.maps.shape == second.maps.maps.shape:
        m = first.maps
        difference = AttentionMaps(
            maps=(first.maps.maps - second.maps.maps).astype(np.float32),
            scale=m.scale,
            translate=m.translate,
            direction=m.direction,
            token_size=m.token_size,
            windows=m.windows,
            diversity={},
            metadata={
                **m.metadata,
                "difference": f"{first.model.get('method')} - {second.model.get('method')}",
            },
        )
    if first.maps is not None and second.maps is not None and first.maps.maps.shape == second.maps.maps.shape:
        from napari_dagman.core.attention.stats import comparison_stats

        agreement = comparison_stats(first.maps.mean, second.maps.mean)
        for result in (first, second):
            if result.stats is not None:
                result.stats["comparison"] = agreement
    return Comparison(first, second, difference)


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

    def put(vol: Volume, name: str, *, labels: dict[int, str] | None = None) -> None:
        nonlocal written
        if on_image_grid:
            vol = resample_like(vol, image, is_label=labels is not None)
        written += write_volume(vol, out / name, label_names=labels)

    if result.maps is not None:
        for name, vol in result.maps.volumes().items():
            put(vol, f"{prefix}_{name}.nii.gz")
            if result.settings.get("smooth") and not on_image_grid:  # the same map, interpolated onto the CT
                written += write_volume(
                    resample_like(vol, image, is_label=False), out / f"{prefix}_{name}_smooth.nii.gz"
                )
    if result.organs is not None:
        atomic_write_text(
            out / "attention_by_organ.csv", result.organs.to_csv(index=False, float_format="%.6g")
        )
        written.append(str(out / "attention_by_organ.csv"))
    if result.stats is not None:
        atomic_write_text(
            out / "attention_stats.json", json.dumps(result.stats, indent=2, default=float) + "\n"
        )
        written.append(str(out / "attention_stats.json"))
    p = result.preview
    if p is not None:
        direction = image.direction.copy()
        for strategy, mask in p.masks.items():
            vol = Volume(mask.astype(np.uint8), p.mask_scale, p.mask_translate, direction, dict(meta))
            put(vol, f"mask_{strategy}.nii.gz", labels={1: "masked"})
        if np.any(p.teacher_dropped):
            vol = Volume(
                p.teacher_dropped.astype(np.uint8), p.mask_scale, p.mask_translate, direction, dict(meta)
            )
            put(vol, "teacher_dropped.nii.gz", labels={1: "not seen by the noisy teacher"})
    if result.pictures is not None:
        for picture in result.pictures.pictures:
            slug = "".join(c if c.isalnum() else "_" for c in picture.name).strip("_")
            vol = result.pictures.volume(picture, meta)
            put(
                vol,
                f"picture_{slug}.nii.gz",
                labels=picture.names or {1: picture.name} if picture.kind == "labels" else None,
            )
    if figure and p is not None:
        crop = Volume(p.image, p.image_scale, p.image_translate, image.direction.copy(), dict(meta))
        written += write_volume(crop, out / "crop_model_input.nii.gz")
        m = result.model
        trained = bool(m.get("trains_class_attention", True))
        title = f"{m.get('method')} ({m.get('which')}), step {m.get('step')}"
        if save_preview_figure(p, out / "mask_previews.png", title=title, attention_panel=trained):
            written.append(str(out / "mask_previews.png"))
        report = {
            "checkpoint": m.get("source"),
            "which": m.get("which"),
            "method": m.get("method"),
            "step": m.get("step"),
            "image": str(image.metadata.get("source_path", image.metadata.get("name", ""))),
            "scope": result.scope,
            "maps": result.maps.diversity if result.maps is not None else None,
            "shown_maps": dict(result.diversity) if trained else None,
            "crop": dict(p.diversity) if trained else None,
            "crop_start_model_voxels": list(p.start),
            "mask_recipe": p.recipe,
            "mask_ratio": result.settings.get("ratio"),
            "masked_cells": {k: int(v.sum()) for k, v in p.masks.items()},
            "teacher_dropped_cells": int(p.teacher_dropped.sum()) if np.any(p.teacher_dropped) else None,
            "pictures": [q.name for q in result.pictures.pictures] if result.pictures is not None else [],
            "trains_class_attention": m.get("trains_class_attention"),
            "probe_head_diversity": m.get("probe", {}),
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
