"""Clusterers of patch features, as a registry: name -> function + description ("none" computes nothing).

Adding a clusterer = one function and one `CLUSTERINGS` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from napari_dagman.core.embeddings.scaling import pca_reduced, spoken_list, standardise
from napari_dagman.core.errors import DagmanInputError


@dataclass(frozen=True)
class ClusterOptions:
    """Everything a clusterer may read; each one uses the fields it needs."""

    k: int = 8
    seed: int = 0
    min_cluster_size: int = 10


@dataclass(frozen=True)
class Clusterer:
    """A registered clusterer: ``run(x, options)`` gives a cluster id per row of standardised features (noise
    -1); None for the choice of no clusters."""

    run: Callable[[np.ndarray, ClusterOptions], np.ndarray] | None
    description: str


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded k-means labels, with no more clusters than distinct rows (air patches share one vector)."""
    from sklearn.cluster import KMeans

    k = max(1, min(int(k), len(np.unique(x, axis=0))))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)


def _kmeans(x: np.ndarray, options: ClusterOptions) -> np.ndarray:
    return kmeans_labels(x, options.k, options.seed)


def _hdbscan(x: np.ndarray, options: ClusterOptions) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    size = max(2, min(int(options.min_cluster_size), x.shape[0]))
    return (
        HDBSCAN(min_cluster_size=size, copy=True)
        .fit_predict(pca_reduced(x, 20, options.seed))
        .astype(np.int64)
    )


#: The clusterers, in the order the CLI and the dock offer them.
CLUSTERINGS: dict[str, Clusterer] = {
    "kmeans": Clusterer(_kmeans, "k-means (scikit-learn, seeded): k clusters, every patch in one"),
    "hdbscan": Clusterer(
        _hdbscan, "HDBSCAN (scikit-learn): clusters of any number and shape, noise apart (-1)"
    ),
    "none": Clusterer(None, "no clusters: colour by organ only"),
}


def cluster_features(
    features: np.ndarray, method: str = "kmeans", *, k: int = 8, seed: int = 0, min_cluster_size: int = 10
) -> np.ndarray:
    """Cluster id per row (HDBSCAN marks noise -1) of standardised features."""
    clusterer = CLUSTERINGS.get(method)
    if clusterer is None or clusterer.run is None:
        usable = [name for name, c in CLUSTERINGS.items() if c.run is not None]
        raise DagmanInputError(f"unknown clustering '{method}'; use {spoken_list(usable)}")
    return clusterer.run(standardise(features), ClusterOptions(k, seed, min_cluster_size))
