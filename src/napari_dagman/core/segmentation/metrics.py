"""Results of a segmentation: per-organ volume, Dice and HD95, where each organ is, where prediction and
reference disagree most - what the results dock navigates (``monai.metrics`` for Dice and HD95).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from napari_dagman.core.segmentation.labels import align_labels, check_label_volume
from napari_dagman.core.volume import Volume

DISAGREEMENT_NAMES: dict[int, str] = {1: "false_positive", 2: "false_negative", 3: "wrong_organ"}


_DISAGREEMENT_COLOURS: dict[int | None, np.ndarray] = {
    0: np.zeros(4),
    1: np.array([1.0, 0.85, 0.0, 1.0]),  # false positive: yellow
    2: np.array([0.0, 0.8, 1.0, 1.0]),  # false negative: cyan
    3: np.array([1.0, 0.0, 1.0, 1.0]),  # wrong organ: magenta
    None: np.array([0.5, 0.5, 0.5, 1.0]),
}


def dice_per_class(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, num_classes: int
) -> np.ndarray:
    """Dice of classes 1..K (MONAI ``compute_dice``); NaN where the reference lacks the class."""
    from monai.metrics import compute_dice

    p = torch.as_tensor(np.asarray(prediction, dtype=np.int64))[None, None]
    r = torch.as_tensor(np.asarray(reference, dtype=np.int64))[None, None]
    return compute_dice(p, r, include_background=False, num_classes=num_classes, ignore_empty=True)[0].numpy()


def organ_focus(labels: np.ndarray, organ: int, axis: int = 0) -> tuple[int, int, int] | None:
    """Index (z, y, x) to show an organ: the slice along ``axis`` where it is largest, its centroid there."""
    mask = np.asarray(labels) == organ
    return _focus(mask, axis)


def _focus(mask: np.ndarray, axis: int) -> tuple[int, int, int] | None:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    areas = mask.sum(axis=other)
    if not areas.any():
        return None
    index = int(np.argmax(areas))
    plane = np.take(mask, index, axis=axis)
    coords = np.argwhere(plane).mean(axis=0)
    point = [0, 0, 0]
    point[axis] = index
    for a, c in zip(other, coords, strict=True):
        point[a] = int(round(float(c)))
    return tuple(point)  # type: ignore[return-value]


def worst_slice(
    prediction: np.ndarray,
    reference: np.ndarray,
    organ: int | None = None,
    *,
    axis: int = 0,
    organs: Sequence[int] | None = None,
) -> tuple[int, int, int] | None:
    """Index (z, y, x) of the slice along ``axis`` where prediction and reference disagree most.

    For one ``organ``: voxels where exactly one of them says that organ; for all (``organ=None``): voxels whose
    labels differ, counting only ``organs`` when given. The point is the centroid of the disagreement in that
    slice; None when they agree everywhere.
    """
    pred, ref = np.asarray(prediction), np.asarray(reference)
    if organ is not None:
        mask = (pred == organ) != (ref == organ)
    else:
        if organs is not None:
            keep = np.asarray(list(organs))
            pred = np.where(np.isin(pred, keep), pred, 0)
            ref = np.where(np.isin(ref, keep), ref, 0)
        mask = pred != ref
    return _focus(mask, axis)


def disagreement_map(prediction: np.ndarray, reference: np.ndarray, organs: Sequence[int]) -> np.ndarray:
    """Per voxel: 0 agree, 1 false positive (organ predicted on background), 2 false negative (organ missed),
    3 wrong organ. Reference ids that are not among ``organs`` count as background (the model never saw them).
    """
    keep = np.asarray(list(organs))
    pred = np.where(np.isin(prediction, keep), prediction, 0)
    ref = np.where(np.isin(reference, keep), reference, 0)
    out = np.zeros(pred.shape, dtype=np.uint8)
    differ = pred != ref
    out[differ & (ref == 0)] = 1
    out[differ & (pred == 0)] = 2
    out[differ & (pred != 0) & (ref != 0)] = 3
    return out


def disagreement_colours() -> dict[int | None, np.ndarray]:
    """Colours of `disagreement_map` values (yellow FP, cyan FN, magenta wrong organ)."""
    return {k: v.copy() for k, v in _DISAGREEMENT_COLOURS.items()}


def evaluate(
    prediction: Volume,
    reference: Volume | None,
    organs: Mapping[int, str],
    *,
    hd95: bool = True,
    resample_reference: bool = False,
) -> pd.DataFrame:
    """Per-organ results table: volume (ml), and with a reference its volume, Dice and HD95 (mm).

    Columns: ``id``, ``organ``, ``volume_ml``, ``reference_ml``, ``dice``, ``hd95_mm`` (NaN without a reference,
    or when the organ is missing from one side), ``focus_z/y/x`` (where the organ is largest along z, in
    prediction voxel indices; from the reference when the prediction misses it) and ``worst_z`` (the axial
    slice with the most disagreement for that organ, -1 when none).
    """
    from monai.metrics import compute_hausdorff_distance

    pred = np.asarray(prediction.array)
    ref = None
    if reference is not None:
        reference = check_label_volume(reference, "reference label map")
        reference = align_labels(
            prediction,
            reference,
            resample=resample_reference,
            image_name=str(prediction.metadata.get("name", "prediction")),
            labels_name=str(reference.metadata.get("name", "reference")),
        )
        ref = np.asarray(reference.array)
    voxel_ml = float(np.prod(prediction.spacing)) / 1000.0
    rows = []
    for organ, name in organs.items():
        p = pred == organ
        row: dict[str, Any] = {"id": int(organ), "organ": name, "volume_ml": float(p.sum()) * voxel_ml}
        r = ref == organ if ref is not None else None
        row["reference_ml"] = float(r.sum()) * voxel_ml if r is not None else math.nan
        row["dice"], row["hd95_mm"] = math.nan, math.nan
        if r is not None and r.any():
            inter = float(np.logical_and(p, r).sum())
            row["dice"] = 2.0 * inter / (float(p.sum()) + float(r.sum()))
            if hd95 and p.any():
                with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
                    warnings.simplefilter("ignore", FutureWarning)
                    value = compute_hausdorff_distance(
                        torch.as_tensor(p[None, None]),
                        torch.as_tensor(r[None, None]),
                        include_background=True,
                        percentile=95,
                        spacing=list(prediction.spacing),
                    )
                row["hd95_mm"] = float(value.reshape(-1)[0])
        focus = _focus(p, 0) if p.any() else (_focus(r, 0) if r is not None else None)
        row["focus_z"], row["focus_y"], row["focus_x"] = focus if focus is not None else (-1, -1, -1)
        worst = _focus(p != r, 0) if r is not None else None
        row["worst_z"] = worst[0] if worst is not None else -1
        rows.append(row)
    return pd.DataFrame(
        rows,
        columns=[
            "id",
            "organ",
            "volume_ml",
            "reference_ml",
            "dice",
            "hd95_mm",
            "focus_z",
            "focus_y",
            "focus_x",
            "worst_z",
        ],
    )


def results_summary(table: pd.DataFrame) -> dict[str, Any]:
    """JSON-ready results: one record per organ (NaN -> null) and the mean Dice / HD95 over scored organs."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value

    records = [{k: plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
    dice = table["dice"].to_numpy(dtype=float)
    hd = table["hd95_mm"].to_numpy(dtype=float)
    return {
        "organs": records,
        "mean_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else None,
        "mean_hd95_mm": float(np.nanmean(hd)) if np.isfinite(hd).any() else None,
    }


def format_table(table: pd.DataFrame) -> str:
    """A plain-text table for the terminal."""
    header = f"{'organ':<24}{'id':>5}{'ml':>10}{'ref ml':>10}{'Dice':>8}{'HD95 mm':>10}"
    lines = [header, "-" * len(header)]

    def num(value: float, fmt: str) -> str:
        return format(value, fmt) if math.isfinite(value) else "-"

    for row in table.itertuples(index=False):
        lines.append(
            f"{str(row.organ)[:23]:<24}{row.id:>5}{num(row.volume_ml, '.1f'):>10}{num(row.reference_ml, '.1f'):>10}"
            f"{num(row.dice, '.3f'):>8}{num(row.hd95_mm, '.1f'):>10}"
        )
    summary = results_summary(table)
    if summary["mean_dice"] is not None:
        mean_hd = summary["mean_hd95_mm"]
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<24}{'':>5}{'':>10}{'':>10}{summary['mean_dice']:>8.3f}"
            f"{(format(mean_hd, '.1f') if mean_hd is not None else '-'):>10}"
        )
    return "\n".join(lines)
