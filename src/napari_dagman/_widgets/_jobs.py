"""The background job of the pretraining dock and helpers for jobs in child processes (Qt-free).

They run either in a worker thread or in a child process (`_subprocess`), so they take and return only
picklable values and import torch lazily. No science here: every number comes from `core`.
"""

from __future__ import annotations

import pickle
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import CancelToken
    from napari_dagman.core.methods.registry import MethodSpec
    from napari_dagman.core.volume import Volume

def picklable_volume(volume: Volume) -> Volume:
    """The same volume with only the metadata that pickles (another reader plugin may store anything there)."""
    from napari_dagman.core.volume import Volume

    meta = {}
    for key, value in volume.metadata.items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        meta[key] = value
    return Volume(volume.array, volume.spacing, volume.origin, volume.direction, meta)


# --- pretraining ----------------------------------------------------------------------------------------------
def pretrain_job(
    config: PretrainConfig,
    volumes: Sequence[Volume] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str = "napari-dagman pretraining dock",
    methods: Sequence[MethodSpec] = (),
) -> Generator[Any, None, Any]:
    """`core.training.run_pretraining` on the chosen layers *and* the files in ``config.images``.

    The engine trains on in-memory volumes or on files; the dock offers both at once, so the files are read
    here (by the engine's own reader) and appended to the layers. ``config.images`` still lists the files, so
    config.json and run.json record them. ``methods`` are registered first: a method that user code registered
    in napari's process is unknown to a child process until then (registering a known spec again is a no-op).
    """
    from napari_dagman.core.methods.registry import register
    from napari_dagman.core.training import load_inputs, run_pretraining

    for spec in methods:
        register(spec)
    pool = list(volumes or [])
    if pool and config.images:
        pool.extend(load_inputs(config, None))
    result = yield from run_pretraining(config, pool or None, resume=resume, cancel=cancel, command=command)
    return result
