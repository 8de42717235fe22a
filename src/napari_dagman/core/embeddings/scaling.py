"""How features are prepared before projections, clusterers and metrics see them (shared, so they agree)."""

from __future__ import annotations

import numpy as np


def standardise(features: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature (constant features stay 0), so every control is scaled alike."""
    x = np.asarray(features, np.float64)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def pca_reduced(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """PCA to ``dims`` components before UMAP / t-SNE / HDBSCAN on wide features (faster, less noise)."""
    if x.shape[1] <= dims or x.shape[0] <= dims:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=dims, random_state=seed).fit_transform(x)


def spoken_list(names: list[str]) -> str:
    """``a, b or c``: the choices in an error message."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
