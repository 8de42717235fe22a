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
) -> Quality:
    """NMI, ARI, silhouette and slab-cross-validated k-NN accuracy of features against organ labels.

    Evaluated patches: majority organ (not background) covering at least ``min_purity`` of the patch, organs
    with at least ``min_patches`` such patches. Features are standardised over all patches (no label used).

    * NMI / ARI: k-means with as many clusters as organs (seeded) against the organs.
    * silhouette: of the organ labels in feature space (``distance``).
    * k-NN: the z range is cut into ``slabs`` equal axial slabs; each slab is tested with a k-NN classifier
      trained on the patches whose centres lie at least ``gap_mm`` (default: the patch side, so no voxel is
      shared) outside it. Reported with the balanced accuracy, the majority-class baseline of the same folds
      and how many test patches had no patch of their organ in training.
    """
    from sklearn.metrics import (
        adjusted_rand_score,
        balanced_accuracy_score,
        normalized_mutual_info_score,
        silhouette_score,
    )
    from sklearn.neighbors import KNeighborsClassifier

    n = len(organ_id)
    names = {0: "background", **(organ_names or {})}
    keep = (organ_id > 0) & (purity >= min_purity)
    ids, counts = np.unique(organ_id[keep], return_counts=True)
    kept_ids = ids[counts >= min_patches]
    keep &= np.isin(organ_id, kept_ids)
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
    }
    metrics: dict[str, Any] = {
        "evaluated_patches": int(keep.sum()),
        "organs": {names.get(int(i), str(i)): int((organ_id[keep] == i).sum()) for i in kept_ids},
        "settings": settings,
    }
    if len(kept_ids) < 2:
        metrics["note"] = (
            f"fewer than 2 organs with >= {min_patches} patches of purity >= {min_purity}: no metrics "
            "(use smaller patches, a smaller stride or organ sampling)"
        )
        return Quality(metrics, keep, slab, prediction)

    x = standardise(features)[keep]
    y = organ_id[keep]
    clusters = kmeans_labels(x, len(kept_ids), seed)
    metrics["nmi"] = float(normalized_mutual_info_score(y, clusters))
    metrics["ari"] = float(adjusted_rand_score(y, clusters))
    if len(y) > len(kept_ids):  # silhouette needs at least one organ with two patches
        metrics["silhouette"] = float(silhouette_score(x, y, metric=distance))

    z = np.asarray(centres_z, float)[keep]
    fold, splits = slab_splits(z, slabs, gap)
    pred = np.full(len(y), -1, np.int64)
    baseline = np.full(len(y), -1, np.int64)
    unseen = 0
    for test, train in splits:
        if not test.any() or not train.any():
            continue
        model = KNeighborsClassifier(
            n_neighbors=min(knn, int(train.sum())), metric=distance, algorithm="brute"
        )
        model.fit(x[train], y[train])
        pred[test] = model.predict(x[test])
        values, freq = np.unique(y[train], return_counts=True)
        baseline[test] = values[np.argmax(freq)]
        unseen += int((~np.isin(y[test], y[train])).sum())
    scored = pred >= 0
    index = np.flatnonzero(keep)
    slab[index] = fold
    prediction[index] = pred
    metrics["knn_scored"] = int(scored.sum())
    if scored.any():
        metrics["knn_accuracy"] = float(np.mean(pred[scored] == y[scored]))
        metrics["knn_balanced_accuracy"] = float(balanced_accuracy_score(y[scored], pred[scored]))
        metrics["knn_majority_baseline"] = float(np.mean(baseline[scored] == y[scored]))
        metrics["knn_unseen_organ"] = unseen
    else:
        metrics["note"] = "no slab had training patches outside its gap: use more slabs or a smaller gap"
    return Quality(metrics, keep, slab, prediction)


def metrics_summary(metrics: dict[str, Any]) -> str:
    """The figures of `quality_metrics` in a few readable lines (CLI output, dock label)."""
    lines = [f"evaluated: {metrics['evaluated_patches']} patches of {len(metrics['organs'])} organs"]
    if "note" in metrics:
        lines.append(f"note: {metrics['note']}")
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
            f"({metrics['knn_scored']} scored, {metrics['knn_unseen_organ']} of an organ absent from training)"
        )
    return "\n".join(lines)
