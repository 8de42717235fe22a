"""Checks to run before an attention map is read (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018).

A class-attention map is a distribution over the tokens of one window. Before reading "where the network looks"
into it, three things must hold, and each is measured here on the windows the maps come from:

* **It is not flat.** ``normalised_entropy`` (entropy / log N, 1 = uniform) and ``peak_x_uniform`` (the largest
  weight times N: 1 = uniform, 4 = a token gets four times its share). Windows that reach past the volume are
  padded with air, and a map can look sharp only by ignoring the padding; ``body_normalised_entropy`` is the
  entropy of the map renormalised over the tokens that hold body (mean model intensity above 0).
* **It is not the architecture's.** The model-randomisation check: the same maps from untrained networks of the
  same architecture (seeded); ``randomisation_distance`` is the mean Jensen-Shannon divergence (bits) between the
  run's head-mean maps and each random network's, ``random_init_spread`` the mean divergence between two random
  networks. A map no further from random networks than they are from each other says nothing about training.
* **It is not only intensity.** ``intensity_correlation``: rank correlation over the body tokens of each window
  between the head-mean attention and the token's mean model intensity (HU mapped through the run's window),
  averaged over the windows; strongly negative = the map follows dark tissue.
* **It is stable.** ``stability``: the correlation of the maps of one region drawn from crops shifted by a token,
  on the tokens they share (`shift_stability`).

A map is called **flat** when, leaving out its 1 % most extreme tokens, every token stays within ``FLAT_BAND``
(2/3 to 3/2) of its uniform share. Why that band: the maps this project trained before its pretraining fixes sat
at 0.90-1.19 x uniform and look like anatomy under a percentile stretch; a 1.5-fold ripple is the smallest that
moves an attention-high mask away from a random one by more than one cell in ten (at ratio 0.6 on 64 cells), and
on the explorer's log scale (1/4 ... 4) it stays within the middle third of the colour bar, where it reads as
one colour. Head diversity is reported against a **noise floor**: the same figures on the heads of random
networks of the same architecture (`head_diversity_floor`); a figure at or under the floor is "not above chance".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_dagman.core.volume import window_starts

#: A map is flat when its tokens (but the 1 % most extreme) stay within this factor of uniform (module docstring).
FLAT_BAND = 1.5


@dataclass
class WindowAttention:
    """Class attention of every window of a volume: ``attention`` (W, heads, N), each head summing to 1 over the
    window's N tokens; ``intensity`` (W, N) the mean model intensity of each token (air and padding <= 0)."""

    attention: np.ndarray
    intensity: np.ndarray

    @property
    def body(self) -> np.ndarray:
        """(W, N) tokens that hold body (not air, not the air the windows were padded with)."""
        return self.intensity > 0.0


def volume_windows(array: np.ndarray, roi: int, dims: int, step: int) -> np.ndarray:
    """Every window (W, 1, *roi) of a model volume on a lattice of ``step`` voxels, padded with air at the far end;
    2D models take every axial slice's in-plane windows."""
    plane = (0, 1, 2) if dims == 3 else (1, 2)
    starts = {a: window_starts(array.shape[a], roi, step) for a in plane}
    shape = list(array.shape)
    for a in plane:
        shape[a] = max(roi, starts[a][-1] + roi)
    padded = np.zeros(shape, np.float32)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    if dims == 3:
        crops = [padded[z : z + roi, y : y + roi, x : x + roi] for z in starts[0] for y in starts[1] for x in starts[2]]
    else:
        crops = [padded[z, y : y + roi, x : x + roi] for z in range(array.shape[0]) for y in starts[1] for x in starts[2]]
    return np.ascontiguousarray(np.stack(crops)[:, None], dtype=np.float32)


@torch.no_grad()
def window_attention(
    encoder: Any, windows: np.ndarray, *, batch_size: int = 4, device: str | torch.device = "cpu"
) -> WindowAttention:
    """The class attention of ``encoder`` on each window (eval mode), with the windows' token intensities."""
    from napari_dagman.core.models.encoder import set_fused_window_attention

    encoder = encoder.to(device).eval()
    set_fused_window_attention(encoder, True)
    token = encoder.arch.attention_stride
    pool = torch.nn.functional.avg_pool3d if encoder.arch.dims == 3 else torch.nn.functional.avg_pool2d
    attention, intensity = [], []
    for first in range(0, len(windows), batch_size):
        x = torch.from_numpy(windows[first : first + batch_size]).to(device)
        attention.append(encoder(x).attention.float().cpu().numpy())
        intensity.append(pool(x, token).flatten(1).float().cpu().numpy())
    return WindowAttention(np.concatenate(attention), np.concatenate(intensity))


def normalised_entropy(attention: np.ndarray) -> np.ndarray:
    """(W, H, N) distributions -> (H,) mean over windows of entropy / log N (1 = uniform)."""
    p = np.clip(attention.astype(np.float64), 1e-12, None)
    n = attention.shape[-1]
    return (-(p * np.log(p)).sum(-1) / math.log(max(n, 2))).mean(axis=0)


def body_normalised_entropy(wa: WindowAttention) -> np.ndarray:
    """(H,) normalised entropy of each head's map renormalised over the body tokens of each window (windows with
    fewer than two body tokens are left out; NaN when none is left)."""
    body = wa.body
    keep = body.sum(axis=1) >= 2
    if not keep.any():
        return np.full(wa.attention.shape[1], np.nan)
    values = []
    for att, mask in zip(wa.attention[keep], body[keep], strict=True):
        p = att[:, mask].astype(np.float64)
        p = np.clip(p / np.maximum(p.sum(-1, keepdims=True), 1e-12), 1e-12, None)
        values.append(-(p * np.log(p)).sum(-1) / math.log(int(mask.sum())))
    return np.mean(values, axis=0)


def peak_x_uniform(attention: np.ndarray) -> np.ndarray:
    """(W, H, N) -> (H,) mean over windows of the largest weight x N (1 = uniform)."""
    return (attention.max(axis=-1) * attention.shape[-1]).mean(axis=0)


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (bits, 0..1) between distributions along the last axis."""
    p = np.clip(p.astype(np.float64), 0, None)
    q = np.clip(q.astype(np.float64), 0, None)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    q = q / np.maximum(q.sum(-1, keepdims=True), 1e-300)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * (np.log(np.clip(a, 1e-300, None)) - np.log(np.clip(b, 1e-300, None))), 0.0).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)) / math.log(2.0)


def map_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over windows of the JS divergence between two networks' head-mean maps (W, H, N) of the same windows
    (heads are not matched between networks, so their mean is compared)."""
    return float(js_divergence_bits(a.mean(axis=1), b.mean(axis=1)).mean())


def intensity_correlation(wa: WindowAttention, head: int | None = None) -> float:
    """Rank (Spearman) correlation between attention (of ``head``, or the head mean) and the token's mean model
    intensity over the body tokens of each window, averaged over the windows (weighted by their body tokens);
    NaN when no window has three body tokens with distinct values. Ranks within a window: the maps are
    distributions per window, and a map made of intensity by any increasing function reads 1."""
    from scipy.stats import rankdata

    att = wa.attention.mean(axis=1) if head is None else wa.attention[:, head]
    total, weight = 0.0, 0
    for a, x, body in zip(att, wa.intensity, wa.body, strict=True):
        if body.sum() < 3:
            continue
        ra, rx = rankdata(a[body]), rankdata(x[body])
        if ra.std() == 0 or rx.std() == 0:
            continue
        n = int(body.sum())
        total += n * float(np.corrcoef(ra, rx)[0, 1])
        weight += n
    return total / weight if weight else float("nan")


def is_flat(relative: np.ndarray, band: float = FLAT_BAND) -> bool:
    """True when a map in relative attention (1 = uniform; any shape) stays within [1/band, band] but for its 1 %
    most extreme tokens."""
    values = np.asarray(relative, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return True
    low, high = np.percentile(values, (0.5, 99.5))
    return bool(high <= band and low >= 1.0 / band)


def flat_heads(attention: np.ndarray, band: float = FLAT_BAND) -> list[bool]:
    """(W, H, N) distributions -> per head, whether its relative attention over every window is flat."""
    relative = attention * attention.shape[-1]
    return [is_flat(relative[:, h], band) for h in range(attention.shape[1])]


def head_randomisation(trained: np.ndarray, random: Sequence[np.ndarray]) -> list[dict[str, float]]:
    """Per head of ``trained`` (W, H, N): mean JS divergence to every head of every random network, and the mean JS
    divergence between heads of two different random networks (heads are not matched between networks)."""
    spread_values = [
        float(js_divergence_bits(random[i][:, a], random[j][:, b]).mean())
        for i in range(len(random))
        for j in range(i + 1, len(random))
        for a in range(random[i].shape[1])
        for b in range(random[j].shape[1])
    ]
    spread = float(np.mean(spread_values)) if spread_values else float("nan")
    out = []
    for h in range(trained.shape[1]):
        distances = [float(js_divergence_bits(trained[:, h], r[:, k]).mean()) for r in random for k in range(r.shape[1])]
        out.append({"randomisation_distance": float(np.mean(distances)), "random_init_spread": spread})
    return out


def head_diversity_floor(trained: np.ndarray, random: Sequence[np.ndarray]) -> dict[str, Any]:
    """The heads' JS divergence and centred diversity (`core.diversity.head_diversity`, mean over windows) against
    the same figures on random networks' heads: ``*_noise_floor`` is the largest random network's value."""
    from napari_dagman.core.diversity import head_diversity

    def figures(att: np.ndarray) -> tuple[float, float]:
        d = head_diversity(torch.from_numpy(att))
        return float(d["js_divergence"]), float(d["diversity"])

    js, centred = figures(trained)
    floors = [figures(r) for r in random]
    # two flat heads differ by at most about the flat floor, whatever random networks draw
    js_floor = max([f[0] for f in floors] + [flat_floor(trained.shape[-1])]) if floors else float("nan")
    centred_floor = max(f[1] for f in floors) if floors else float("nan")
    # the centred figure compares shapes only: heads within the flat floor of one another have no shape to compare
    # (their correlation is of ripples a hundredth of uniform), so it counts only once the heads differ at all
    visibly_different = js > flat_floor(trained.shape[-1])
    return {
        "js_divergence": js,
        "js_noise_floor": js_floor,
        "js_above_chance": bool(floors) and js > js_floor,
        "diversity": centred,
        "diversity_noise_floor": centred_floor,
        "diversity_above_chance": bool(floors) and visibly_different and centred > centred_floor,
    }


def shift_stability(encoder: Any, crop: np.ndarray, shifted: Sequence[tuple[np.ndarray, tuple[int, ...]]]) -> float:
    """Pearson correlation of the head-mean relative attention of ``crop`` (1, *roi) with that of crops shifted
    by whole tokens (each (crop, shift in tokens per axis)), on the tokens both cover; mean over the shifts."""
    base = window_attention(encoder, crop[None]).attention[0].mean(0)
    token_grid = _token_grid(encoder, crop.shape[1:])
    a_map = (base * base.size).reshape(token_grid)
    values = []
    for other, shift in shifted:
        o = window_attention(encoder, other[None]).attention[0].mean(0)
        b_map = (o * o.size).reshape(token_grid)
        # token t of the shifted crop is token t + shift of the base crop
        sa = tuple(slice(max(0, s), n + min(0, s)) for s, n in zip(shift, token_grid, strict=True))
        sb = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, token_grid, strict=True))
        x, y = a_map[sa].ravel(), b_map[sb].ravel()
        if x.size >= 3 and x.std() > 0 and y.std() > 0:
            values.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(values)) if values else float("nan")


def _token_grid(encoder: Any, spatial: tuple[int, ...]) -> tuple[int, ...]:
    token = encoder.arch.attention_stride
    return tuple(s // token for s in spatial)


def flat_floor(tokens: int, band: float = FLAT_BAND) -> float:
    """JS divergence (bits) between a uniform map and a map whose tokens alternate between ``band`` and 1/``band``
    times uniform: about the most a *flat* map can differ from uniform, and from another flat map. Random networks
    with CaiT's initialisation draw exactly uniform maps (their spread is 0), so a distance must also exceed this
    floor before a map is called different from theirs."""
    n = max(2, int(tokens))
    ripple = np.where(np.arange(n) % 2 == 0, band, 1.0 / band)
    return float(js_divergence_bits(np.full(n, 1.0 / n), ripple / ripple.sum()))


def randomisation_check(trained: np.ndarray, random: Sequence[np.ndarray]) -> dict[str, Any]:
    """Model randomisation: the run's maps against random networks' maps of the same windows.

    Returns ``randomisation_distance`` (mean distance from the run to each random network), ``random_init_spread``
    (mean distance between two random networks), ``random_init_spread_max``, ``beyond_random`` (the issue's plain
    criterion: the run's smallest distance to a random network exceeds the largest distance between two of them),
    ``flat_floor`` (`flat_floor`) and ``distinguishable`` (beyond both the spread and the flat floor: the verdict
    the sentences use).
    """
    to_random = [map_distance(trained, r) for r in random]
    between = [map_distance(random[i], random[j]) for i in range(len(random)) for j in range(i + 1, len(random))]
    spread = float(np.mean(between)) if between else float("nan")
    spread_max = float(np.max(between)) if between else float("nan")
    floor = flat_floor(trained.shape[-1])
    closest = float(np.min(to_random))
    return {
        "randomisation_distance": float(np.mean(to_random)),
        "randomisation_distance_min": closest,
        "random_init_spread": spread,
        "random_init_spread_max": spread_max,
        "beyond_random": bool(between) and closest > spread_max,
        "flat_floor": floor,
        "distinguishable": bool(between) and closest > max(spread_max, floor),
        "random_seeds": len(random),
    }


def attention_sanity(
    encoder: Any,
    windows: np.ndarray,
    *,
    random_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Every figure of the module docstring for ``encoder`` on ``windows`` (W, 1, *roi), per head and for the head
    mean, with the head diversity against its noise floor (``heads``, ``mean``, ``head_diversity``)."""
    from napari_dagman.core.embeddings.features import random_init_encoder

    wa = window_attention(encoder, windows, batch_size=batch_size, device=device)
    random = [
        window_attention(random_init_encoder(encoder.arch, seed), windows, batch_size=batch_size, device=device).attention
        for seed in random_seeds
    ]
    entropy, body_entropy, peak = normalised_entropy(wa.attention), body_normalised_entropy(wa), peak_x_uniform(wa.attention)
    flat = flat_heads(wa.attention)
    per_head = head_randomisation(wa.attention, random)
    heads = {
        str(h): {
            "normalised_entropy": float(entropy[h]),
            "body_normalised_entropy": float(body_entropy[h]),
            "peak_x_uniform": float(peak[h]),
            "flat": flat[h],
            "intensity_correlation": intensity_correlation(wa, h),
            **per_head[h],
        }
        for h in range(wa.attention.shape[1])
    }
    mean_map = wa.attention.mean(axis=1, keepdims=True)
    return {
        "heads": heads,
        "mean": {
            "normalised_entropy": float(normalised_entropy(mean_map)[0]),
            "mean_head_normalised_entropy": float(entropy.mean()),
            "body_normalised_entropy": float(np.nanmean(body_entropy)),
            "peak_x_uniform": float(peak_x_uniform(mean_map)[0]),
            "flat": flat_heads(mean_map)[0],
            "intensity_correlation": intensity_correlation(wa),
            **randomisation_check(wa.attention, random),
        },
        "head_diversity": head_diversity_floor(wa.attention, random),
        "windows": int(len(windows)),
        "tokens": int(wa.attention.shape[-1]),
        "body_share": float(wa.body.mean()),
        "flat_band": FLAT_BAND,
    }
