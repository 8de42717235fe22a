"""Runs out to the tools users already have: MONAI-ready encoder weights and MONAI Bundles."""

from napari_dagman.core.export.bundle import check_bundle, export_bundle, inference_config
from napari_dagman.core.export.encoder import ENCODER_FORMATS, export_encoder, swinunetr_arguments
from napari_dagman.core.export.weights import write_json, write_state_dict

#: ``napari-dagman export --format`` values.
EXPORT_FORMATS: tuple[str, ...] = (*ENCODER_FORMATS, "monai-bundle")

__all__ = [
    "ENCODER_FORMATS",
    "EXPORT_FORMATS",
    "check_bundle",
    "export_bundle",
    "export_encoder",
    "inference_config",
    "swinunetr_arguments",
    "write_json",
    "write_state_dict",
]
