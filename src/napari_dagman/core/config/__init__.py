"""Job configurations: validated dataclasses with JSON round-trip, from which the CLI flags and GUI forms are built.

Each field carries its help text, limits, choices and group through `option`; a config file and command-line
flags compose (the file first, flags given explicitly override it). Options every training job shares are
declared once (`RunOptions`, `OptimiserOptions`); a method's own options live in its file
(`core.methods.base.MethodOptions`).
"""

from napari_dagman.core.config.base import (
    DEVICE_HELP,
    PRESET_NAMES,
    ConfigBase,
    OptimiserOptions,
    RunOptions,
    field_choices,
    option,
    unknown_options_message,
)
from napari_dagman.core.config.jobs import (
    ATTENTION_SCOPES,
    EMBED_FEATURES,
    EMBED_POOLINGS,
    EMBED_SAMPLINGS,
    VAL_SPLITS,
    AttentionConfig,
    DemoConfig,
    EmbedConfig,
    FinetuneConfig,
    PredictConfig,
    clustering_names,
    projection_names,
)
from napari_dagman.core.config.pretrain import PretrainConfig

__all__ = [
    "ATTENTION_SCOPES",
    "DEVICE_HELP",
    "EMBED_FEATURES",
    "EMBED_POOLINGS",
    "EMBED_SAMPLINGS",
    "PRESET_NAMES",
    "VAL_SPLITS",
    "AttentionConfig",
    "ConfigBase",
    "DemoConfig",
    "EmbedConfig",
    "FinetuneConfig",
    "OptimiserOptions",
    "PredictConfig",
    "PretrainConfig",
    "RunOptions",
    "clustering_names",
    "field_choices",
    "option",
    "projection_names",
    "unknown_options_message",
]
