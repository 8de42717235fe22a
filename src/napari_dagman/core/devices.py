"""Device choice: what is really available (for the GUI list) and resolving 'auto' / 'cuda:N' / 'mps' / 'cpu'."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from napari_dagman.core.errors import DagmanInputError


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # what configs hold: "cpu", "cuda:0", "mps"
    label: str  # what a user reads: "cuda:0 - NVIDIA H100 (71.2 of 79.6 GiB free)"


def available_devices() -> list[DeviceInfo]:
    """``auto`` first, then every CUDA GPU with its name and free memory, then mps, then cpu."""
    out = [DeviceInfo("auto", f"auto ({resolve_device('auto')})")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
                label = f"cuda:{i} - {name} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
            except RuntimeError:
                label = f"cuda:{i} - {name}"
            out.append(DeviceInfo(f"cuda:{i}", label))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append(DeviceInfo("mps", "mps - Apple GPU"))
    out.append(DeviceInfo("cpu", f"cpu ({torch.get_num_threads()} threads)"))
    return out


def resolve_device(name: str | None) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; named devices are checked and refused with a clear reason."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DagmanInputError(
                f"device '{name}' asked for, but no CUDA GPU is available here; use --device cpu or auto"
            )
        index = int(name.split(":", 1)[1]) if ":" in name else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DagmanInputError(
                f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA GPU(s) here"
            )
        return torch.device("cuda", index)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DagmanInputError("device 'mps' asked for, but Apple's MPS backend is not available here")
        return torch.device("mps")
    raise DagmanInputError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")
