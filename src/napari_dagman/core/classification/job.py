"""The classification job: table -> checks -> features -> probes -> figures and files, as one event generator."""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.classification.evaluate import curve_rows, differences, run_arms, usable_shots
from napari_dagman.core.classification.features import check_images, table_features
from napari_dagman.core.classification.finetune import FINETUNE
from napari_dagman.core.classification.metrics import classification_metrics
from napari_dagman.core.classification.report import (
    curve_png,
    predictions_frame,
    roc_pr_pngs,
    write_csv,
    write_json,
)
from napari_dagman.core.classification.splits import check_patient_sides, patient_folds, table_split
from napari_dagman.core.classification.table import ClassTable, read_table
from napari_dagman.core.config.classify import ClassifyConfig
from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.events import CancelToken, FinishedEvent, LogEvent, ProgressEvent

#: the feature set of the run's encoder in every output (its published name is in metrics.json)
ENCODER = "encoder"
RANDOM_INIT = "random-init"


def prepare(config: ClassifyConfig) -> tuple[ClassTable, list, list[str]]:
    """The table, its splits and notes: everything checked that can be without reading an image."""
    from napari_dagman.core.files import check_output_folder

    if not config.table:
        raise DagmanInputError("no table given: a CSV with the columns image and label (and x, y, z, size)")
    if not config.out:
        raise DagmanInputError("no output folder given")
    table = read_table(config.table, positive=config.positive)
    if table.split is not None:
        splits = table_split(table.split)
        check_patient_sides(splits, table.patients)
        missing = set(range(len(table.class_names))) - set(table.y[splits[0].train].tolist())
        if missing:
            raise DagmanInputError(
                f"the training rows hold no {table.class_names[min(missing)]}: the probe cannot learn it"
            )
    else:
        splits = patient_folds(table.y, table.patients, config.folds, config.seed)
    notes = []
    if table.split is None and len(splits) < config.folds:
        notes.append(f"{len(splits)} folds instead of {config.folds}: the rarest class has {len(splits)} patients")
    check_output_folder(config.out)
    return table, splits, notes


def _encoders(config: ClassifyConfig) -> tuple[Any, dict[str, Any]]:
    from napari_dagman.core.checkpoint import load_pretrained_encoder
    from napari_dagman.core.embeddings.features import random_init_encoder

    if not config.checkpoint:
        raise DagmanInputError("no run folder given: choose a pretraining run (its encoder describes the rows)")
    try:
        pretrained = load_pretrained_encoder(config.checkpoint, config.which, weights=config.weights)
    except CheckpointError as err:
        raise CheckpointError(f"cannot use {config.checkpoint} as an encoder: {err}") from None
    encoders = {ENCODER: pretrained.encoder}
    if config.controls:
        encoders[RANDOM_INIT] = random_init_encoder(pretrained.arch, config.seed, type(pretrained.encoder))
    return pretrained, encoders


def classify_job(
    config: ClassifyConfig, cancel: CancelToken | None = None
) -> Generator[ProgressEvent | LogEvent | FinishedEvent, None, None]:
    """Run a classification (see `core.classification`); yields progress and log lines, then `FinishedEvent`
    whose summary holds the metrics. Bad input raises a one-line `DagmanInputError` before any feature."""
    config.validate()
    table, splits, notes = prepare(config)
    pretrained, encoders = _encoders(config)
    yield from check_images(table, cancel)
    started = time.perf_counter()
    features = yield from table_features(table, pretrained, encoders, config, cancel)
    feature_s = time.perf_counter() - started
    classes = len(table.class_names)
    shots, dropped = usable_shots(config.shot_list, splits, table.y, classes)
    notes += dropped
    for note in notes:
        yield LogEvent(note, "warning")
    arms = yield from run_arms(
        features, table.y, table.patients, splits, shots,
        classes=classes, draws=config.draws, c=config.probe_c, seed=config.seed, cancel=cancel,
    )  # fmt: skip
    runs = None
    if config.finetune:
        arms_ft, runs = yield from _fine_tune(config, table, pretrained, splits, shots, cancel)
        arms += arms_ft
    metrics = _metrics(config, table, pretrained, arms, splits, notes, feature_s)
    if runs is not None:
        metrics["finetune_runs"] = runs
    paths = _write(config, table, arms, splits, metrics)
    yield FinishedEvent(
        run_dir=str(config.out), steps_done=len(table), total_steps=len(table), paths=paths, summary=metrics
    )


def _fine_tune(config, table, pretrained, splits, shots, cancel):
    """The fine-tuned head's arms (`core.classification.finetune`), and what was trained, resumed or reused."""
    from napari_dagman.core.classification.crops import row_regions
    from napari_dagman.core.classification.finetune import finetune_arms

    regions = yield from row_regions(table, pretrained, config, cancel)
    arms, counts = yield from finetune_arms(config, table, pretrained, regions, splits, shots, cancel)
    reused = f", {counts['done']} reused from {Path(config.out) / FINETUNE}" if counts["done"] else ""
    resumed = f", {counts['resume']} resumed" if counts["resume"] else ""
    yield LogEvent(f"fine-tuning: {counts['new']} run(s) trained{resumed}{reused}")
    return arms, {"trained": counts["new"], "resumed": counts["resume"], "reused": counts["done"],
                  "folder": str(Path(config.out) / FINETUNE)}  # fmt: skip


def _full_arms(arms: list) -> dict[str, Any]:
    """The arm trained on every training row of each feature set (or the most shots asked for)."""
    best: dict[str, Any] = {}
    for arm in arms:
        rank = float("inf") if arm.shots == "all" else arm.shots
        if arm.features not in best or rank > best[arm.features][0]:
            best[arm.features] = (rank, arm)
    return {name: arm for name, (_, arm) in best.items()}


def _metrics(config, table, pretrained, arms, splits, notes, feature_s) -> dict[str, Any]:
    full = _full_arms(arms)
    per_set = {}
    for name, arm in full.items():
        probabilities = arm.probabilities[0]
        tested = np.isfinite(probabilities).all(axis=1)  # a table split predicts its test rows only
        per_set[name] = {
            **classification_metrics(
                table.y[tested], probabilities[tested], table.patients[tested],
                class_names=table.class_names, bootstrap=config.bootstrap, seed=config.seed,
            ),  # fmt: skip
            "shots": arm.shots,
            "c": sorted(set(arm.c_chosen)),
        }
    curve = curve_rows(arms, table.y, table.patients, len(table.class_names), config.bootstrap, config.seed)
    compare = (table.y, table.patients, len(table.class_names), config.bootstrap, config.seed)
    heads = {"probe": per_set.pop(ENCODER)}
    if FINETUNE in per_set:
        heads[FINETUNE] = per_set.pop(FINETUNE)
    return {
        "classes": table.class_names,
        "positive": table.class_names[1] if len(table.class_names) == 2 else None,
        "rows": len(table),
        "patients": int(len(np.unique(table.patients))),
        "validation": "table split" if table.split is not None else f"{len(splits)}-fold patient cross-validation",
        "encoder": {"run": str(pretrained.source), "which": pretrained.which, "method": pretrained.method,
                    "stage": config.stage},  # fmt: skip
        "heads": heads,
        "controls": per_set,
        "label_efficiency": curve,
        # the probe minus each control; the fine-tuned head minus the probe and each control
        "differences": [d for d in differences(arms, ENCODER, *compare) if d["minus"] != FINETUNE],
        **({"finetune_differences": differences(arms, FINETUNE, *compare)} if FINETUNE in heads else {}),
        "timing": {"features_s": round(feature_s, 2), "per_row_s": round(feature_s / len(table), 4)},
        "notes": notes,
    }


def _write(config, table, arms, splits, metrics) -> dict[str, str]:
    out = Path(config.out)
    full = _full_arms(arms)
    folds = np.full(len(table), -1)
    for split in splits:
        folds[split.test] = split.fold
    probabilities = {name: arm.probabilities[0] for name, arm in full.items()}
    paths = {
        "predictions": write_csv(predictions_frame(table, probabilities, folds), out / "predictions.csv"),
        "metrics": write_json(metrics, out / "metrics.json"),
    }
    import pandas as pd

    paths["curve_table"] = write_csv(pd.DataFrame(metrics["label_efficiency"]), out / "curve.csv")
    paths["curve"] = curve_png(metrics["label_efficiency"], out)
    if len(table.class_names) == 2:
        merged = {ENCODER: metrics["heads"]["probe"], **metrics["controls"]}
        if FINETUNE in metrics["heads"]:
            merged[FINETUNE] = metrics["heads"][FINETUNE]
        paths.update(roc_pr_pngs(table.y, probabilities, merged, out))
    config.save(out / "config.json")
    paths["config"] = str(out / "config.json")
    return paths
