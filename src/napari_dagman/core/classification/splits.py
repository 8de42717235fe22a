"""Train/test splits that never separate a patient's rows, and k-shot draws of exactly k rows per class.

Without a split column the rows are cross-validated in patient-level folds (scikit-learn's
`StratifiedGroupKFold`: every fold keeps the class balance as far as whole patients allow); with one, its
``train``/``test`` rows are the one split. A k-shot draw takes k training rows of each class, from distinct
patients where the pool allows, so one patient's five lesions do not make a "5-shot" draw of one case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_dagman.core.errors import DagmanInputError

#: the smallest pool the probe's regularisation is chosen in (inner folds); below it a fixed C is used
MIN_INNER_FOLDS = 2


@dataclass(frozen=True)
class Split:
    """Row indices of one outer fold."""

    fold: int
    train: np.ndarray
    test: np.ndarray


def patient_folds(y: np.ndarray, patients: np.ndarray, folds: int, seed: int) -> list[Split]:
    """``folds`` patient-level stratified folds; fewer when a class has fewer patients (said by the caller)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y, int)
    patients = np.asarray(patients).astype(str)
    smallest = min(len(np.unique(patients[y == c])) for c in np.unique(y))
    folds = min(folds, smallest)
    if folds < 2:
        raise DagmanInputError(
            "cross-validation needs at least two patients of every class; give a split column instead"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [
        Split(k, np.sort(train), np.sort(test))
        for k, (train, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups=patients))
    ]


def table_split(split: np.ndarray) -> list[Split]:
    """The one train/test split a table's ``split`` column gives (values ``train`` and ``test``)."""
    split = np.asarray(split).astype(str)
    return [Split(0, np.flatnonzero(split == "train"), np.flatnonzero(split == "test"))]


def check_patient_sides(splits: list[Split], patients: np.ndarray) -> None:
    """Refuse a split that puts one patient's rows on both sides (what a leak looks like)."""
    patients = np.asarray(patients).astype(str)
    for split in splits:
        both = sorted(set(patients[split.train]) & set(patients[split.test]))
        if both:
            raise DagmanInputError(
                f"patient {both[0]} is in both the training and the test rows"
                + (f" (and {len(both) - 1} more)" if len(both) > 1 else "")
            )


def k_shot(train: np.ndarray, y: np.ndarray, patients: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``k`` rows of each class from ``train`` (rows of distinct patients first); `ValueError` when a
    class has fewer than ``k`` rows there."""
    y = np.asarray(y, int)
    patients = np.asarray(patients).astype(str)
    chosen: list[int] = []
    for c in np.unique(y[train]):
        rows = train[y[train] == c]
        if len(rows) < k:
            raise ValueError(f"class {c} has {len(rows)} training rows, fewer than {k}")
        order = rng.permutation(rows)
        # one row per patient first, in random order, then the rest: k rows from as many patients as possible
        seen: set[str] = set()
        first = [r for r in order if not (patients[r] in seen or seen.add(patients[r]))]
        rest = [r for r in order if r not in set(first)]
        chosen += (first + rest)[:k]
    return np.sort(np.asarray(chosen, int))


def smallest_class(train: np.ndarray, y: np.ndarray, classes: int) -> int:
    """Rows of the rarest class among ``train``: the largest k a draw can take."""
    return int(np.bincount(np.asarray(y, int)[train], minlength=classes).min())
