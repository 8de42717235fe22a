"""The figures and plain sentences a user reads before a map (``attention_stats.json``, the explorer, the CLI).

`attention_stats` runs the checks of `core.attention.sanity` on the windows the maps of a scope come from (the
crop; the axial slice's windows for a 2D model; every window of the volume), adds the stability of the crop's map
under a shift of one token, and says each result in one sentence (`stats_sentences`); `comparison_stats` adds
the agreement of two runs' maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman.core.attention.sanity import (
    FLAT_BAND,
    attention_sanity,
    js_divergence_bits,
    shift_stability,
    volume_windows,
)
from napari_dagman.core.data import model_volume

if TYPE_CHECKING:
    from napari_dagman.core.attention.preview import CropPreview
    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.volume import Volume

#: |rank correlation| with intensity above which a map is said to follow intensity
FOLLOWS_INTENSITY = 0.5
#: correlation of shifted crops' maps above which a map is said to be stable
STABLE = 0.5


def scope_windows(pretrained: PretrainedEncoder, volume: Volume, scope: str, preview: CropPreview, slice_index: int = 0) -> np.ndarray:
    """The windows (W, 1, *roi) whose maps a scope shows: the crop, the slice's windows (2D), or the volume's."""
    arch, roi = pretrained.arch, pretrained.roi
    if scope == "crop":
        crop = preview.image if arch.dims == 3 else preview.image[0]
        return np.ascontiguousarray(crop[None, None], dtype=np.float32)
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    array = pv.array
    if scope == "slice" and arch.dims == 2:
        array = array[min(max(slice_index, 0), array.shape[0] - 1)][None]
    token = arch.attention_stride
    step = max(token, (roi // 2 // token) * token)
    return volume_windows(array, roi, arch.dims, step)


def shifted_crops(
    pretrained: PretrainedEncoder, volume: Volume, preview: CropPreview
) -> tuple[np.ndarray, list[tuple[np.ndarray, tuple[int, ...]]]]:
    """The preview's crop and crops of the same region shifted by one token along each (in-plane, in 2D) axis,
    with their shifts in tokens (towards the volume's inside where the crop touches its edge)."""
    arch, roi, token = pretrained.arch, pretrained.roi, pretrained.arch.attention_stride
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    need = (roi,) * 3 if arch.dims == 3 else (1, roi, roi)
    array = np.pad(pv.array, [(0, max(0, n - s)) for s, n in zip(pv.array.shape, need, strict=True)])
    start = list(preview.start)

    def cut(corner: Sequence[int]) -> np.ndarray:
        if arch.dims == 3:
            z, y, x = corner
            return array[z : z + roi, y : y + roi, x : x + roi][None]
        z, y, x = corner
        return array[z, y : y + roi, x : x + roi][None]

    base = cut(start)
    axes = (0, 1, 2) if arch.dims == 3 else (1, 2)
    out = []
    for axis in axes:
        room = array.shape[axis] - roi - start[axis]
        step = token if room >= token else (-token if start[axis] >= token else 0)
        if step == 0:
            continue
        corner = list(start)
        corner[axis] += step
        shift = [0] * len(axes)
        shift[axes.index(axis)] = step // token
        out.append((cut(corner).astype(np.float32), tuple(shift)))
    return base.astype(np.float32), out


def attention_stats(
    pretrained: PretrainedEncoder,
    volume: Volume,
    preview: CropPreview,
    *,
    scope: str,
    slice_index: int = 0,
    seeds: int = 3,
    device: Any = "cpu",
) -> dict[str, Any]:
    """The checks of `core.attention.sanity` for the maps of ``scope``, the crop's stability, and the sentences."""
    windows = scope_windows(pretrained, volume, scope, preview, slice_index)
    stats = attention_sanity(pretrained.encoder, windows, random_seeds=tuple(range(seeds)), device=device)
    base, shifted = shifted_crops(pretrained, volume, preview)
    stats["mean"]["stability"] = shift_stability(pretrained.encoder.to(device), base, shifted)
    stats["scope"] = scope
    stats["random_seeds"] = seeds
    stats["sentences"] = stats_sentences(stats)
    return stats


def comparison_stats(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """Agreement of two runs' mean maps (relative attention, same grid): Pearson correlation and JS divergence."""
    a, b = np.asarray(first, np.float64).ravel(), np.asarray(second, np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    r = float(np.corrcoef(a, b)[0, 1]) if a.size > 2 and a.std() > 0 and b.std() > 0 else float("nan")
    return {"correlation": r, "js_divergence": float(js_divergence_bits(a, b)) if a.size else float("nan")}


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def stats_sentences(stats: dict[str, Any]) -> list[dict[str, str]]:
    """One plain sentence per check, each with the figures behind it (``check``, ``text``, ``figures``)."""
    mean, heads, diversity = stats["mean"], stats["heads"], stats["head_diversity"]
    out: list[dict[str, str]] = []
    flat = [h for h, v in heads.items() if v["flat"]]
    peaks = ", ".join(f"head {h} {v['peak_x_uniform']:.2f}x" for h, v in heads.items())
    band = f"{1 / FLAT_BAND:.2f}-{FLAT_BAND:g} x uniform"
    if len(flat) == len(heads):
        text = f"Every head is flat: no token gets more than {FLAT_BAND:g} times its uniform share (or less than 2/3)."
    elif flat:
        text = f"Heads {', '.join(flat)} are flat; the others depart from uniform by more than {FLAT_BAND:g} times."
    else:
        text = f"No head is flat: each puts more than {FLAT_BAND:g} times its uniform share on some tokens."
    out.append({"check": "flat", "text": text, "figures": f"flat band {band}; peaks {peaks}"})

    if mean.get("distinguishable"):
        text = "The maps differ from random networks' more than random networks differ from each other."
    else:
        text = "The maps are indistinguishable from random initialisation: an untrained network draws much the same."
    out.append(
        {
            "check": "randomisation",
            "text": text,
            "figures": f"distance to random networks {_fmt(mean['randomisation_distance'], 5)} bits (closest "
            f"{_fmt(mean['randomisation_distance_min'], 5)}); between random networks up to "
            f"{_fmt(mean['random_init_spread_max'], 5)} bits ({stats.get('random_seeds', '?')} seeds); a flat map "
            f"differs from uniform by up to {_fmt(mean['flat_floor'], 5)} bits",
        }
    )

    r = mean.get("intensity_correlation")
    if isinstance(r, float) and math.isfinite(r) and abs(r) >= FOLLOWS_INTENSITY:
        text = f"The map mostly follows {'dark' if r < 0 else 'bright'} tissue: it ranks tokens by their intensity."
    elif isinstance(r, float) and math.isfinite(r):
        text = "The map does not simply follow intensity."
    else:
        text = "Intensity could not be compared (too few body tokens)."
    out.append({"check": "intensity", "text": text, "figures": f"rank correlation with the token's mean HU {_fmt(r, 2)}"})

    s = mean.get("stability")
    if isinstance(s, float) and math.isfinite(s):
        text = (
            "Shifting the crop by one token keeps the map's pattern."
            if s >= STABLE
            else "Shifting the crop by one token changes the map's pattern: read it as this crop's, not the region's."
        )
    else:
        text = "Stability could not be measured (a flat map or no room to shift)."
    out.append({"check": "stability", "text": text, "figures": f"correlation of the shifted crops' maps {_fmt(s, 2)}"})

    above = diversity["js_above_chance"] or diversity["diversity_above_chance"]
    text = "The heads differ more than random heads do." if above else "Head diversity is not above chance."
    out.append(
        {
            "check": "head diversity",
            "text": text,
            "figures": f"JS divergence {_fmt(diversity['js_divergence'], 5)} bits (floor: random or flat heads, "
            f"{_fmt(diversity['js_noise_floor'], 5)}); centred diversity {_fmt(diversity['diversity'])} (random "
            f"heads up to {_fmt(diversity['diversity_noise_floor'])})",
        }
    )
    return out
