"""The linear probe: class-balanced logistic regression on frozen, standardised features.

Its inverse regularisation C is the one choice the papers leave open (DAGMaN and CASS report probes without their
C). It is picked per training set by inner patient-level cross-validation over `C_GRID` (AUC for two classes,
balanced accuracy otherwise), never on the test rows. A training set too small for inner folds (1-shot: one row
per class) gets `FIXED_C` and the result says so; ``c`` given as a number always uses that number.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from napari_dagman.core.classification.splits import MIN_INNER_FOLDS

#: C tried by the inner cross-validation (stronger regularisation first: few rows, many features)
C_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: C of a training set too small to choose it (scikit-learn's default)
FIXED_C = 1.0
#: inner folds at most
INNER_FOLDS = 3


@dataclass
class ProbeFit:
    """Test-row class probabilities of one fit and how its C was chosen."""

    probabilities: np.ndarray
    c: float
    chosen_by: str  # "inner-cv", "fixed" (too few rows) or "given"


def _pipeline(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    )


def _inner_folds(y: np.ndarray, patients: np.ndarray) -> int:
    """Inner folds the training rows allow: each class must have a patient in every fold."""
    smallest = min(len(np.unique(patients[y == c])) for c in np.unique(y))
    return min(INNER_FOLDS, smallest)


def fit_probe(
    features: np.ndarray,
    y: np.ndarray,
    patients: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    classes: int,
    c: float | None = None,
    seed: int = 0,
) -> ProbeFit:
    """Fit on ``train`` rows, return the probabilities (len(test), classes) of ``test`` rows."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold

    y = np.asarray(y, int)
    patients = np.asarray(patients).astype(str)
    x_train, y_train, groups = features[train], y[train], patients[train]
    folds = _inner_folds(y_train, groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if c is not None:
            model, chosen, how = _pipeline(c).fit(x_train, y_train), float(c), "given"
        elif folds < MIN_INNER_FOLDS:
            model, chosen, how = _pipeline(FIXED_C).fit(x_train, y_train), FIXED_C, "fixed"
        else:
            search = GridSearchCV(
                _pipeline(FIXED_C),
                {"logisticregression__C": list(C_GRID)},
                scoring="roc_auc" if classes == 2 else "balanced_accuracy",
                cv=StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed),
                error_score=np.nan,
            )
            search.fit(x_train, y_train, groups=groups)
            model = search.best_estimator_
            chosen, how = float(search.best_params_["logisticregression__C"]), "inner-cv"
    probabilities = np.zeros((len(test), classes))
    probabilities[:, model.classes_] = model.predict_proba(features[test])
    return ProbeFit(probabilities, chosen, how)
