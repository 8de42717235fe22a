"""Typed events that long jobs yield (training, fine-tuning, attention, embeddings).

The GUI runs a job generator in a napari worker and draws what it yields; the CLI drives the same generator
with a progress bar. Stopping = closing the generator (or a `CancelToken`) at the next yield.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class JobCancelled(Exception):
    """A job stopped because its user cancelled it: not an error, nothing to report.

    The cancel contract of every job (training, attention, prediction, embeddings): a job generator takes a
    ``cancel`` `CancelToken` and checks it between units of work (a step, a batch of windows); closing the
    generator has the same effect. A training job then saves a resumable checkpoint and returns its
    `FinishedEvent` with ``cancelled=True``; a job without a partial result raises `JobCancelled`.
    """


def check_cancelled(cancel: CancelToken | None, what: str = "the job") -> None:
    """Raise `JobCancelled` when ``cancel`` is set (called by jobs between units of work)."""
    if cancel is not None and cancel.cancelled:
        raise JobCancelled(f"{what} was cancelled")


class CancelToken:
    """A thread-safe flag a job checks between steps (the GUI's Cancel button sets it)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class LogEvent:
    """A message for the user (status line, notification, CLI output)."""

    message: str
    level: str = "info"  # info | warning


#: The stage a training run's start reports while its image files are prepared (one `ProgressEvent` per file).
PREPARING = "preparing the volumes"
#: The stage a fine-tuning run reports while it validates (one `ProgressEvent` per validation case or slab).
VALIDATING = "validating"


@dataclass
class ProgressEvent:
    """Progress of a job that is not a training loop (attention over a volume, embeddings)."""

    done: int
    total: int
    stage: str = ""


@dataclass
class StepEvent:
    """One optimiser step finished."""

    step: int  # steps done so far (1-based)
    total_steps: int
    loss: float
    terms: dict[str, float]
    lr: float
    seconds_per_step: float
    samples_per_second: float
    extras: dict[str, float] = field(default_factory=dict)
    epoch: float = 0.0


@dataclass
class Picture:
    """A method's own picture of a crop: a level's mask, a reconstruction, an error map.

    ``array`` is (z, y, x) (a 2D model's slice has a leading axis of 1) on a grid of ``factor`` crop voxels per
    element along z, y, x (1 = the crop's own grid, 2 = twice coarser, 0.5 = twice finer); ``kind`` is
    ``image`` (continuous values) or ``labels`` (integer classes, 0 = nothing); ``names`` names the label values.
    """

    name: str
    array: np.ndarray
    factor: tuple[float, float, float] = (1.0, 1.0, 1.0)
    kind: str = "image"
    description: str = ""
    names: dict[int, str] = field(default_factory=dict)


@dataclass
class PreviewEvent:
    """What the model saw and chose at a step, for one view, placed in physical (napari world) space.

    Arrays are 3D (a 2D model's slice has a leading axis of 1). Each comes with the ``scale``/``translate``
    that overlay it on the CT: ``image`` is the crop (model intensities in [0, 1]), ``attention`` the class
    attention per head (heads, *token grid) or None for methods without one, ``mask`` the hidden cells.
    """

    step: int
    image: np.ndarray
    image_scale: list[float]
    image_translate: list[float]
    mask: np.ndarray
    mask_scale: list[float]
    mask_translate: list[float]
    #: cells the noisy teacher dropped from its input (same grid as ``mask``), or None
    unseen: np.ndarray | None = None
    attention: np.ndarray | None = None
    attention_scale: list[float] = field(default_factory=list)
    attention_translate: list[float] = field(default_factory=list)
    volume_name: str = ""
    volume_index: int = 0
    #: the method's own pictures (see `Picture`), each placed with ``image_scale``/``image_translate`` x factor
    pictures: list[Picture] = field(default_factory=list)


@dataclass
class CheckpointEvent:
    step: int
    path: str
    kind: str  # last | best | snapshot


@dataclass
class FinishedEvent:
    """The job ended (completed, cancelled or stopped early); ``run_dir`` holds its results."""

    run_dir: str
    steps_done: int
    total_steps: int
    cancelled: bool = False
    paths: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationEvent:
    """Validation of a fine-tuning run after ``step`` steps: Dice per organ name (NaN: not in the validation data)."""

    step: int
    dice: dict[str, float]
    mean_dice: float
    seconds: float = 0.0
    best: bool = False


@dataclass
class PredictionEvent:
    """A finished segmentation: ``labels`` is a `core.volume.Volume` of label ids in the input's geometry.

    Organ names are in ``labels.metadata["label_names"]`` (id -> name).
    """

    labels: Any
    seconds: float
    source: str = ""
