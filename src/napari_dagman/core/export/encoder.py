"""A pretrained encoder for MONAI: the published Swin as a state dict in SwinUNETR's layout (``swinViT.*``).

``napari-dagman export RUN --format monai-swinunetr --out encoder.pt`` writes

* ``encoder.pt``: ``{"swinViT.<name>": tensor}`` (tensors only: ``torch.load(..., weights_only=True)``), or the
  same tensors as ``encoder.safetensors`` with ``--format safetensors``;
* ``encoder.json``: the keyword arguments of MONAI's ``SwinUNETR`` that shape its encoder, under MONAI's own
  names; ``SwinUNETR(**json.load(f), out_channels=K)`` then takes the weights with
  ``load_state_dict(sd, strict=False)`` (the decoder starts fresh), as users do with MONAI's own
  self-supervised Swin weights;
* ``encoder.input.json``: how the encoder was fed (axis order, spacing, HU window: as MONAI transforms) and
  where it comes from (run, encoder name, method, step).

Our encoder holds MONAI's ``SwinTransformer`` under ``swin.``, so the names map one to one; the mask token
and the class-attention module have no place in SwinUNETR and are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_dagman.core.checkpoint import load_pretrained_encoder, save_tensors
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.export.weights import software_versions, write_json, write_state_dict
from napari_dagman.core.io import stem_of, suffix_of
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.segmentation.model import UNETR_ENCODER_PREFIX
from napari_dagman.core.segmentation.pipeline import MODEL_AXCODES, model_transforms

#: ``--format`` -> the file ending its weights take.
ENCODER_FORMATS: dict[str, tuple[str, ...]] = {
    "monai-swinunetr": (".pt", ".pth"),
    "safetensors": (".safetensors",),
}


def swinunetr_arguments(arch: Architecture) -> dict[str, Any]:
    """MONAI ``SwinUNETR`` keyword arguments (all but ``out_channels``) whose encoder is ``arch``'s Swin.

    Every argument that shapes the encoder's weights or forward pass is written out, defaults included, so the
    file means the same with a later MONAI whose defaults differ.
    """
    return {
        "in_channels": arch.in_channels,
        "feature_size": arch.embed_dim,
        "depths": list(arch.depths),
        "num_heads": list(arch.num_heads),
        "window_size": arch.window_size,
        "patch_size": arch.patch_size,
        "spatial_dims": arch.dims,
        "qkv_bias": True,
        "mlp_ratio": 4.0,
        "patch_norm": False,
        "normalize": True,
        "downsample": "merging",
        "use_v2": False,
    }


def input_convention(
    spacing: float | None, dims: int, hu_range: tuple[float, float], roi: int
) -> dict[str, Any]:
    """How the network's input was made, in words and as MONAI transforms (after ``LoadImaged`` and
    ``EnsureChannelFirstd``)."""
    return {
        "axcodes": MODEL_AXCODES,
        "axes": "array axes z, y, x of the LPS volume (MONAI: Orientationd(axcodes='SPL'))",
        "spacing_mm": spacing,
        "hu_window": list(hu_range),
        "intensity": "HU clipped to hu_window and scaled to [0, 1]",
        "roi": roi,
        "monai_transforms": model_transforms(spacing, dims, hu_range),
    }


def export_encoder(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "monai-swinunetr",
    which: str = "auto",
    weights: str = "last",
) -> list[str]:
    """Write a published Swin encoder of a pretraining run for MONAI (see the module); returns the paths.

    Raises `DagmanInputError` for an unknown format, a file ending that does not fit it, or a published encoder
    that is not a Swin (CASS's CNN), and `CheckpointError` for runs and names that do not exist.
    """
    if fmt not in ENCODER_FORMATS:
        raise DagmanInputError(f"unknown encoder format '{fmt}'; choose one of {', '.join(ENCODER_FORMATS)}")
    out = Path(out)
    endings = ENCODER_FORMATS[fmt]
    if suffix_of(out) not in endings:
        raise DagmanInputError(f"--format {fmt} writes a {' or '.join(endings)} file, not '{out.name}'")
    pretrained = load_pretrained_encoder(run, which, weights=weights)
    if pretrained.kind != "swin":
        others = [n for n in pretrained.available if n != pretrained.which]
        raise DagmanInputError(
            f"the run's '{pretrained.which}' encoder is a {pretrained.kind}, not a Swin: SwinUNETR cannot take it"
            + (f"; choose --which {' or '.join(others)}" if others else "")
        )
    arch = pretrained.arch
    state = {UNETR_ENCODER_PREFIX + k: v for k, v in pretrained.encoder.swin.state_dict().items()}
    arguments = swinunetr_arguments(arch)
    about = {
        **input_convention(pretrained.spacing, arch.dims, pretrained.hu_range, pretrained.roi),
        "source": {
            "run": str(Path(run).resolve()),
            "weights": pretrained.source,
            "encoder": pretrained.which,
            "method": pretrained.method,
            "step": pretrained.step,
        },
        "written_by": software_versions(),
    }
    if fmt == "safetensors":
        metadata = {"swinunetr": json.dumps(arguments), "input": json.dumps(about), "job": "encoder-export"}
        save_tensors(out, state, metadata)
    else:
        write_state_dict(out, state)
    base = out.with_name(stem_of(out))
    written = [str(out), str(write_json(f"{base}.json", arguments))]
    written.append(str(write_json(f"{base}.input.json", about)))
    return written
