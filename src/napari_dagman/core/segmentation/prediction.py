"""Prediction with a fine-tuned network: MONAI's sliding-window inference (Gaussian blending) at the run's
spacing; the class scores are resampled back onto the input grid (by default the probabilities, before the
arg-max: `pipeline.INVERSE_MODES`) a slab at a time, so the labels keep the input's geometry and the memory does
not grow with the class count. The resampling and intensity steps are MONAI transforms shared with the run's MONAI
Bundle (`core.segmentation.pipeline`), so both give the same labels.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.events import (
    CancelToken,
    FinishedEvent,
    JobCancelled,
    PredictionEvent,
    ProgressEvent,
    check_cancelled,
)
from napari_dagman.core.memory import check_prediction_memory
from napari_dagman.core.models.architecture import DEEPEST_STRIDE
from napari_dagman.core.segmentation.data import roi_size_for
from napari_dagman.core.segmentation.model import Segmenter
from napari_dagman.core.segmentation.pipeline import (
    IMAGE_KEY,
    PREDICT_INVERSE,
    check_inverse,
    classes_on_input_grid,
    to_model_space,
)
from napari_dagman.core.volume import Volume

Event = Any  # one of the dataclasses in core.events


def sliding_window_logits(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    roi_size: tuple[int, int, int],
    overlap: float,
    device: torch.device,
    sw_batch_size: int = 4,
    amp: bool = False,
    on_window: Any = None,
) -> torch.Tensor:
    """Class logits (K+1, Z, Y, X) of a model-space image (Z, Y, X) by MONAI's Gaussian-blended sliding window.

    ``on_window(n)`` is called after every batch of windows with the number of windows in it (progress and
    cancellation: raising in it stops the inference).
    """
    from napari_dagman.core.segmentation.pipeline import instantiate, sliding_window

    inferer = instantiate({**sliding_window(roi_size, overlap, sw_batch_size), "sw_device": device, "device": "cpu"})

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            out = net(x.to(device))
        if on_window is not None:
            on_window(int(x.shape[0]))
        return out.float()

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    with torch.no_grad():
        logits = inferer(x, predictor)
    return torch.as_tensor(logits)[0]


def window_count(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits (its scan interval rule), for progress bars."""
    n = 1
    for size, roi in zip(shape, roi_size, strict=True):
        size = max(size, roi)
        interval = max(1, int(roi * (1 - overlap))) if roi < size else 1
        n *= int(math.ceil((size - roi) / interval)) + 1 if size > roi else 1
    return n


def _checked_roi(image: Volume, segmenter: Segmenter, roi: int | None) -> int:
    """The sliding window's side, checked, once the image is known to fit in memory (`check_prediction_memory`):
    both refused before the model runs."""
    roi = int(roi or segmenter.roi)
    if roi % DEEPEST_STRIDE:
        raise DagmanInputError(f"roi must be a multiple of {DEEPEST_STRIDE}, got {roi}")
    s = segmenter.spacing
    target = image.spacing if s is None else ((s, s, s) if segmenter.arch.dims == 3 else (image.spacing[0], s, s))
    check_prediction_memory(image, spacing=target, classes=segmenter.label_map.num_classes)
    return roi


def run_prediction(
    image: Volume,
    segmenter: Segmenter,
    *,
    roi: int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    cancel: CancelToken | None = None,
    name: str | None = None,
    inverse: str = PREDICT_INVERSE,
) -> Generator[Event, None, Volume]:
    """Segment ``image``; yields `ProgressEvent` per batch of windows, a `PredictionEvent`, a `FinishedEvent`.
    ``inverse`` (`pipeline.INVERSE_MODES`) says how the class scores go back onto the input grid.

    The label map (returned, and in the `PredictionEvent`) holds the original label ids on the input's grid,
    with ``metadata["label_names"]`` and the input's source orientation (a NIfTI written from it overlays the
    input file). A cancel raises `JobCancelled` after the current batch of windows.
    """
    check_inverse(inverse)
    t_start = time.perf_counter()
    roi = _checked_roi(image, segmenter, roi)
    name = name or str(image.metadata.get("name", "image"))
    arch = segmenter.arch
    # the MONAI transforms a bundle of this run runs too (core.segmentation.pipeline)
    data, preprocessing = to_model_space(image, segmenter.spacing, arch.dims, segmenter.hu_range)
    model_image = data[IMAGE_KEY]
    roi_size = roi_size_for(arch.dims, roi)
    total = window_count(model_image.shape[1:], roi_size, overlap)
    done = [0]
    updates: queue.SimpleQueue[int] = queue.SimpleQueue()
    stop = threading.Event()
    result: dict[str, Any] = {}

    def on_window(n: int) -> None:
        done[0] += n
        updates.put(done[0])
        if stop.is_set():
            raise JobCancelled("the prediction was stopped")
        check_cancelled(cancel, "the prediction")

    def work() -> None:
        try:
            result["logits"] = sliding_window_logits(
                segmenter.net,
                model_image[0].numpy(),
                roi_size=roi_size,
                overlap=overlap,
                device=segmenter.device,
                sw_batch_size=sw_batch_size,
                amp=segmenter.device.type == "cuda",
                on_window=on_window,
            )
        except BaseException as err:  # handed to the generator's thread
            result["error"] = err

    yield ProgressEvent(0, total, "sliding window")
    # MONAI's sliding window has no callback to yield from: it runs in a helper thread while this generator
    # reports progress, so the GUI's progress bar moves and a cancel takes effect after the current batch.
    thread = threading.Thread(target=work, name="napari-dagman-predict", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
            latest = None
            while not updates.empty():
                latest = updates.get()
            if latest is not None:
                yield ProgressEvent(min(latest, total), total, "sliding window")
    except GeneratorExit:
        stop.set()
        thread.join()
        raise
    error = result.get("error")
    if error is not None:
        raise error
    logits: torch.Tensor = result["logits"]
    yield ProgressEvent(total, total, "resampling to the input grid")
    classes = classes_on_input_grid(image, model_image, logits, inverse)
    del logits, data, preprocessing
    ids = segmenter.label_map.to_labels(classes)
    labels = image.with_array(
        ids,
        name=f"{name} prediction",
        label_names={int(k): v for k, v in segmenter.label_map.id_names.items()},
        kind="labels",
        prediction_source=segmenter.source,
    )
    labels.metadata.pop("source_path", None)  # that is the CT's file, not this label map's
    seconds = time.perf_counter() - t_start
    yield PredictionEvent(labels, seconds=seconds, source=segmenter.source)
    yield FinishedEvent(
        str(Path(segmenter.source).parent),
        total,
        total,
        paths={"weights": segmenter.source},
        summary={"seconds": seconds, "windows": total, "inverse": inverse,
                 "model_spacing": model_image.pixdim.tolist()},  # fmt: skip
    )
    return labels


def predict(
    image: Volume,
    segmenter: Segmenter,
    *,
    roi: int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    inverse: str = PREDICT_INVERSE,
) -> Volume:
    """`run_prediction` to the end: the label map in the input's geometry."""
    labels = None
    events = run_prediction(
        image, segmenter, roi=roi, overlap=overlap, sw_batch_size=sw_batch_size, inverse=inverse
    )
    for event in events:
        if isinstance(event, PredictionEvent):
            labels = event.labels
    if labels is None:
        raise DagmanError("prediction ended without a result")
    return labels
