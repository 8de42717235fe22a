"""Fixed probe crops of a run and the head-diversity figures measured on them while it trains.

Head diversity measured on each step's training crops mixes the model's change with the change of the crops (and,
for a noisy teacher, with its corrupted input). The probe crops are drawn once per run from the training data and
saved in the run folder (``probes.safetensors``), so every measurement, before and after a resume, sees the same
input: the clean teacher and the student, in eval mode, on the same crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_dagman.core.data import ViewSampler
from napari_dagman.core.diversity import head_diversity

PROBE_FILE = "probes.safetensors"


def draw_probe_crops(sampler: ViewSampler, count: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """``count`` crops (count, 1, *roi) from the sampler's volumes, from a stream of their own."""
    rng = np.random.default_rng([seed, 104729])
    crops, where = [], []
    for i in range(count):
        volume = i % len(sampler.volumes)
        start, _ = sampler.pair(rng, sampler.volumes[volume].array.shape)
        crops.append(sampler.cut(volume, start))
        where.append({"volume": volume, "start": [int(s) for s in start]})
    return np.stack(crops)[:, None].astype(np.float32), where


def probe_crops(
    path: Path, sampler: ViewSampler, count: int, seed: int, *, write: bool = True
) -> torch.Tensor:
    """The run's probe crops: read from ``path`` when it holds crops of this shape, else drawn (and saved)."""
    import json

    from napari_dagman.core.checkpoint import load_tensors, save_tensors
    from napari_dagman.core.errors import CheckpointError

    expected = (count, 1, *((sampler.roi,) * sampler.dims))
    if path.is_file():
        try:
            tensors, _ = load_tensors(path)
            crops = tensors.get("crops")
            if crops is not None and tuple(crops.shape) == expected and bool(torch.isfinite(crops).all()):
                return crops
        except CheckpointError:
            pass  # unreadable: draw them again (same seed, same crops)
    array, where = draw_probe_crops(sampler, count, seed)
    crops = torch.from_numpy(array)
    if write:
        save_tensors(path, {"crops": crops}, {"job": "probes", "crops": json.dumps(where)})
    return crops


@torch.no_grad()
def probe_head_diversity(
    encoders: dict[str, nn.Module], crops: torch.Tensor, device: torch.device
) -> dict[str, float]:
    """``probe_<name>_*`` figures of each encoder's class-attention heads on the probe crops (eval mode)."""
    out: dict[str, float] = {}
    x = crops.to(device)
    for name, encoder in encoders.items():
        was_training = encoder.training
        encoder.eval()
        try:
            attention = encoder(x).attention.float()
        finally:
            encoder.train(was_training)
        d = head_diversity(attention)
        out[f"probe_{name}_head_diversity"] = d["diversity"]
        out[f"probe_{name}_head_correlation"] = d["correlation"]
        out[f"probe_{name}_head_js"] = d["js_divergence"]
        out[f"probe_{name}_cosine_diversity"] = d["cosine_diversity"]
        out[f"probe_{name}_entropy_mean"] = d["entropy_mean"]
        for h, e in enumerate(d["entropy"]):
            out[f"probe_{name}_entropy_h{h}"] = e
    return out
