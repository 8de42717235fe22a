"""The prediction job that the CLI (``napari-dagman predict``) and the results dock share.

`predict_job` checks everything it can before the (possibly minutes long) sliding window: the run, the reference
label map and its grid. It then segments, evaluates against the reference (per-organ volumes, Dice, HD95, where
each organ is largest and where prediction and reference disagree most) and builds the disagreement map.
`write_prediction` writes the label map (with its organ names) and, with a reference, the metrics as JSON and CSV.
Both follow the cancel contract of `core.events`: a cancel raises `JobCancelled`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_dagman.core.config import PredictConfig
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import CancelToken, ProgressEvent, check_cancelled
from napari_dagman.core.io import check_ct
from napari_dagman.core.segmentation.labels import (
    LabelMap,
    align_labels,
    check_label_volume,
    label_names_of,
    present_ids,
)
from napari_dagman.core.segmentation.metrics import disagreement_map, evaluate, results_summary
from napari_dagman.core.segmentation.model import Segmenter, load_segmenter
from napari_dagman.core.segmentation.prediction import run_prediction
from napari_dagman.core.volume import Volume


@dataclass
class SegmentationResults:
    """A prediction, its reference (on the prediction's grid), the per-organ table and the disagreement map."""

    prediction: Volume
    reference: Volume | None
    table: pd.DataFrame
    names: dict[int, str]
    disagreement: np.ndarray | None = None
    seconds: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)  # checkpoint, step, roi, overlap of the prediction


def reference_on_grid(image: Volume, reference: Volume, *, resample: bool) -> Volume:
    """A reference label map checked (integer ids) and on ``image``'s grid (resampled only when asked)."""
    return align_labels(
        image,
        check_label_volume(reference, "reference label map"),
        resample=resample,
        image_name=str(image.metadata.get("name", "image")),
        labels_name=str(reference.metadata.get("name", "reference")),
    )


def check_reference_ids(reference: Volume, label_map: LabelMap) -> None:
    """Refuse a reference that holds none of the organs the run segments: every score would be empty (a label
    map of another labelling, or of another image)."""
    present = present_ids(reference.array)
    if not set(present) & set(label_map.ids):
        shown = ", ".join(map(str, present[:12])) + (", ..." if len(present) > 12 else "")
        raise DagmanInputError(
            f"the reference label map holds none of the organs the run segments ({label_map.describe()}); it "
            f"holds {'ids ' + shown if present else 'only background'}"
        )
    named = {int(k): str(v) for k, v in (reference.metadata.get("label_names") or {}).items()}
    clashes = [
        (i, named[i], name)
        for i, name in label_map.id_names.items()
        if i in named and i in present and _organ_key(named[i]) != _organ_key(name)
    ]
    if clashes:  # the same ids in another labelling: every score would compare different organs
        shown = ", ".join(f"id {i} is '{theirs}' there and '{ours}' in the run" for i, theirs, ours in clashes[:4])
        more = f" (and {len(clashes) - 4} more)" if len(clashes) > 4 else ""
        raise DagmanInputError(
            f"the reference label map names its organs otherwise than the run: {shown}{more}; give a reference "
            "of the run's labelling"
        )


def _organ_key(name: str) -> str:
    """A name compared without case, spaces, hyphens or underscores ("Kidney right" = "kidney_right")."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def evaluation_job(
    prediction: Volume,
    reference: Volume | None,
    *,
    names: dict[int, str] | None = None,
    hd95: bool = True,
    resample_reference: bool = False,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, SegmentationResults]:
    """Per-organ table and disagreement map of a prediction (against a reference, if any)."""
    names = {int(k): str(v) for k, v in (names or label_names_of(prediction)).items()}
    yield ProgressEvent(0, 1, "metrics")
    if reference is not None:
        reference = reference_on_grid(prediction, reference, resample=resample_reference)
    check_cancelled(cancel, "the evaluation")
    table = evaluate(prediction, reference, names, hd95=hd95)
    disagreement = (
        disagreement_map(prediction.array, reference.array, list(names)) if reference is not None else None
    )
    yield ProgressEvent(1, 1, "metrics")
    return SegmentationResults(prediction, reference, table, names, disagreement)


def predict_job(
    config: PredictConfig,
    image: Volume,
    reference: Volume | None = None,
    *,
    segmenter: Segmenter | None = None,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, SegmentationResults]:
    """Segment ``image`` with the run of ``config.checkpoint`` and evaluate it; returns `SegmentationResults`."""
    import torch

    config.validate()
    if not config.checkpoint and segmenter is None:
        raise DagmanInputError("no fine-tuned run chosen: pick a fine-tuning run folder (--checkpoint)")
    if config.threads:
        torch.set_num_threads(config.threads)
    check_ct(image, f"'{image.metadata.get('name', 'the image')}'")
    # what can be wrong is found before the inference: the run, and the reference and its grid
    segmenter = segmenter or load_segmenter(config.checkpoint, weights=config.weights, device=config.device)
    if reference is not None:
        reference = reference_on_grid(image, reference, resample=config.resample_reference)
        check_reference_ids(reference, segmenter.label_map)
    labels = yield from run_prediction(
        image,
        segmenter,
        roi=config.roi,
        overlap=config.overlap,
        sw_batch_size=config.sw_batch_size,
        cancel=cancel,
        inverse=config.inverse,
    )
    results = yield from evaluation_job(
        labels, reference, names=labels.metadata["label_names"], hd95=config.hd95, cancel=cancel
    )
    results.info = {
        "checkpoint": segmenter.source,
        "checkpoint_step": segmenter.step,
        "roi": config.roi or segmenter.roi,
        "overlap": config.overlap,
        "inverse": config.inverse,
    }
    return results


def write_prediction(
    results: SegmentationResults,
    out: str | Path,
    *,
    metrics: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    image: Volume | None = None,
) -> list[str]:
    """Write the label map (and its organ names) to ``out``; with a reference or ``metrics``, the per-organ
    results as ``<out>.metrics.json`` (or ``metrics``) and ``.csv``. Returns the paths written.

    ``out`` ending in ``.dcm`` writes a DICOM SEG over ``image``, the DICOM series segmented
    (`core.segmentation.dicom_seg`)."""
    from napari_dagman.core.io import atomic_write_text, stem_of
    from napari_dagman.core.outputs import write_labels

    out = Path(out)
    written = write_labels(results.prediction, out, results.names, source=image)
    if results.reference is not None or metrics is not None:
        metrics_path = Path(metrics) if metrics else out.with_name(stem_of(out) + ".metrics.json")
        summary = results_summary(results.table)
        summary.update(results.info, **(extra or {}))
        atomic_write_text(metrics_path, json.dumps(summary, indent=2) + "\n")
        csv_path = metrics_path.with_suffix(".csv")
        atomic_write_text(csv_path, results.table.to_csv(index=False))
        written += [str(metrics_path), str(csv_path)]
    return written
