"""A method's own pictures of one crop of a CT, from a finished run: MiM's masks per level, MIRAM's two
reconstructions, and whatever else a method shows in its live preview.

The explorer and ``napari-dagman attention`` show these for runs whose method does not train the class attention:
the untrained module's output is not attention, so they show what the method does have. The whole method is
rebuilt from the run folder (every module a checkpoint holds, architecture and options from config.json) and
runs one step on the crop, without gradients, with the generator seeded by ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_dagman.core.checkpoint import RunFolder, check_state_fits, load_tensors, strip_prefix
from napari_dagman.core.data import PreparedVolume, crop_around, model_volume, refine_volume
from napari_dagman.core.errors import CheckpointError
from napari_dagman.core.events import Picture
from napari_dagman.core.volume import Volume, grid_placement


@dataclass
class CropPictures:
    """Pictures of one crop, each placed in physical space by `placement`."""

    pictures: list[Picture]
    origin: tuple[float, float, float]  # physical position of the crop's first voxel (z, y, x mm)
    spacing: tuple[float, float, float]
    direction: np.ndarray
    method: str
    step: int
    terms: dict[str, float] = field(default_factory=dict)

    def placement(self, picture: Picture) -> tuple[list[float], list[float]]:
        """(scale, translate) that overlay ``picture`` on the CT (napari world = physical mm)."""
        return grid_placement(self.origin, self.spacing, picture.factor)

    def volume(self, picture: Picture, metadata: dict[str, Any] | None = None) -> Volume:
        scale, translate = self.placement(picture)
        return Volume(picture.array, tuple(scale), tuple(translate), self.direction.copy(), dict(metadata or {}))


def load_run_method(run: str | Path, *, weights: str = "last", device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(method, config) of a pretraining run, every module it saved loaded; refuses other jobs and misfits."""
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import build_method

    folder = RunFolder(run)
    data = folder.config_dict()
    if data.get("job", "pretrain") != "pretrain":
        raise CheckpointError(f"{folder.path} is a {data.get('job')} run, not a pretraining run")
    config = PretrainConfig.from_dict({**data, "out": None, "images": []}, strict=False)
    method = build_method(config)
    tensors, meta = load_tensors(folder.weights_path(weights))
    for name, module in method.state_modules().items():
        state = strip_prefix(tensors, name)
        check_state_fits(module, state, f"{folder.path.name}/{weights}")
        module.load_state_dict(state)
    method.to(device).eval()
    method.step_loaded = int(meta.get("step", 0))
    return method, config


def method_pictures(
    run: str | Path,
    volume: Volume,
    center: Sequence[float] | None = None,
    *,
    seed: int = 0,
    weights: str = "last",
    device: str | torch.device = "cpu",
) -> CropPictures:
    """The method's pictures of the crop around a physical point ``center`` (default: the body's centre)."""
    method, config = load_run_method(run, weights=weights, device=device)
    spec = type(method).input_spec(method.options, config.roi)
    side, dims = config.roi * spec.scale, config.dims
    pv = model_volume(volume, dims=dims, spacing=config.spacing, hu_range=(config.hu_min, config.hu_max))
    crop, start = crop_around(pv, center, side, dims)
    origin = tuple(float(o) for o in pv.index_to_physical(start))
    views = torch.from_numpy(crop if dims == 3 else crop[0])[None, None].repeat(spec.views, 1, *([1] * dims))
    kwargs: dict[str, Any] = {}
    if spec.high_res > 1:
        box = PreparedVolume(crop, pv.spacing, origin, pv.direction, pv.name, pv.source_hash)
        fine = refine_volume(box, volume, spec.high_res, dims=dims, hu_range=(config.hu_min, config.hu_max)).array
        kwargs["high_res"] = torch.from_numpy(fine if dims == 3 else fine[0])[None, None].repeat(
            spec.views, 1, *([1] * dims)
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = method.forward_step(views.to(device), int(config.steps or 0), generator, **{k: v.to(device) for k, v in kwargs.items()})
    return CropPictures(
        pictures=list(out.pictures),
        origin=origin,
        spacing=tuple(float(s) for s in pv.spacing),
        direction=pv.direction.copy(),
        method=config.method,
        step=method.step_loaded,
        terms=dict(out.terms),
    )
