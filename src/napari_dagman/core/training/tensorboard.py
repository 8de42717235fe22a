"""TensorBoard event files of a training run, written from the loop's events (``--tensorboard``).

The loop hands every event it yields to a `TensorBoardWriter` (`tee_events`); the writer keeps what TensorBoard
shows, in the run folder (``tensorboard --logdir RUN`` or ``--logdir runs/`` for several runs):

* scalars per step: ``loss``, ``loss/<term>`` for every loss term, ``lr``, the method's extras as
  ``train/<name>`` (``train/momentum``, ``train/grad_norm``, ...) and the probe head-diversity figures as
  ``probe/<name>`` (``probe/teacher_head_diversity``, ...); fine-tuning's validation as
  ``validation/mean_dice`` and ``validation/dice/<organ>``;
* images per preview: the crop's middle slice, the mask on it and the class attention (mean over heads and each
  head), all on the crop's grid.

tensorboard is optional (``pip install tensorboard``): asking for it without the package is refused with one
line before the run starts (`require_tensorboard`).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import FinishedEvent, PreviewEvent, StepEvent, ValidationEvent

INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install tensorboard"


def require_tensorboard() -> None:
    """Refuse, with one line, when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise DagmanInputError(INSTALL_HINT)


def on_crop_grid(array: np.ndarray, scale: list[float], crop_scale: list[float]) -> np.ndarray:
    """A (z, y, x) array on a coarser grid (mask cells, attention tokens) repeated onto the crop's voxel grid."""
    out = array
    for axis, (coarse, fine) in enumerate(zip(scale, crop_scale, strict=True)):
        factor = max(1, int(round(coarse / fine)))
        out = np.repeat(out, factor, axis=axis)
    return out


def _unit(image: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] for display (a constant image is black)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


class TensorBoardWriter:
    """Write a training job's events as TensorBoard scalars and images (``__call__`` takes any event)."""

    def __init__(self, folder: str | Path, *, start_step: int = 0) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events it wrote after its checkpoint, as metrics.jsonl does
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def __call__(self, event: Any) -> None:
        if isinstance(event, StepEvent):
            self.step(event)
        elif isinstance(event, PreviewEvent):
            self.preview(event)
        elif isinstance(event, ValidationEvent):
            self.scalar("validation/mean_dice", event.mean_dice, event.step)
            for organ, dice in event.dice.items():
                self.scalar(f"validation/dice/{organ}", dice, event.step)
        elif isinstance(event, FinishedEvent):
            self.writer.flush()

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """One scalar; NaN (not measured at this step) and infinity are left out."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            return
        if math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def step(self, event: StepEvent) -> None:
        self.scalar("loss", event.loss, event.step)
        for name, value in event.terms.items():
            self.scalar(f"loss/{name}", value, event.step)
        self.scalar("lr", event.lr, event.step)
        for name, value in event.extras.items():
            tag = f"probe/{name[len('probe_') :]}" if name.startswith("probe_") else f"train/{name}"
            self.scalar(tag, value, event.step)
        self.scalar("speed/samples_per_second", event.samples_per_second, event.step)

    def preview(self, event: PreviewEvent) -> None:
        """The crop's middle slice (z), the mask and the class attention on it."""
        crop = np.asarray(event.image, dtype=np.float32)
        z = crop.shape[0] // 2
        self.writer.add_image("preview/image", np.clip(crop[z], 0.0, 1.0), event.step, dataformats="HW")
        mask = on_crop_grid(np.asarray(event.mask), event.mask_scale, event.image_scale)
        self.writer.add_image("preview/mask", (mask[z] > 0).astype(np.float32), event.step, dataformats="HW")
        if event.attention is not None and event.attention.size:
            heads = [on_crop_grid(h, event.attention_scale, event.image_scale)[z] for h in event.attention]
            self.writer.add_image(
                "preview/attention_mean", _unit(np.mean(heads, axis=0)), event.step, dataformats="HW"
            )
            for h, head in enumerate(heads):
                self.writer.add_image(f"preview/attention_head{h}", _unit(head), event.step, dataformats="HW")

    def close(self) -> None:
        self.writer.close()


def tee_events(events: Generator[Any, None, Any], sink: TensorBoardWriter) -> Generator[Any, None, Any]:
    """Yield ``events`` unchanged, handing each to ``sink`` first; returns their return value.

    Closing this generator closes ``events`` (a cancelled run still saves its checkpoint); the sink is closed
    when the events end, however they end.
    """
    try:
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                return stop.value
            sink(event)
            yield event
    finally:
        events.close()
        sink.close()
