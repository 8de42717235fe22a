"""2D projections of patch features, as a registry: name -> function + description (+ the settings it reads).

Adding a projection = one function and one `PROJECTIONS` entry; the CLI choices, the dock and the projection
cache key follow from the registry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from napari_dagman.core.embeddings.scaling import pca_reduced, spoken_list, standardise
from napari_dagman.core.errors import DagmanInputError


@dataclass(frozen=True)
class ProjectionOptions:
    """Everything a projection may read; each one uses the fields it needs."""

    seed: int = 0
    fast: bool = False
    n_neighbors: int = 15
    min_dist: float = 0.1
    perplexity: float = 30.0


@dataclass(frozen=True)
class Projection:
    """A registered projection: ``run(x, options)`` maps standardised features (N >= 3, C) to (N, 2)."""

    run: Callable[[np.ndarray, ProjectionOptions], np.ndarray]
    description: str
    #: `EmbedConfig` fields (besides seed and fast) that change the result: part of the cache key.
    settings: tuple[str, ...] = ()


def _umap(x: np.ndarray, options: ProjectionOptions) -> np.ndarray:
    import umap

    with warnings.catch_warnings():
        # umap warns that a fixed random_state disables parallelism: that is the point of not being fast
        warnings.filterwarnings("ignore", message=".*n_jobs.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=max(2, min(options.n_neighbors, x.shape[0] - 1)),
            min_dist=options.min_dist,
            random_state=None if options.fast else options.seed,
            n_jobs=-1 if options.fast else 1,
        )
        return reducer.fit_transform(pca_reduced(x, 50, options.seed))


def _pca(x: np.ndarray, options: ProjectionOptions) -> np.ndarray:
    from sklearn.decomposition import PCA

    out = PCA(n_components=min(2, x.shape[1]), random_state=options.seed).fit_transform(x)
    if out.shape[1] < 2:  # a single feature: a flat second axis
        out = np.concatenate([out, np.zeros((x.shape[0], 1))], axis=1)
    return out


def _tsne(x: np.ndarray, options: ProjectionOptions) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(options.perplexity, (x.shape[0] - 1) / 3.0)  # sklearn refuses more than the points allow
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=options.seed).fit_transform(
        pca_reduced(x, 50, options.seed)
    )


#: The projections, in the order the CLI and the dock offer them.
PROJECTIONS: dict[str, Projection] = {
    "umap": Projection(
        _umap,
        "UMAP (umap-learn): keeps neighbourhoods; seeded and single-threaded unless fast",
        ("n_neighbors", "min_dist"),
    ),
    "pca": Projection(_pca, "PCA: the two directions of largest variance (linear, instant)"),
    "tsne": Projection(
        _tsne,
        "t-SNE (scikit-learn): keeps close neighbours, distorts distances between groups",
        ("perplexity",),
    ),
}


def project(
    features: np.ndarray,
    method: str = "umap",
    *,
    seed: int = 0,
    fast: bool = False,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    perplexity: float = 30.0,
) -> np.ndarray:
    """2D projection (N, 2) float32 of standardised features with a registered projection (UMAP, PCA, t-SNE).

    UMAP is seeded (single-threaded, reproducible) unless ``fast``: then it runs on all cores and two runs
    differ. Wide features are reduced to 50 principal components first.
    """
    x = standardise(features)
    n = x.shape[0]
    if n < 3:
        raise DagmanInputError(f"a projection needs at least 3 patches, got {n}")
    projection = PROJECTIONS.get(method)
    if projection is None:
        raise DagmanInputError(f"unknown projection '{method}'; use {spoken_list(list(PROJECTIONS))}")
    options = ProjectionOptions(seed, fast, n_neighbors, min_dist, perplexity)
    return np.asarray(projection.run(x, options), np.float32)
