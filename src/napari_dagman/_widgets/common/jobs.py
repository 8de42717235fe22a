"""The background jobs of the training docks and helpers for jobs in child processes (Qt-free).

They run either in a worker thread or in a child process (`child_process`), so they take and return only
picklable values and import torch lazily. No science here: every number comes from `core`.
"""

from __future__ import annotations

import pickle
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari_dagman.core.config import FinetuneConfig, PretrainConfig
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


# --- the start of a training run -------------------------------------------------------------------------
#: How many stages a training job reports before its first step: importing, reading, preparing, and the first
#: step itself, which the dock marks when the job says what it starts (its info lines come right before it).
START_STAGES = 4


def _stage(done: int, text: str) -> Any:
    from napari_dagman.core.events import ProgressEvent

    return ProgressEvent(done, START_STAGES, text)


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

    The dock offers layers and files at once: the layers go to the run as in-memory volumes, the files through
    ``config.images`` (``with_images``), so the run reads them one at a time through the prepared-volume cache
    and reports each ("preparing the volumes", k of n). ``methods`` are registered first: a method that user code registered
    in napari's process is unknown to a child process until then (registering a known spec again is a no-op).
    The stages before the first step are reported as `ProgressEvent`s (a run in a child process takes a while to
    start: the dock says where it is).
    """
    yield _stage(1, "importing torch and MONAI")
    from napari_dagman.core.methods.registry import register
    from napari_dagman.core.training import run_pretraining

    for spec in methods:
        register(spec)
    pool = list(volumes or [])
    where = f"{config.spacing:g} mm" if config.spacing else "the model's spacing"
    yield _stage(2, f"reading the images and resampling them to {where}")
    result = yield from run_pretraining(
        config, pool or None, resume=resume, cancel=cancel, command=command, with_images=bool(pool)
    )
    return result


# --- fine-tuning ----------------------------------------------------------------------------------------------
def finetune_job(
    config: FinetuneConfig,
    pairs: list[tuple[Volume, Volume]] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str = "napari-dagman fine-tuning dock",
) -> Generator[Any, None, Any]:
    """`core.segmentation.run_finetuning` on layer pairs or on the files of ``config``, its start in stages.

    The files of a new run are read here; a resumed run reads the files it recorded itself.
    """
    yield _stage(1, "importing torch and MONAI")
    from napari_dagman.core.segmentation import run_finetuning
    from napari_dagman.core.segmentation.data import load_pairs

    if not pairs and config.images and not resume:
        yield _stage(2, f"reading {len(config.images)} CT file(s) and label map(s)")
        pairs = load_pairs(config)  # an image that looks like a label map: the job warns (core)
    yield _stage(3, "resampling and building the model")
    result = yield from run_finetuning(config, pairs or None, resume=resume, cancel=cancel, command=command)
    return result
