"""Volume <-> napari layer data. No napari import: layer-data tuples are plain (data, kwargs, type)."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_dagman.core import labels as label_tables
from napari_dagman.core.volume import Volume
from napari_dagman.core.windowing import opening_window, window_limits

LayerData = tuple[Any, dict[str, Any], str]


def image_layer_data(volume: Volume, name: str | None = None, window: str | None = None) -> LayerData:
    """An Image layer in HU at physical scale, with a CT display window: ``window`` (a preset), else the one
    `opening_window` picks (the DICOM window tags, else mediastinum for a chest CT and abdomen otherwise)."""
    if window is None:
        window, limits, why = opening_window(volume.array, volume.metadata)
    else:
        limits, why = window_limits(window), f"{window} window"
    kwargs = volume.layer_kwargs()
    kwargs.update(
        name=name or volume.metadata.get("name", "CT"),
        colormap="gray",
        contrast_limits=list(limits),
        blending="translucent",
    )
    kwargs["metadata"]["kind"] = "ct"
    kwargs["metadata"]["window"] = window
    kwargs["metadata"]["window_reason"] = why
    return volume.array, kwargs, "image"


def labels_layer_data(
    volume: Volume, names: dict[int, str] | None = None, name: str | None = None
) -> LayerData:
    """A Labels layer with organ names in ``features`` (shown on hover) and stable per-organ colours."""
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.int32)
    present = label_tables.names_in(array, names if names is not None else volume.metadata.get("label_names"))
    source = (
        "sidecar" if names or volume.metadata.get("label_names") else label_tables.default_names(present)[1]
    )
    kwargs = volume.layer_kwargs()
    table = label_tables.label_table(present, present)
    kwargs.update(
        name=name or volume.metadata.get("name", "labels"),
        features=table,
        # a mapping is turned into a DirectLabelColormap by napari
        colormap=label_tables.colour_dict(present),
        opacity=0.5,
    )
    kwargs["metadata"].update(kind="labels", label_names=present, label_names_source=source)
    return array, kwargs, "labels"
