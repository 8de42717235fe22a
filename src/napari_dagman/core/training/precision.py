"""Arithmetic precision and compilation of a training run: decided here once, applied by the one loop.

``precision``: ``auto`` is bf16 autocast where the device computes bf16 natively (a CUDA GPU with bf16; a CPU
with AVX-512 BF16 or AMX, where a bf16 matmul runs ~2.5x an fp32 one) and fp32 elsewhere (a CPU without
them emulates bf16, slower than fp32). Weights, gradients and the optimiser state stay fp32 either way: autocast
only changes the arithmetic of the forward pass (and so of its backward), so checkpoints do not depend on it.

``compile``: `torch.compile` of every network the run trains or keeps by EMA, in place (``Module.compile``: the
parameter names, hence checkpoints and the EMA pairing, are unchanged). A machine where compilation cannot
work (no C++ compiler for the CPU backend, an unsupported device) is found by compiling a trivial function
first; the run then goes on eagerly and says so. A graph that fails to compile later runs eagerly too
(Dynamo's ``suppress_errors``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX tiles)."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            return True
    return False


def bf16_native(device: torch.device) -> bool:
    """True when bf16 arithmetic on ``device`` is native (faster than fp32), so ``auto`` chooses it."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_bf16()
    return False  # mps and others: fp32 unless asked


def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for a requested ``auto``/``fp32``/``bf16`` on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return requested


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (nothing for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_unavailable(device: torch.device) -> str | None:
    """Why `torch.compile` cannot work here (compiling a trivial function), or None when it can."""
    try:
        fn = torch.compile(lambda x: x * 2.0 + 1.0, dynamic=False)
        fn(torch.ones(8, device=device))
    except Exception as err:  # any failure means: run eagerly (the reason is told to the user)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
    return None


#: glibc ``mallopt`` parameters (malloc.h): how many chunks may be mmap-ed, and how much free memory at the top
#: of the heap is kept rather than returned to the system
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: freed memory kept for reuse with ``NAPARI_DAGMAN_ALLOCATOR=keep-freed``
KEPT_FREE_MEMORY = 1 << 30
ALLOCATORS: tuple[str, ...] = ("system", "keep-freed")
_allocator_state: dict[str, str] = {}


def keep_freed_memory(device: torch.device) -> str:
    """``NAPARI_DAGMAN_ALLOCATOR=keep-freed`` on a CPU run under glibc: tensors come from the heap and freed
    memory is kept for the next step. Opt-in: faster, but it costs peak memory.

    By default glibc serves every allocation over 32 MiB with a fresh ``mmap`` and returns it on free, so each
    attention-logit tensor of a step (32-64 MiB at the tiny preset, ROI 64) is paged in again, zero-filled by
    the kernel, on every use. Allocating from the heap and keeping up to `KEPT_FREE_MEMORY` free reuses the
    pages instead (what jemalloc or tcmalloc do; no extra library). Measured here (benchmarks/pretrain_step.py
    --levers --memory): 10 % less time per default tiny/64 step and 12 % at base/96, but 620 MiB more peak memory
    for the default small/96 run (2748 -> 3368 MiB), through heap fragmentation, which takes that run over 3 GiB;
    so it is not the default. The
    setting is process-wide and lasts for the process. Returns what run.json records: ``system``,
    ``keep-freed``, or ``system`` with why keep-freed could not be set.
    """
    import ctypes
    import ctypes.util
    import os
    import sys

    asked = os.environ.get("NAPARI_DAGMAN_ALLOCATOR", "system").strip().lower() or "system"
    if asked not in ALLOCATORS:
        from napari_dagman.core.errors import DagmanInputError

        raise DagmanInputError(f"NAPARI_DAGMAN_ALLOCATOR must be one of {', '.join(ALLOCATORS)}, got {asked!r}")
    if asked == "system" or device.type != "cpu":
        return _allocator_state.get("state", "system")  # once set, the process keeps it
    if "state" not in _allocator_state:
        state = "system (keep-freed needs Linux with glibc)"
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            except (OSError, AttributeError):  # musl and others have no mallopt
                mallopt = None
            if mallopt is not None and mallopt(_M_MMAP_MAX, 0) == 1:
                mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_MEMORY)
                state = "keep-freed"
        _allocator_state["state"] = state
    return _allocator_state["state"]


@dataclass
class SpeedSettings:
    """What a run uses: the resolved precision and whether its networks are compiled, with what to tell."""

    precision: str = "fp32"
    compiled: bool = False
    allocator: str = "system"
    notes: list[str] = field(default_factory=list)
    compile_check_seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """The entries of run.json."""
        return {"precision": self.precision, "compiled": self.compiled, "allocator": self.allocator}


def speed_settings(precision: str, compile: bool, device: torch.device) -> SpeedSettings:
    """Resolve the precision and check that compilation works on ``device`` when it is asked for."""
    settings = SpeedSettings(precision=resolve_precision(precision, device), allocator=keep_freed_memory(device))
    if precision == "bf16" and not bf16_native(device):
        settings.notes.append(
            f"bf16 was asked for, but {device.type} here has no native bf16 arithmetic: it is emulated and may be "
            "slower than fp32"
        )
    if compile:
        t0 = time.perf_counter()
        reason = compile_unavailable(device)
        settings.compile_check_seconds = time.perf_counter() - t0
        if reason is None:
            settings.compiled = True
        else:
            settings.notes.append(f"torch.compile does not work here ({reason}); training without it")
    return settings


def compile_modules(modules: Iterable[nn.Module]) -> None:
    """Compile each module in place; a graph that fails to compile then runs eagerly instead of failing the run.

    The first steps take longer (tracing and code generation); the loop's step times show it.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # fall back to eager frame by frame
    for module in modules:
        module.compile()


__all__ = [
    "ALLOCATORS",
    "PRECISIONS",
    "SpeedSettings",
    "autocast_for",
    "bf16_native",
    "compile_modules",
    "compile_unavailable",
    "cpu_has_bf16",
    "keep_freed_memory",
    "resolve_precision",
    "speed_settings",
]
