"""How well patch features separate the organs: k-means NMI/ARI, silhouette and k-NN accuracy cross-validated
over axial slabs (a slab is tested against training patches kept at least a gap away, so overlapping
neighbour patches never leak into the score)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_dagman.core.embeddings.clustering import kmeans_labels
from napari_dagman.core.embeddings.scaling import standardise


@dataclass
class Quality:
    """Cluster quality against the organs: the figures, and per patch its role in the evaluation."""

    metrics: dict[str, Any]
    evaluated: np.ndarray  # (N,) bool: patch is in the evaluated set (organ, purity, enough patches)
    slab: np.ndarray  # (N,) int: k-NN test slab of the patch, -1 when not evaluated
    prediction: np.ndarray  # (N,) int: k-NN predicted organ id, -1 when not scored


def slab_splits(
    z: np.ndarray, slabs: int, gap: float
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Blocked cross-validation along z: the slab of each centre and, per slab, its (test, train) masks.

    Slabs are equal-thickness axial bands over the centres' range; a slab is tested against the centres
    lying more than ``gap`` mm outside it, so with ``gap`` >= the patch side no training patch shares a
    voxel with a test patch.
    """
    z = np.asarray(z, float)
    edges = np.linspace(float(z.min()), float(z.max()) + 1e-6, slabs + 1)
    fold = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, slabs - 1)
    splits = [(fold == f, (z < edges[f] - gap) | (z >= edges[f + 1] + gap)) for f in range(slabs)]
    return fold, splits


def held_out_split(
    z: np.ndarray, low: float, high: float, gap: float
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """One split instead of the cross-validation: test = centres inside [low, high] mm, train = centres more than
    ``gap`` mm outside it (the slab a pretraining run never saw; see `slab_splits` for the fold array)."""
    z = np.asarray(z, float)
    lo, hi = min(low, high), max(low, high)
    test = (z >= lo) & (z <= hi)
    train = (z < lo - gap) | (z > hi + gap)
    return np.where(test, 0, 1), [(test, train)]


SIDES = frozenset({"left", "right"})


def side_free_name(name: str) -> str:
    """An organ's name without its side (``kidney_left`` -> ``kidney``, ``rib_left_7`` -> ``rib_7``)."""
    parts = [p for p in str(name).split("_") if p.lower() not in SIDES]
    return "_".join(parts) if parts else str(name)


def merge_side_pairs(organ_id: np.ndarray, organ_names: dict[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    """Organ ids with left and right of a pair mapped to one id (the smaller), and the merged names."""
    by_name: dict[str, int] = {}
    mapping: dict[int, int] = {}
    for i in sorted(organ_names):
        merged = side_free_name(organ_names[i])
        mapping[i] = by_name.setdefault(merged, i)
    lut = np.arange(max([int(organ_id.max(initial=0)), *organ_names]) + 1)
    for i, j in mapping.items():
        lut[i] = j
    names = {j: side_free_name(organ_names[j]) for j in set(mapping.values())}
    return lut[organ_id], names


def evaluated_patches(
    organ_id: np.ndarray, purity: np.ndarray, min_purity: float, min_patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the patches evaluated, the organs kept): a majority organ (not background) covering at least
    ``min_purity`` of the patch, of an organ with at least ``min_patches`` such patches."""
    keep = (organ_id > 0) & (purity >= min_purity)
    ids, counts = np.unique(organ_id[keep], return_counts=True)
    kept_ids = ids[counts >= min_patches]
    return keep & np.isin(organ_id, kept_ids), kept_ids


def embedding_quality(emb: Any, **options: Any) -> Quality:
    """`quality_metrics` of an `Embedding` (its features, organs, purity, axial centres and patch size); ``options``
    are `quality_metrics`'s keywords. The job, the clusters benchmark and the pretraining protocol score this way."""
    return quality_metrics(
        emb.features,
        emb.organ_id,
        emb.purity,
        emb.centres_mm()[:, 0],
        patch_mm=float(emb.patch_mm[0]),
        organ_names=emb.organ_names,
        **options,
    )


def quality_metrics(
    features: np.ndarray,
    organ_id: np.ndarray,
    purity: np.ndarray,
    centres_z: np.ndarray,
    *,
    patch_mm: float,
    organ_names: dict[int, str] | None = None,
    min_purity: float = 0.5,
    min_patches: int = 5,
    knn: int = 5,
    slabs: int = 5,
    gap_mm: float | None = None,
    distance: str = "cosine",
    seed: int = 0,
    merge_sides: bool = False,
    test_slab_mm: tuple[float, float] | None = None,
) -> Quality:
    """NMI, ARI, silhouette and slab-cross-validated k-NN accuracy of features against organ labels.

    Evaluated patches: majority organ (not background) covering at least ``min_purity`` of the patch, organs
    with at least ``min_patches`` such patches. Features are standardised over all patches (no label used).

    * NMI / ARI: k-means with as many clusters as organs (seeded) against the organs.
    * silhouette: of the organ labels in feature space (``distance``).
    * k-NN and linear probe: the z range is cut into ``slabs`` equal axial slabs; each slab is tested with a
      classifier trained on the patches whose centres lie at least ``gap_mm`` (default: the patch side, so no
      voxel is shared) outside it. Only test patches whose organ occurs among their training patches are scored:
      a patch of an organ the classifier never saw cannot be right whatever the features, and counting it as an
      error (as this function did before) drowned every encoder's score in the same constant errors. How many were
      left out is reported (``knn_unseen_organ``). Reported with the balanced accuracy and the majority-class
      baseline of the same folds.

    ``merge_sides`` counts left and right of a paired organ as one organ (names without their side).
    ``test_slab_mm`` (low, high z in mm) replaces the cross-validation by one held-out slab (`held_out_split`):
    the classifiers train on the patches more than ``gap_mm`` outside it and are scored on the patches in it.
    """
    n = len(organ_id)
    if merge_sides and organ_names:
        organ_id, organ_names = merge_side_pairs(np.asarray(organ_id), dict(organ_names))
    names = {0: "background", **(organ_names or {})}
    keep, kept_ids = evaluated_patches(organ_id, purity, min_purity, min_patches)
    slab = np.full(n, -1, np.int64)
    prediction = np.full(n, -1, np.int64)
    gap = float(patch_mm if gap_mm is None else gap_mm)
    settings = {
        "min_purity": min_purity,
        "min_patches": min_patches,
        "knn": knn,
        "slabs": slabs,
        "gap_mm": gap,
        "distance": distance,
        "seed": seed,
        "merge_sides": bool(merge_sides),
        "test_slab_mm": None if test_slab_mm is None else [float(v) for v in test_slab_mm],
    }
    metrics: dict[str, Any] = {
        "evaluated_patches": int(keep.sum()),
        "organs": {names.get(int(i), str(i)): int((organ_id[keep] == i).sum()) for i in kept_ids},
        "settings": settings,
    }
    if len(kept_ids) < 2:
        unscored = n - int(keep.sum())
        metrics["note"] = (
            f"fewer than 2 organs with >= {min_patches} patches of purity >= {min_purity}: {unscored} of {n} "
            f"patches of {patch_mm:g} mm are background, mixed or of a rare organ; no metrics (choose smaller "
            f"patches, e.g. {patch_mm / 2:g} mm, a lower minimum purity, or organ sampling: patches centred in "
            "each organ)"
        )
        return Quality(metrics, keep, slab, prediction)

    x = standardise(features)[keep]
    y = organ_id[keep]
    metrics.update(clustering_figures(x, y, len(kept_ids), distance=distance, seed=seed))

    z = np.asarray(centres_z, float)[keep]
    if test_slab_mm is None:
        fold, splits = slab_splits(z, slabs, gap)
    else:
        fold, splits = held_out_split(z, test_slab_mm[0], test_slab_mm[1], gap)
    pred, linear, baseline, unseen = score_splits(x, y, splits, knn=knn, distance=distance, seed=seed)
    scored = pred >= 0
    index = np.flatnonzero(keep)
    slab[index] = fold
    prediction[index] = pred
    metrics["knn_scored"] = int(scored.sum())
    metrics["knn_unseen_organ"] = unseen
    metrics["scored_organs"] = {
        names.get(int(i), str(i)): int((y[scored] == i).sum()) for i in np.unique(y[scored])
    }
    if scored.any():
        metrics.update(classification_figures(y[scored], pred[scored], linear[scored], baseline[scored]))
    else:
        metrics["note"] = (
            "no test patch could be scored (no slab had training patches of its organs outside its gap): use more "
            "slabs or a smaller gap"
        )
    return Quality(metrics, keep, slab, prediction)


def clustering_figures(x: np.ndarray, y: np.ndarray, organs: int, *, distance: str, seed: int) -> dict[str, float]:
    """NMI and ARI of a seeded k-means with one cluster per organ, and the silhouette of the organ labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    clusters = kmeans_labels(x, organs, seed)
    out = {"nmi": float(normalized_mutual_info_score(y, clusters)), "ari": float(adjusted_rand_score(y, clusters))}
    if len(y) > organs:  # silhouette needs at least one organ with two patches
        out["silhouette"] = float(silhouette_score(x, y, metric=distance))
    return out


def score_splits(
    x: np.ndarray,
    y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    *,
    knn: int,
    distance: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """k-NN and linear-probe predictions of each split's test patches from its training patches, the majority
    baseline, and how many test patches were left out because their organ is not among their training patches
    (-1 where not scored)."""
    from sklearn.neighbors import KNeighborsClassifier

    pred = np.full(len(y), -1, np.int64)
    linear = np.full(len(y), -1, np.int64)
    baseline = np.full(len(y), -1, np.int64)
    unseen = 0
    for test_fold, train in splits:
        if not test_fold.any() or not train.any():
            continue
        seen = np.isin(y, y[train])  # scorable: the test patches whose organ the classifier saw in training
        unseen += int((test_fold & ~seen).sum())
        test = test_fold & seen
        if not test.any():
            continue
        model = KNeighborsClassifier(
            n_neighbors=min(knn, int(train.sum())), metric=distance, algorithm="brute"
        )
        model.fit(x[train], y[train])
        pred[test] = model.predict(x[test])
        linear[test] = linear_probe(x[train], y[train], x[test], seed)
        values, freq = np.unique(y[train], return_counts=True)
        baseline[test] = values[np.argmax(freq)]
    return pred, linear, baseline, unseen


def classification_figures(
    y: np.ndarray, knn: np.ndarray, linear: np.ndarray, baseline: np.ndarray
) -> dict[str, float]:
    """Accuracy and balanced accuracy of the k-NN and the linear probe, and the majority baseline's accuracy."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    out = {
        "knn_accuracy": float(np.mean(knn == y)),
        "knn_majority_baseline": float(np.mean(baseline == y)),
        "linear_accuracy": float(np.mean(linear == y)),
    }
    with warnings.catch_warnings():  # predicting an organ a slab does not hold is an error, not a warning
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out["knn_balanced_accuracy"] = float(balanced_accuracy_score(y, knn))
        out["linear_balanced_accuracy"] = float(balanced_accuracy_score(y, linear))
    return out


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    """Organ predicted by a logistic regression on frozen features (the linear probe of SSL evaluations)."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_train)) < 2:  # one organ in training: that organ is the only answer
        return np.full(len(x_test), y_train[0], np.int64)
    model = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    return model.fit(x_train, y_train).predict(x_test).astype(np.int64)


def metrics_summary(metrics: dict[str, Any]) -> str:
    """The figures of `quality_metrics` in a few readable lines (CLI output, dock label)."""
    lines = [f"evaluated: {metrics['evaluated_patches']} patches of {len(metrics['organs'])} organs"]
    if "note" in metrics:
        lines.append(f"note: {metrics['note']}")
    if "missing_note" in metrics:
        lines.append(f"missing organs: {metrics['missing_note']}")
    figures = [
        (name, metrics[key])
        for name, key in (("NMI", "nmi"), ("ARI", "ari"), ("silhouette", "silhouette"))
        if key in metrics
    ]
    if figures:
        lines.append("k-means vs organs: " + "  ".join(f"{n} {v:.3f}" for n, v in figures))
    if "knn_accuracy" in metrics:
        s = metrics["settings"]
        lines.append(
            f"k-NN ({s['knn']}, {s['distance']}; {s['slabs']} axial slabs, gap {s['gap_mm']:g} mm): "
            f"accuracy {metrics['knn_accuracy']:.3f}, balanced {metrics['knn_balanced_accuracy']:.3f}, "
            f"majority baseline {metrics['knn_majority_baseline']:.3f} "
            f"({metrics['knn_scored']} scored; {metrics['knn_unseen_organ']} of an organ absent from their training "
            "slabs left out)"
        )
    if "linear_accuracy" in metrics:
        lines.append(
            f"linear probe (logistic regression, same slabs): accuracy {metrics['linear_accuracy']:.3f}, "
            f"balanced {metrics['linear_balanced_accuracy']:.3f}"
        )
    return "\n".join(lines)


#: What each figure of `quality_metrics` means, for a reader who is not a machine-learning specialist.
METRIC_EXPLANATIONS: dict[str, str] = {
    "evaluated_patches": "patches scored: mostly one organ (purity at least the threshold), of organs with "
    "enough such patches",
    "nmi": "normalised mutual information between k-means clusters and the organs: 0 = the clusters say nothing "
    "about the organ, 1 = each cluster is one organ",
    "ari": "adjusted Rand index of the k-means clusters against the organs: 0 = no better than chance, "
    "1 = the same grouping",
    "silhouette": "how well the organs separate in feature space: near 1 = each organ a tight group apart from "
    "the others, 0 = overlapping, below 0 = mixed",
    "knn_accuracy": "share of held-out patches whose nearest patches (from other axial slabs) vote for their "
    "own organ",
    "knn_balanced_accuracy": "the same, averaged per organ so that large organs do not dominate",
    "knn_majority_baseline": "what always answering the most common organ would score: the bar to beat",
    "knn_scored": "held-out patches the k-NN vote scored",
    "knn_unseen_organ": "held-out patches of an organ absent from their training slabs: left out of the k-NN and "
    "linear-probe scores (no classifier can name an organ it never saw)",
    "linear_accuracy": "share of held-out patches a logistic regression on the frozen features (trained on the "
    "other slabs) puts in their own organ: the linear probe of self-supervised evaluations",
    "linear_balanced_accuracy": "the linear probe's accuracy averaged per organ",
}
_METRIC_TITLES = {
    "evaluated_patches": "patches scored",
    "nmi": "NMI (clusters vs organs)",
    "ari": "ARI (clusters vs organs)",
    "silhouette": "silhouette (organs)",
    "knn_accuracy": "k-NN accuracy",
    "knn_balanced_accuracy": "k-NN balanced accuracy",
    "knn_majority_baseline": "majority baseline",
    "knn_scored": "k-NN patches scored",
    "knn_unseen_organ": "left out: organ absent from training",
    "linear_accuracy": "linear probe accuracy",
    "linear_balanced_accuracy": "linear probe balanced accuracy",
}


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(title, value, explanation) of each figure present, in reading order (the dock's details, tooltips)."""
    rows = []
    for key, title in _METRIC_TITLES.items():
        if key not in metrics:
            continue
        value = metrics[key]
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        rows.append((title, text, METRIC_EXPLANATIONS[key]))
    return rows


def metrics_reading(metrics: dict[str, Any]) -> str:
    """One plain sentence on how well the organs separate, from the balanced k-NN accuracy against chance
    (else the clusters' NMI); the figures themselves are in `metric_rows`."""
    reading = _reading(metrics)
    return f"{reading} {metrics['missing_note'][0].upper()}{metrics['missing_note'][1:]}." if "missing_note" in metrics else reading


def _reading(metrics: dict[str, Any]) -> str:
    organs = metrics.get("organs", {})
    if "note" in metrics and "nmi" not in metrics:
        # what to change is in the note (smaller patches, lower purity, organ sampling): say it, not only "no"
        return f"Not enough organ patches to score: {metrics['note']}."
    if "knn_balanced_accuracy" in metrics:
        score, chance = metrics["knn_balanced_accuracy"], 1.0 / max(1, len(organs))
        lift = (score - chance) / (1.0 - chance) if chance < 1 else 0.0
        how = (
            "well" if lift >= 0.6 else "moderately" if lift >= 0.3 else "weakly" if lift >= 0.1 else "hardly"
        )
        return (
            f"Organs separate {how}: {score:.0%} of held-out patches are placed with their own organ "
            f"(average over {len(organs)} organs; chance {chance:.0%})."
        )
    nmi = metrics.get("nmi", 0.0)
    how = "closely" if nmi >= 0.6 else "partly" if nmi >= 0.3 else "hardly"
    return f"The clusters follow the organs {how} (NMI {nmi:.2f} over {len(organs)} organs)."
