"""napari writers: Labels and Image layers to NIfTI/MHA/NRRD with the geometry of their source file, and Labels
layers to a DICOM SEG over the DICOM series they lie on."""

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


#: What a Labels layer without a DICOM series beneath it is told when saved as ``.dcm``.
NO_SERIES = (
    "a DICOM SEG is written over the DICOM series the labels lie on: this layer does not come from one; save it as "
    ".nii.gz, or predict (or draw) on a DICOM series opened with napari-dagman"
)


def _series_in_viewer(data: np.ndarray, meta: dict[str, Any]) -> dict[str, str]:
    """The DICOM series of the layers of the current viewer on the labels' grid (same shape, scale, translate),
    when they name exactly one: napari's "new labels" over a DICOM CT copies its grid, not its metadata, and a
    writer is given no viewer."""
    from napari_dagman.core.segmentation.dicom_seg import series_source

    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 (no Qt, no viewer: only the layer's own metadata can say)
        return {}
    if viewer is None:
        return {}
    found = set()
    for layer in viewer.layers:
        on_grid = (  # the shape first: a layer of other dimensions has scales that do not compare
            tuple(getattr(layer.data, "shape", ())) == data.shape
            and np.allclose(layer.scale, meta.get("scale", layer.scale))
            and np.allclose(layer.translate, meta.get("translate", layer.translate))
        )
        source = series_source(layer.metadata) if on_grid else {}
        if source:
            found.add(tuple(sorted(source.items())))
    return dict(found.pop()) if len(found) == 1 else {}


def write_labels_dicom_seg(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer as a DICOM SEG over the DICOM series it lies on (the core's label writer, hence
    `dicom_seg.write_dicom_seg`), one segment per organ named in its features or metadata.

    The series is the one its metadata names (a series read by this plugin, a prediction of the results dock),
    else the one the current viewer's layers on its grid name (a layer drawn with napari's "new labels").
    """
    from napari_dagman.core.errors import DagmanError
    from napari_dagman.core.outputs import write_labels as write
    from napari_dagman.core.segmentation.dicom_seg import series_source

    array = np.asarray(data)
    try:
        labels = _volume_from_layer(array, meta)
        source = series_source(labels.metadata) or _series_in_viewer(array, meta)
        if not source:
            raise DagmanError(NO_SERIES)
        labels.metadata.update(source)  # the labels lie on the series' grid: they stand for its image too
        return write(labels, path, _names_from_meta(meta, array), source=labels)
    except DagmanError as err:
        # napari's save takes a writer's ValueError (DagmanInputError is one) for "no writer for this file" and
        # says that instead; a plain DagmanError reaches the user as our one line (napari's error toast)
        raise DagmanError(str(err)) from None
