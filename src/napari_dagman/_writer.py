"""napari writers: Labels and Image layers to NIfTI/MHA/NRRD with the geometry of their source file."""

from __future__ import annotations

from typing import Any

import numpy as np


def _volume_from_layer(data: Any, meta: dict[str, Any]):
    from napari_dagman.core.volume import Volume

    return Volume.from_layer_data(
        np.asarray(data),
        scale=meta.get("scale"),
        translate=meta.get("translate"),
        metadata=meta.get("metadata"),
    )


def _names_from_meta(meta: dict[str, Any], data: np.ndarray) -> dict[int, str]:
    """Label names from the layer's features table (what the user sees), else its metadata, else defaults."""
    from napari_dagman.core.labels import layer_names

    return layer_names(data, meta.get("features"), meta.get("metadata"))


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer and its ``.labels.json`` sidecar (id -> organ name), through the core's one label
    writer (`core.outputs.write_labels`: ids narrowed to uint8/uint16, the format from the file name)."""
    from napari_dagman.core.outputs import write_labels as write

    array = np.asarray(data)
    return write(_volume_from_layer(array, meta), path, _names_from_meta(meta, array))


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write an Image layer (values as they are, e.g. HU) with its source geometry."""
    from napari_dagman.core.io import write_volume

    return write_volume(_volume_from_layer(data, meta), path)
