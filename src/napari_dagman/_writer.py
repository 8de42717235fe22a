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
    from napari_dagman.core.labels import names_in

    names: dict[int, str] = {}
    features = meta.get("features")
    if features is not None and len(features) and {"index", "name"} <= set(features.columns):
        names = {
            int(i): str(n) for i, n in zip(features["index"], features["name"], strict=True) if int(i) != 0
        }
    elif (meta.get("metadata") or {}).get("label_names"):
        names = {int(k): str(v) for k, v in meta["metadata"]["label_names"].items()}
    return names_in(data, names)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer and its ``.labels.json`` sidecar (id -> organ name)."""
    from napari_dagman.core.io import write_volume

    array = np.asarray(data)
    if array.max(initial=0) <= 255 and array.min(initial=0) >= 0:
        array = array.astype(np.uint8)
    elif array.min(initial=0) >= 0 and array.max(initial=0) <= 65535:
        array = array.astype(np.uint16)
    volume = _volume_from_layer(array, meta)
    return write_volume(volume, path, label_names=_names_from_meta(meta, array))


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write an Image layer (values as they are, e.g. HU) with its source geometry."""
    from napari_dagman.core.io import write_volume

    return write_volume(_volume_from_layer(data, meta), path)
