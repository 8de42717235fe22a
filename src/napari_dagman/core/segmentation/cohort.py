"""Prediction over a cohort (issue 26): the model is loaded once, each case is segmented and written, and one
table (case x organ: volumes, Dice, HD95) and a summary (per organ mean and median, the worst cases) are written.

Four cases one process at a time took 465 s with the model reloaded each time, and the per-case CSVs were joined
by hand. Cases come from `core.datasets` (a folder, a dataset.json, a list).
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.events import CancelToken, LogEvent, ProgressEvent, check_cancelled

if TYPE_CHECKING:
    from napari_dagman.core.config import PredictConfig
    from napari_dagman.core.datasets import Case

#: The cohort's table and summary, in the output folder.
COHORT_TABLE = "cohort.csv"
COHORT_SUMMARY = "cohort_summary.json"
#: How many of the worst cases the summary names per organ.
WORST_CASES = 3


@dataclass
class CohortResults:
    """What a cohort prediction wrote: the table (one row per case and organ), the summary, the files per case."""

    table: pd.DataFrame
    summary: dict[str, Any]
    written: dict[str, list[str]]
    failed: dict[str, str]


def cohort_predict_job(
    config: PredictConfig,
    cases: Sequence[Case],
    out_dir: str | Path,
    *,
    suffix: str = ".nii.gz",
    references: bool = True,
    cancel: CancelToken | None = None,
) -> Generator[Any, None, CohortResults]:
    """Segment every case with one loaded model, write ``<out_dir>/<case><suffix>`` (and its metrics when the case
    has a reference), then the cohort table and summary. A case that cannot be read is reported and skipped; the
    run refuses to start when the output folder is not writable or a case name would overwrite another's."""
    from napari_dagman.core.datasets import read_case_labels
    from napari_dagman.core.io import check_output_file, read_volume
    from napari_dagman.core.segmentation.jobs import load_segmenter, predict_job, write_prediction

    out = Path(out_dir)
    if not cases:
        raise DagmanInputError("no cases to predict")
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:  # every output is checked before the first minute of inference
        check_output_file(out / f"{case.name}{suffix}")
    check_output_file(out / COHORT_TABLE, "cohort table")
    segmenter = load_segmenter(config.checkpoint, weights=config.weights, device=config.device)
    rows: list[pd.DataFrame] = []
    written: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    files: dict[str, dict[str, str | None]] = {}  # what the results dock opens per case
    for index, case in enumerate(cases):
        check_cancelled(cancel, "the cohort prediction")
        yield ProgressEvent(index, len(cases), f"case {index + 1}/{len(cases)}: {case.name}")
        try:
            image = read_volume(case.image)
            image.metadata["name"] = case.name
            reference = read_case_labels(case, image) if references and case.labels else None
            results = yield from _quiet(predict_job(config, image, reference, segmenter=segmenter, cancel=cancel))
        except DagmanInputError as err:  # one bad case does not lose the others
            failed[case.name] = str(err)
            yield LogEvent(f"{case.name}: skipped: {err}", "warning")
            continue
        written[case.name] = write_prediction(
            results,
            out / f"{case.name}{suffix}",
            extra={"image": str(case.image), "reference": str(case.labels) if reference is not None else None},
            image=image,
        )
        table = results.table.copy()
        table.insert(0, "case", case.name)
        rows.append(table)
        files[case.name] = {
            "image": str(Path(case.image).absolute()),
            "prediction": str((out / f"{case.name}{suffix}").absolute()),
            "reference": str(Path(case.labels).absolute()) if reference is not None else None,
        }
    yield ProgressEvent(len(cases), len(cases), "cohort table")
    if not rows:
        raise DagmanError(f"no case could be predicted: {'; '.join(f'{k}: {v}' for k, v in failed.items())}")
    table = pd.concat(rows, ignore_index=True)
    summary = cohort_summary(table, failed)
    summary["files"] = files
    from napari_dagman.core.io import atomic_write_text

    atomic_write_text(out / COHORT_TABLE, table.to_csv(index=False))
    atomic_write_text(out / COHORT_SUMMARY, json.dumps(summary, indent=2) + "\n")
    return CohortResults(table, summary, written, failed)


def _quiet(events: Generator[Any, None, Any]) -> Generator[Any, None, Any]:
    """A case's own events without its progress (the cohort's progress counts cases); warnings pass."""
    try:
        while True:
            event = next(events)
            if isinstance(event, LogEvent):
                yield event
    except StopIteration as stop:
        return stop.value


def cohort_summary(table: pd.DataFrame, failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Per organ: cases, mean and median Dice and HD95, the worst cases by Dice; over all: mean Dice per case."""

    def number(value: float) -> float | None:
        return None if not math.isfinite(value) else round(float(value), 4)

    organs: dict[str, Any] = {}
    for organ, rows in table.groupby("organ", sort=False):
        dice = rows["dice"].to_numpy(dtype=float)
        hd = rows["hd95_mm"].to_numpy(dtype=float)
        scored = rows[np.isfinite(dice)].sort_values("dice")
        organs[str(organ)] = {
            "cases": int(len(rows)),
            "scored": int(np.isfinite(dice).sum()),
            "mean_dice": number(np.nanmean(dice)) if np.isfinite(dice).any() else None,
            "median_dice": number(np.nanmedian(dice)) if np.isfinite(dice).any() else None,
            "mean_hd95_mm": number(np.nanmean(hd)) if np.isfinite(hd).any() else None,
            "median_hd95_mm": number(np.nanmedian(hd)) if np.isfinite(hd).any() else None,
            "worst": [
                {"case": str(r.case), "dice": number(float(r.dice))} for r in scored.head(WORST_CASES).itertuples()
            ],
        }
    per_case = table.groupby("case", sort=False)["dice"].mean()
    return {
        "cases": int(table["case"].nunique()),
        "failed": dict(failed or {}),
        "organs": organs,
        "mean_dice_per_case": {str(k): number(float(v)) for k, v in per_case.items()},
    }


# --- reading a cohort back (the results dock) -------------------------------------------------------------------
@dataclass
class Cohort:
    """A cohort folder as the results dock lists it: one row per case (worst mean Dice first) and its files."""

    folder: Path
    cases: pd.DataFrame  # case, organs, mean_dice, worst_organ, worst_dice
    files: dict[str, dict[str, str | None]]
    failed: dict[str, str]


def read_cohort(folder: str | Path) -> Cohort:
    """The cases of a folder written by ``predict FOLDER --out DIR``: refused in one line when it is not one."""
    from napari_dagman.core.files import read_json

    folder = Path(folder)
    table_path, summary_path = folder / COHORT_TABLE, folder / COHORT_SUMMARY
    if not table_path.is_file() or not summary_path.is_file():
        raise DagmanInputError(
            f"{folder} is not a cohort folder: it has no {COHORT_TABLE} and {COHORT_SUMMARY} "
            "(`napari-dagman predict FOLDER --out DIR` writes them)"
        )
    try:
        table = pd.read_csv(table_path)
    except (OSError, ValueError) as err:
        raise DagmanInputError(f"cannot read {table_path}: {err}") from None
    missing = {"case", "organ", "dice"} - set(table.columns)
    if missing:
        raise DagmanInputError(f"{table_path} lacks the column(s) {', '.join(sorted(missing))}")
    summary = read_json(summary_path, "cohort summary")
    files = summary.get("files") if isinstance(summary, dict) else None
    if not isinstance(files, dict):
        raise DagmanInputError(f"{summary_path} does not list the cases' files (written by an older version?)")
    rows = []
    for case, group in table.groupby("case", sort=False):
        dice = group["dice"].to_numpy(dtype=float)
        scored = np.isfinite(dice)
        worst = group[scored].sort_values("dice").head(1)
        rows.append(
            {
                "case": str(case),
                "organs": int(len(group)),
                "mean_dice": float(dice[scored].mean()) if scored.any() else math.nan,
                "worst_organ": str(worst["organ"].iloc[0]) if len(worst) else "",
                "worst_dice": float(worst["dice"].iloc[0]) if len(worst) else math.nan,
            }
        )
    cases = pd.DataFrame(rows, columns=["case", "organs", "mean_dice", "worst_organ", "worst_dice"])
    # the worst cases first (what a reader checks); cases without a reference last, by name
    cases = cases.sort_values(["mean_dice", "case"], na_position="last", kind="stable").reset_index(drop=True)
    failed = summary.get("failed") if isinstance(summary.get("failed"), dict) else {}
    return Cohort(folder, cases, {str(k): v for k, v in files.items()}, dict(failed))


@dataclass
class CohortCase:
    """One case of a cohort opened again: its CT, and the prediction with its reference, table and errors."""

    name: str
    image: Any  # Volume
    results: Any  # SegmentationResults


def cohort_case_job(
    name: str, files: dict[str, str | None], *, cancel: CancelToken | None = None
) -> Generator[Any, None, CohortCase]:
    """Read a cohort case's CT, prediction and reference and compute its table and disagreement map (background
    job of the results dock)."""
    from napari_dagman.core.io import read_volume
    from napari_dagman.core.segmentation.jobs import evaluation_job

    for key in ("image", "prediction"):
        if not files.get(key) or not Path(str(files[key])).exists():
            raise DagmanInputError(f"{name}: its {key} {files.get(key)} is not there any more")
    yield ProgressEvent(0, 3, f"{name}: reading the CT")
    image = read_volume(str(files["image"]))
    image.metadata["name"] = name
    check_cancelled(cancel, "opening the case")
    yield ProgressEvent(1, 3, f"{name}: reading the prediction")
    prediction = read_volume(str(files["prediction"]))
    prediction.metadata["name"] = f"{name} prediction"
    reference = None
    if files.get("reference"):
        if not Path(str(files["reference"])).exists():
            raise DagmanInputError(f"{name}: its reference {files['reference']} is not there any more")
        reference = read_volume(str(files["reference"]))
        reference.metadata["name"] = f"{name} reference"
    check_cancelled(cancel, "opening the case")
    yield ProgressEvent(2, 3, f"{name}: table and disagreement")
    results = yield from evaluation_job(prediction, reference, cancel=cancel)  # names: the prediction's sidecar
    yield ProgressEvent(3, 3, name)
    return CohortCase(name, image, results)
