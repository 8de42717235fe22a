"""Writing what other tools load: plain PyTorch state dicts (tensors only) and JSON, each file atomically."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from napari_dagman.core.errors import CheckpointError
from napari_dagman.core.io import atomic_write, atomic_write_text


def write_state_dict(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> Path:
    """A ``.pt`` file holding only tensors (``torch.load(..., weights_only=True)`` reads it, nothing executes).

    The file is read back with ``weights_only=True`` before it takes its final name.
    """
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

    def verify(tmp: Path) -> None:
        back = torch.load(tmp, map_location="cpu", weights_only=True)
        if set(back) != set(flat) or any(back[k].shape != flat[k].shape for k in flat):
            raise CheckpointError("the written file does not read back whole (disk full?)")

    def write(tmp: Path) -> None:
        # serialised in memory and written by Python: torch's own file writer reports a full disk as
        # "enforce fail at inline_container.cc", without the system's reason
        buffer = io.BytesIO()
        torch.save(flat, buffer)
        tmp.write_bytes(buffer.getbuffer())

    return atomic_write(path, write, verify=verify)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Pretty JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return Path(path)


def software_versions() -> dict[str, str]:
    """Versions of what wrote an export (MONAI bundles record them in their metadata)."""
    import monai
    import numpy

    import napari_dagman

    return {
        "napari_dagman": napari_dagman.__version__,
        "monai": monai.__version__,
        "pytorch": torch.__version__.split("+")[0],
        "numpy": numpy.__version__,
    }
