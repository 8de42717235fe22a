"""The organ-clusters job: embeddings, projection, clusters and metrics of one volume, as the CLI and the napari
dock run it (a generator of events, like every long job)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from napari_dagman.core.embeddings.cache import EmbeddingCache, projection_key
from napari_dagman.core.embeddings.clustering import CLUSTERINGS, cluster_features
from napari_dagman.core.embeddings.features import embed_volume, load_encoder
from napari_dagman.core.embeddings.metrics import embedding_quality
from napari_dagman.core.embeddings.patches import PatchEmbeddings, missing_organs_note
from napari_dagman.core.embeddings.projection import project
from napari_dagman.core.embeddings.results import EmbeddingResult, build_table
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import CancelToken, LogEvent, ProgressEvent
from napari_dagman.core.io import check_ct

if TYPE_CHECKING:
    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.config import EmbedConfig
    from napari_dagman.core.volume import Volume


def analyse(
    emb: PatchEmbeddings, config: EmbedConfig, *, cache: EmbeddingCache | None = None
) -> Generator[LogEvent, None, EmbeddingResult]:
    """Projection, clusters and (with labels) quality metrics of embeddings; yields what it is doing."""
    yield LogEvent(f"projecting {len(emb)} patches with {config.method.upper()}")
    proj_key = ""
    projection = None
    if cache is not None and emb.key:
        proj_key = projection_key(emb.key, config)
        projection = cache.load_array(proj_key)
        if projection is not None and projection.shape != (len(emb), 2):
            projection = None  # a damaged entry
    if projection is None:
        projection = project(
            emb.features,
            config.method,
            seed=config.seed,
            fast=config.fast,
            n_neighbors=config.n_neighbors,
            min_dist=config.min_dist,
            perplexity=config.perplexity,
        )
        if cache is not None and proj_key:
            cache.save_array(proj_key, projection)
            yield from cache.warnings()

    quality = None
    if emb.organ_id is not None and emb.purity is not None:
        quality = embedding_quality(
            emb,
            min_purity=config.min_purity,
            min_patches=config.min_patches,
            knn=config.knn,
            slabs=config.slabs,
            gap_mm=config.gap_mm,
            distance=config.distance,
            seed=config.seed,
            merge_sides=config.merge_sides,
            test_slab_mm=tuple(config.test_slab) if config.test_slab else None,
        )
        if "note" in quality.metrics:
            yield LogEvent(quality.metrics["note"], "warning")

    clusters = None
    clusterer = CLUSTERINGS.get(config.clustering)
    if clusterer is None or clusterer.run is not None:  # an unknown name is refused by cluster_features
        yield LogEvent(f"clustering with {config.clustering}")
        k = config.clusters or (
            len(quality.metrics["organs"]) if quality and quality.metrics["organs"] else 8
        )
        clusters = cluster_features(
            emb.features,
            config.clustering,
            k=max(k, 2),
            seed=config.seed,
            min_cluster_size=config.min_cluster_size,
        )
    table = build_table(emb, projection, config.method, clusters, quality)
    return EmbeddingResult(emb, projection, clusters, quality, table, config)


def run_embedding(
    config: EmbedConfig,
    volume: Volume,
    labels: Volume | None = None,
    *,
    pretrained: PretrainedEncoder | None = None,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent | LogEvent, None, EmbeddingResult]:
    """Embeddings, projection, clusters and metrics of one volume; raises `JobCancelled` when cancelled.

    ``pretrained`` defaults to the encoder of ``config.checkpoint``. The cache is used when ``config.cache``.
    """
    check_ct(volume, f"'{volume.metadata.get('name', 'the image')}'")
    pretrained = pretrained or load_encoder(config)
    cache = EmbeddingCache(config.cache_dir) if config.cache else None
    emb = yield from embed_volume(volume, pretrained, config, labels=labels, cache=cache, cancel=cancel)
    if len(emb) < 3:
        raise DagmanInputError(f"only {len(emb)} patch(es) fit the image: use a smaller patch or stride")
    result = yield from analyse(emb, config, cache=cache)
    if labels is not None and result.quality is not None:
        # organs a chest researcher looks for (aorta, pulmonary artery, a vertebra) vanished without a word
        missing, note = missing_organs_note(
            labels.array,
            labels.spacing,
            labels.metadata.get("label_names") or emb.organ_names or {},
            set(result.quality.metrics.get("organs", {})),
            float(emb.patch_mm[0]),
            config.min_purity,
            merge_sides=config.merge_sides,
        )
        if note:
            result.quality.metrics["missing_organs"] = missing
            result.quality.metrics["missing_note"] = note
            yield LogEvent(note, "warning")
    return result
