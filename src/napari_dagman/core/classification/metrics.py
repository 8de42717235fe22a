"""Classification metrics with case weights, and their bootstrap intervals over patients.

A cluster bootstrap resamples *patients* with replacement (lesions of one patient are not independent). A
resample is a multinomial count per patient, so each row carries a weight (its patient's count) and every metric
here is computed on weighted rows: no array is copied per resample and B resamples are one matrix. With integer
weights the figures equal scikit-learn's on the rows repeated (a test checks it).

Binary: AUC (Mann-Whitney, ties counted half) and average precision (step-wise, as scikit-learn). Any number of
classes: per-class recall, balanced accuracy (their mean) and the confusion matrix. Intervals are percentile
intervals; resamples in which a class is absent give no value for a metric that needs it and are left out (how
many is reported).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: resamples by default; the percentile interval's ends move by about 0.005 AUC between repeats at this count
DEFAULT_BOOTSTRAP = 2000


def _grouped(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """The rank group of each score (equal scores share one group, groups in increasing score) and the count."""
    unique, inverse = np.unique(scores, return_inverse=True)
    return inverse.ravel(), len(unique)


def _group_sums(weights: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """(B, count) sums of (B, n) weights per group."""
    out = np.zeros((weights.shape[0], count))
    for b in range(weights.shape[0]):
        out[b] = np.bincount(groups, weights=weights[b], minlength=count)
    return out


def weighted_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUC of scores for the positive class (y == 1), per row of ``weights`` (B, n); NaN where a class is absent."""
    y = np.asarray(y).astype(bool)
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    groups, count = _grouped(np.asarray(score, float))
    pos = _group_sums(w * y, groups, count)
    neg = _group_sums(w * ~y, groups, count)
    below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower score
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1), np.nan)


def weighted_average_precision(
    y: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Average precision (scikit-learn's step-wise sum over thresholds), per row of ``weights``; NaN without
    positives."""
    y = np.asarray(y).astype(bool)
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    groups, count = _grouped(-np.asarray(score, float))  # thresholds from the highest score down
    pos = _group_sums(w * y, groups, count)
    neg = _group_sums(w * ~y, groups, count)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        total = pos.sum(axis=1)
        return np.where(total > 0, (pos * precision).sum(axis=1) / np.where(total > 0, total, 1), np.nan)


def weighted_recalls(
    y: np.ndarray, predicted: np.ndarray, classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """(B, classes) recall of each class; NaN where a class is absent from a resample."""
    y, predicted = np.asarray(y), np.asarray(predicted)
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    out = np.full((w.shape[0], classes), np.nan)
    for c in range(classes):
        member = y == c
        total = w[:, member].sum(axis=1)
        hit = w[:, member & (predicted == c)].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, c] = np.where(total > 0, hit / np.where(total > 0, total, 1), np.nan)
    return out


def confusion(y: np.ndarray, predicted: np.ndarray, classes: int) -> list[list[int]]:
    """Confusion matrix, rows the true class and columns the predicted one."""
    matrix = np.zeros((classes, classes), int)
    np.add.at(matrix, (np.asarray(y, int), np.asarray(predicted, int)), 1)
    return matrix.tolist()


def patient_resamples(patients: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(count, n) row weights of ``count`` cluster-bootstrap resamples: each patient drawn with replacement, each
    row weighted by how often its patient was drawn."""
    _, index = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    index = index.ravel()
    groups = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng([seed, 7919])
    draws = rng.multinomial(groups, np.full(groups, 1.0 / groups), size=count) if groups else np.zeros((count, 0))
    return draws[:, index].astype(float)


def interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of the finite values; None when fewer than 20 are finite."""
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    if len(finite) < 20:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail))]


def _with_interval(name: str, point: float, resampled: np.ndarray, out: dict) -> None:
    out[name] = None if not np.isfinite(point) else float(point)
    out[f"{name}_ci95"] = interval(resampled)


def classification_metrics(
    y: np.ndarray,
    probabilities: np.ndarray,
    patients: np.ndarray,
    *,
    class_names: list[str],
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """The metrics a reviewer asks for, each with its 95 % patient-bootstrap interval.

    ``y`` holds class indices, ``probabilities`` (n, classes). Two classes: ``auc``, ``average_precision`` (the
    second class is the positive one), plus for every number of classes ``balanced_accuracy``, ``recall`` per
    class and ``confusion``. Each figure ``f`` comes with ``f_ci95`` ([low, high], or None when too few resamples
    hold every class).
    """
    y = np.asarray(y, int)
    probabilities = np.asarray(probabilities, float)
    classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    weights = patient_resamples(patients, bootstrap, seed)
    out: dict = {"rows": int(len(y)), "patients": int(len(np.unique(np.asarray(patients).astype(str))))}
    if classes == 2:
        score = probabilities[:, 1]
        _with_interval("auc", weighted_auc(y, score)[0], weighted_auc(y, score, weights), out)
        _with_interval(
            "average_precision",
            weighted_average_precision(y, score)[0],
            weighted_average_precision(y, score, weights),
            out,
        )
    recalls = weighted_recalls(y, predicted, classes)[0]
    resampled = weighted_recalls(y, predicted, classes, weights)
    _with_interval("balanced_accuracy", float(np.mean(recalls)), resampled.mean(axis=1), out)
    out["recall"] = {name: float(recalls[c]) for c, name in enumerate(class_names)}
    out["recall_ci95"] = {name: interval(resampled[:, c]) for c, name in enumerate(class_names)}
    out["confusion"] = confusion(y, predicted, classes)
    out["bootstrap"] = {"resamples": int(bootstrap), "unit": "patient", "seed": int(seed)}
    return out


def headline(y: np.ndarray, probabilities: np.ndarray, classes: int) -> Callable[[np.ndarray | None], np.ndarray]:
    """The figure a label-efficiency curve plots, as a function of resample weights: AUC for two classes,
    balanced accuracy otherwise."""
    y = np.asarray(y, int)
    probabilities = np.asarray(probabilities, float)
    if classes == 2:
        return lambda weights: weighted_auc(y, probabilities[:, 1], weights)
    predicted = probabilities.argmax(axis=1)
    return lambda weights: weighted_recalls(y, predicted, classes, weights).mean(axis=1)
