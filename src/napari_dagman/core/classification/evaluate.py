"""Out-of-fold probabilities of every feature set at every number of shots, and the figures measured on them.

For each number of shots k and each draw, every outer fold trains the probe on exactly k rows per class of its
training rows (``all``: all of them, one draw) and predicts its test rows; the draw's figure (AUC, or balanced
accuracy beyond two classes) is measured on the pooled out-of-fold predictions. The feature sets share the
folds and the draws, so their curves differ by the features alone.

A point of the curve reports the mean over draws, their spread, and a 95 % interval that holds both sources of
variation: each draw is bootstrapped over patients and the resamples of all draws are pooled. A difference
between two feature sets is bootstrapped *paired* (the same resamples of the same draws), which is what "this
encoder beats the control" needs.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np

from napari_dagman.core.classification.metrics import headline, interval, patient_resamples
from napari_dagman.core.classification.probe import fit_probe
from napari_dagman.core.classification.splits import Split, k_shot, smallest_class
from napari_dagman.core.events import CancelToken, LogEvent, ProgressEvent, check_cancelled


@dataclass
class Arm:
    """One feature set at one number of shots: out-of-fold probabilities per draw."""

    features: str
    shots: int | str
    probabilities: list[np.ndarray] = field(default_factory=list)  # per draw, (n, classes); NaN rows untested
    c_chosen: list[str] = field(default_factory=list)


def usable_shots(shots: list[int | str], splits: list[Split], y: np.ndarray, classes: int) -> tuple[list, list[str]]:
    """The shots every fold's training rows can give, and a note for those left out."""
    largest = min(smallest_class(s.train, y, classes) for s in splits)
    kept = [k for k in shots if k == "all" or k <= largest]
    dropped = [str(k) for k in shots if k not in kept]
    notes = (
        [f"{', '.join(dropped)} shots left out: the rarest class has {largest} training rows in a fold"]
        if dropped
        else []
    )
    return kept, notes


def training_rows(
    split: Split, shots: int | str, draw: int, y: np.ndarray, patients: np.ndarray, seed: int
) -> np.ndarray:
    """The rows a head trains on in one fold of one draw: all the fold's training rows, or k per class drawn
    from (seed, k, draw, fold) alone, so the probe, the controls and fine-tuning see the same rows."""
    if shots == "all":
        return split.train
    rng = np.random.default_rng([seed, int(shots), draw, split.fold])
    return k_shot(split.train, y, patients, int(shots), rng)


def run_arms(
    features: dict[str, np.ndarray],
    y: np.ndarray,
    patients: np.ndarray,
    splits: list[Split],
    shots: list[int | str],
    *,
    classes: int,
    draws: int,
    c: float | None,
    seed: int,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent | LogEvent, None, list[Arm]]:
    """Every (feature set, shots) arm; the draws depend on (seed, k, draw, fold) only, so all sets share them."""
    arms = [Arm(name, k) for k in shots for name in features]
    total = sum((1 if a.shots == "all" else draws) * len(splits) for a in arms)
    done = 0
    for arm in arms:
        for draw in range(1 if arm.shots == "all" else draws):
            probabilities = np.full((len(y), classes), np.nan)
            for split in splits:
                check_cancelled(cancel, "the classification")
                train = training_rows(split, arm.shots, draw, y, patients, seed)
                fit = fit_probe(
                    features[arm.features], y, patients, train, split.test, classes=classes, c=c, seed=seed
                )
                probabilities[split.test] = fit.probabilities
                arm.c_chosen.append(f"{fit.c:g} ({fit.chosen_by})")
                done += 1
                yield ProgressEvent(done, total, "probes")
            arm.probabilities.append(probabilities)
    return arms


def _draw_resamples(
    arm: Arm, y: np.ndarray, patients: np.ndarray, classes: int, bootstrap: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-draw figures and the pooled bootstrap figures (``bootstrap`` in all, spread over the draws)."""
    per_draw, pooled = [], []
    each = max(20, bootstrap // len(arm.probabilities))
    for d, probabilities in enumerate(arm.probabilities):
        tested = np.isfinite(probabilities).all(axis=1)
        measure = headline(y[tested], probabilities[tested], classes)
        per_draw.append(float(measure(None)[0]))
        pooled.append(measure(patient_resamples(patients[tested], each, seed + 1000 * d)))
    return np.asarray(per_draw), np.concatenate(pooled)


def curve_rows(
    arms: list[Arm], y: np.ndarray, patients: np.ndarray, classes: int, bootstrap: int, seed: int
) -> list[dict]:
    """One row per arm: features, shots, the figure's mean, spread and 95 % interval over draws and patients."""
    rows = []
    for arm in arms:
        per_draw, pooled = _draw_resamples(arm, y, patients, classes, bootstrap, seed)
        ci = interval(pooled)
        rows.append(
            {
                "features": arm.features,
                "shots": arm.shots,
                "metric": "auc" if classes == 2 else "balanced_accuracy",
                "mean": float(np.nanmean(per_draw)),
                "std": float(np.nanstd(per_draw)),
                "min": float(np.nanmin(per_draw)),
                "max": float(np.nanmax(per_draw)),
                "ci95_low": None if ci is None else ci[0],
                "ci95_high": None if ci is None else ci[1],
                "draws": len(per_draw),
            }
        )
    return rows


def differences(
    arms: list[Arm], reference: str, y: np.ndarray, patients: np.ndarray, classes: int, bootstrap: int, seed: int
) -> list[dict]:
    """Paired differences of ``reference`` minus each other feature set, per shots: mean and 95 % interval, and
    whether the interval excludes 0."""
    by_key = {(a.features, a.shots): a for a in arms}
    rows = []
    for (name, shots), other in by_key.items():
        mine = by_key.get((reference, shots))
        if name == reference or mine is None:
            continue
        deltas, pooled = [], []
        common = min(len(mine.probabilities), len(other.probabilities))  # draw d has the same rows in both
        each = max(20, bootstrap // common)
        pairs = zip(mine.probabilities[:common], other.probabilities[:common], strict=True)
        for d, (pa, pb) in enumerate(pairs):
            tested = np.isfinite(pa).all(axis=1)
            weights = patient_resamples(patients[tested], each, seed + 1000 * d)
            fa, fb = headline(y[tested], pa[tested], classes), headline(y[tested], pb[tested], classes)
            deltas.append(float(fa(None)[0] - fb(None)[0]))
            pooled.append(fa(weights) - fb(weights))
        ci = interval(np.concatenate(pooled))
        rows.append(
            {
                "shots": shots,
                "minus": name,
                "difference": float(np.nanmean(deltas)),
                "ci95": ci,
                "exceeds_interval": bool(ci is not None and (ci[0] > 0 or ci[1] < 0)),
            }
        )
    return rows
