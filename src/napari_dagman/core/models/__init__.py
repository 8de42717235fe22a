"""Networks: the Swin encoder with a mask token and semantic class attention, projection heads, decoders."""

from napari_dagman.core.models.architecture import PRESETS, Architecture, architecture_for
from napari_dagman.core.models.encoder import EncoderOutput, SemanticClassAttention, SwinEncoder

__all__ = [
    "PRESETS",
    "Architecture",
    "EncoderOutput",
    "SemanticClassAttention",
    "SwinEncoder",
    "architecture_for",
]
