"""Organ clusters: what a pretrained encoder says about a CT, patch by patch.

The steps are plain functions; `run_embedding` (``job``) composes them for the CLI and the napari dock.

1. `embed_volume` (``features``): the CT on the run's grid and HU window goes through the encoder in
   overlapping windows, and the chosen stage's feature map is averaged over each patch (``patches``: a
   ``patch``-voxel cube every ``stride`` voxels, or organ-centred patches so that small organs are
   represented), or kept per token. With a label map every patch gets its majority label (its "organ") and the
   fraction of its voxels carrying it (its "purity"). Controls are computed on exactly the same patches: an
   untrained encoder of the same architecture, the histogram of the encoder's input intensities, and the
   patch-centre coordinates.
2. `project` (``projection``): a registry of 2D projections, UMAP (seeded; ``fast`` runs it in parallel
   without a fixed state), PCA and t-SNE.
3. `cluster_features` (``clustering``): a registry of clusterers, k-means and HDBSCAN (or none).
4. `quality_metrics` (``metrics``): k-means NMI/ARI against the organs, silhouette of the organs, and k-NN
   accuracy cross-validated over axial slabs.

Embeddings and projections are cached on disk (``cache``) under a key made of the image hash, the checkpoint
hash and every setting that changes them, so reopening a result is instant; ``results`` builds the patch table
and writes the files. Everything here is Qt-free.
"""

from __future__ import annotations

from napari_dagman.core.embeddings.cache import (
    CACHE_VERSION,
    FEATURE_SETTINGS,
    EmbeddingCache,
    default_cache_dir,
    embedding_key,
    projection_key,
)
from napari_dagman.core.embeddings.clustering import CLUSTERINGS, Clusterer, cluster_features
from napari_dagman.core.embeddings.features import (
    embed_volume,
    load_encoder,
    random_init_encoder,
    stage_feature_map,
)
from napari_dagman.core.embeddings.job import analyse, run_embedding
from napari_dagman.core.embeddings.metrics import (
    METRIC_EXPLANATIONS,
    Quality,
    embedding_quality,
    metric_rows,
    metrics_reading,
    metrics_summary,
    quality_metrics,
    slab_splits,
)
from napari_dagman.core.embeddings.patches import (
    SAMPLING_NAMES,
    PatchEmbeddings,
    axis_sizes,
    box_counts,
    grid_starts,
    organ_centred_starts,
    patch_organs,
    pool_patches,
    selection_mask,
)
from napari_dagman.core.embeddings.projection import PROJECTIONS, Projection, project
from napari_dagman.core.embeddings.results import (
    EmbeddingResult,
    build_table,
    colour_groups,
    require_parquet,
    write_results,
    write_table,
)
from napari_dagman.core.embeddings.scaling import standardise

__all__ = [
    "CACHE_VERSION",
    "CLUSTERINGS",
    "FEATURE_SETTINGS",
    "PROJECTIONS",
    "SAMPLING_NAMES",
    "Clusterer",
    "EmbeddingCache",
    "EmbeddingResult",
    "PatchEmbeddings",
    "Projection",
    "Quality",
    "analyse",
    "axis_sizes",
    "box_counts",
    "build_table",
    "cluster_features",
    "colour_groups",
    "default_cache_dir",
    "embed_volume",
    "embedding_key",
    "grid_starts",
    "load_encoder",
    "metrics_summary",
    "metric_rows",
    "metrics_reading",
    "METRIC_EXPLANATIONS",
    "organ_centred_starts",
    "patch_organs",
    "pool_patches",
    "project",
    "projection_key",
    "embedding_quality",
    "quality_metrics",
    "random_init_encoder",
    "require_parquet",
    "run_embedding",
    "selection_mask",
    "slab_splits",
    "stage_feature_map",
    "standardise",
    "write_results",
    "write_table",
]
