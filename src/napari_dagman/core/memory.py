"""Memory: what a job will need, checked against what the machine has before work is spent, and an
out-of-memory during a job said in one line.

The estimates are lower bounds (the arrays a job must hold at once, and the network's activations under what was
measured): a job refused by them could not have run, and one that passes may still run out, which
`out_of_memory` then recognises.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.core.errors import DagmanInputError, first_line

#: Environment variable that turns the memory checks off (a machine whose /proc/meminfo misleads, or a user who
#: knows the swap will carry it).
NO_MEMORY_CHECK_ENV = "NAPARI_DAGMAN_NO_MEMORY_CHECK"

#: What PyTorch, NumPy and ITK say when an allocation fails (their exceptions differ: RuntimeError, MemoryError,
#: numpy's ArrayMemoryError, torch.cuda.OutOfMemoryError, ITK's "Failed to allocate memory").
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory",
              "unable to allocate")  # fmt: skip

FLOAT_BYTES = 4


def available_bytes() -> int | None:
    """Memory a new allocation can get now: MemAvailable, capped by the cgroup's limit (a container); None when
    neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                found.append(int(limit) - int(Path(usage_file).read_text().strip()))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def gigabytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def require_memory(needed: float, what: str, advice: str) -> None:
    """Refuse, in one line with both figures and what to change, a job whose arrays cannot fit in memory."""
    if os.environ.get(NO_MEMORY_CHECK_ENV):
        return
    available = available_bytes()
    if available is None or needed <= available:
        return
    raise DagmanInputError(
        f"{what} needs at least {gigabytes(needed)} of memory and this machine has {gigabytes(available)} "
        f"available: {advice} (or set {NO_MEMORY_CHECK_ENV}=1 to try anyway)"
    )


def voxels_at_spacing(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> int:
    """Voxels of a volume of ``shape`` at ``spacing`` (mm) once resampled to ``target`` (mm), same extent."""
    return math.prod(max(1, math.ceil(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def out_of_memory(err: BaseException) -> bool:
    """True for an allocation failure of PyTorch, NumPy or ITK (each raises its own kind)."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return any(word in text for word in _OOM_WORDS)
    return False


def prepared_volumes_bytes(
    volumes: Sequence[object], *, spacing: float | None, roi: int, dims: int = 3
) -> int:
    """Bytes of the float32 training arrays of ``volumes`` (`core.volume.Volume`) resampled to ``spacing`` mm
    (None: as they are) and padded to ``roi``, all kept for the run, plus one more copy while each is prepared."""
    sizes = []
    for volume in volumes:
        shape, native = tuple(volume.shape), tuple(float(s) for s in volume.spacing)  # type: ignore[attr-defined]
        in_plane = (native[0], spacing, spacing) if dims == 2 else (spacing,) * 3
        target = native if spacing is None else in_plane
        axes = [max(1, math.ceil(n * s / t)) for n, s, t in zip(shape, native, target, strict=True)]
        padded = [max(n, roi) for n in axes] if dims == 3 else [axes[0], max(axes[1], roi), max(axes[2], roi)]
        sizes.append(math.prod(padded) * FLOAT_BYTES)
    return sum(sizes) + max(sizes, default=0)


#: Lower bound of a training step's activations per stage-1 token of one sample: a fixed part (attention maps:
#: heads x window) and a part per embedding channel. Measured as peak RSS less the process's floor (about 830 MB,
#: a ROI-32 tiny run) on CPU, fp32, batch 1, dagman (both views, the teacher): tiny ROI 64 19 KB and small ROI 64
#: 34 KB per token (2-step runs on example_ct_sm, GNU time), small ROI 96 29 KB and base ROI 96 38 KB
#: (`benchmarks/results/pretrain_step_cpu_tiny64.json`, its memory rows); 12 KB + 0.5 KB per channel stays under
#: every one, so no job that fits is refused.
ACTIVATION_BYTES_PER_TOKEN = 12 * 1024
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 512


def activation_bytes(*, roi: int, dims: int, batch: int, embed_dim: int) -> int:
    """Lower bound of one training step's activations (`ACTIVATION_BYTES_PER_TOKEN`): stage-1 tokens are the ROI
    over the patch size of 2, per sample."""
    tokens = (roi // 2) ** (3 if dims == 3 else 2)
    return batch * tokens * (ACTIVATION_BYTES_PER_TOKEN + ACTIVATION_BYTES_PER_TOKEN_CHANNEL * embed_dim)


def check_training_memory(
    volumes: Sequence[object],
    *,
    spacing: float | None,
    roi: int,
    dims: int,
    crops: int,
    batch: int,
    embed_dim: int,
    device: str,
    what: str,
) -> None:
    """Refuse a training job whose prepared volumes, one step's crops (``crops`` crops of ``roi``, regions 1.5 x
    the ROI) and, on the CPU, the network's activations (a lower bound, `activation_bytes`) cannot fit in memory.
    On a GPU the activations are the GPU's (not checked here: mixed precision and the allocator change them)."""
    region = math.ceil(1.5 * roi) ** (3 if dims == 3 else 2)
    needed = (
        prepared_volumes_bytes(volumes, spacing=spacing, roi=roi, dims=dims)
        + crops * region * FLOAT_BYTES
        + (activation_bytes(roi=roi, dims=dims, batch=batch, embed_dim=embed_dim) if device == "cpu" else 0)
    )
    require_memory(
        needed, what, "use a smaller --roi or --batch-size, a smaller --preset, a coarser --spacing, or fewer volumes"
    )


def check_prediction_memory(volume: object, *, spacing: Sequence[float], classes: int) -> None:
    """Refuse a prediction whose arrays cannot fit: the image at the model's spacing with the sliding window's
    class scores and their count map, then on the input's grid the float image and the class map (the class
    scores go back a slab at a time: not a whole-grid term per class)."""
    shape, native = tuple(volume.shape), tuple(float(s) for s in volume.spacing)  # type: ignore[attr-defined]
    model = voxels_at_spacing(shape, native, tuple(spacing))
    source = math.prod(shape)
    needed = FLOAT_BYTES * (model * (2 * classes + 2) + source) + source * 2
    ratio = max(s / t for s, t in zip(native, spacing, strict=True))
    advice = (
        f"its voxels are {ratio:.0f}x the model's spacing ({', '.join(f'{s:g}' for s in native)} mm vs "
        f"{', '.join(f'{s:g}' for s in spacing)} mm): check the image's header"
        if ratio >= 4
        else "crop the CT to the region of interest, or use a machine with more memory"
    )
    require_memory(needed, "segmenting this CT", advice)


def out_of_memory_message(err: BaseException) -> str:
    """One line for an allocation failure outside a training step (a prediction, the explorer, embeddings)."""
    return f"out of memory ({first_line(err)}): use a smaller input (crop the CT) or a machine with more memory"
