"""Attention maps of the semantic class attention, mask previews, attention per organ, head-diversity figures,
and the attention job that the CLI and the explorer share."""

from napari_dagman.core.attention.job import (
    AttentionResult,
    attention_job,
    describe_encoder,
    export_attention_job,
    load_attention_encoder,
    volume_slab,
    write_attention,
)
from napari_dagman.core.attention.maps import AttentionMaps, attention_maps, map_head_diversity
from napari_dagman.core.attention.preview import (
    PREVIEW_STRATEGIES,
    CropPreview,
    crop_preview,
    save_preview_figure,
)

__all__ = [
    "PREVIEW_STRATEGIES",
    "AttentionMaps",
    "AttentionResult",
    "CropPreview",
    "attention_job",
    "attention_maps",
    "crop_preview",
    "describe_encoder",
    "export_attention_job",
    "load_attention_encoder",
    "map_head_diversity",
    "save_preview_figure",
    "volume_slab",
    "write_attention",
]
