"""Fixed probe crops of a run and the figures measured on them while it trains: head diversity and collapse.

Figures measured on each step's training crops mix the model's change with the change of the crops (two crops of
homogeneous liver are alike whatever the network; a noisy teacher's input is corrupted). The probe crops are drawn
once per run from the training data, unaugmented, and saved in the run folder (``probes.safetensors``), so every
measurement, before and after a resume, sees the same input, in eval mode:

* ``probe_<encoder>_*``: head diversity of each encoder whose class attention the method trains;
* ``probe_token_cosine``: mean cosine of the preferred published encoder's stage-3 tokens of *different* probe
  crops (near 1 = every crop described alike, the representation collapse the alarm watches);
* ``probe_output_cosine``: the same for the outputs the method's objective compares (`SSLMethod.probe_outputs`:
  CASS's projections, MiM's alignment projections), the largest over its outputs, each also as
  ``probe_output_cosine_<name>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_dagman.core.data import ViewSampler
from napari_dagman.core.diversity import cross_crop_cosine, head_diversity
from napari_dagman.core.methods.base import SSLMethod
from napari_dagman.core.models.encoder import SwinEncoder

PROBE_FILE = "probes.safetensors"


def draw_probe_crops(
    sampler: ViewSampler, count: int, seed: int, side: int | None = None
) -> tuple[np.ndarray, list[dict]]:
    """``count`` crops (count, 1, *side) from the sampler's volumes, from a stream of their own, unaugmented."""
    rng = np.random.default_rng([seed, 104729])
    side = side or sampler.roi
    crops, where = [], []
    for i in range(count):
        volume = i % len(sampler.volumes)
        shape = sampler.volumes[volume].array.shape
        start = sampler.in_region(rng, sampler.region_start(rng, shape), shape, side)
        crops.append(sampler.cut(volume, start, side))
        where.append({"volume": volume, "start": [int(s) for s in start]})
    return np.stack(crops)[:, None].astype(np.float32), where


def probe_crops(
    path: Path, sampler: ViewSampler, count: int, seed: int, *, side: int | None = None, write: bool = True
) -> torch.Tensor:
    """The run's probe crops (``side`` voxels, default the sampler's): read from ``path`` when it holds crops of
    this shape, else drawn (and saved)."""
    import json

    from napari_dagman.core.checkpoint import load_tensors, save_tensors
    from napari_dagman.core.errors import CheckpointError

    side = side or sampler.roi
    expected = (count, 1, *((side,) * sampler.dims))
    if path.is_file():
        try:
            tensors, _ = load_tensors(path)
            crops = tensors.get("crops")
            if crops is not None and tuple(crops.shape) == expected and bool(torch.isfinite(crops).all()):
                return crops
        except CheckpointError:
            pass  # unreadable: draw them again (same seed, same crops)
    array, where = draw_probe_crops(sampler, count, seed, side)
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


@torch.no_grad()
def probe_collapse(method: SSLMethod, crops: torch.Tensor, device: torch.device) -> dict[str, float]:
    """``probe_token_cosine`` of the preferred published encoder and ``probe_output_cosine`` of the method's
    compared outputs, on the probe crops in eval mode (see the module docstring)."""
    out: dict[str, float] = {}
    x = crops.to(device)
    was_training = method.training
    method.eval()
    try:
        encoder = method.published_module(method.preferred()[0])
        if isinstance(encoder, SwinEncoder):
            out["probe_token_cosine"] = cross_crop_cosine(encoder(x, class_attention=False).tokens)
        outputs = {name: cross_crop_cosine(z) for name, z in method.probe_outputs(x).items()}
    finally:
        method.train(was_training)
    for name, value in outputs.items():
        out[f"probe_output_cosine_{name}"] = value
    if outputs:
        out["probe_output_cosine"] = max(outputs.values())
    return out
