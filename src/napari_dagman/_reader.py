"""napari reader: CT and label maps through SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM files and series folders)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_dagman._layers import LayerData

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _readable(path: str | os.PathLike) -> bool:
    from napari_dagman.core.io import folder_has_dicom, is_volume_file

    path = Path(path)
    if path.is_dir():
        return folder_has_dicom(path)
    return is_volume_file(path)


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """Return the reader when every path is something we read; None otherwise (never raises)."""
    try:
        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        if paths and all(_readable(p) for p in paths):
            return read_layers
    except Exception:  # reader discovery must never raise into napari
        return None
    return None


def read_layers(path: PathOrPaths) -> list[LayerData]:
    """Read files or DICOM folders into Image layers (HU) and Labels layers (organ names).

    A folder with several DICOM series gives one layer per series, named by its series description.
    Errors are `DagmanInputError` with a one-line reason; napari shows it as a notification.
    """
    from napari_dagman._layers import image_layer_data, labels_layer_data
    from napari_dagman.core.io import is_label_map, read_volumes

    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    keep_radiological()
    layers: list[LayerData] = []
    for p in paths:
        for volume in read_volumes(p):
            for note in volume.metadata.get("notes", []):  # e.g. a DICOM series interpolated onto even slices
                from napari.utils.notifications import show_warning

                show_warning(note)
            if is_label_map(volume):
                layers.append(labels_layer_data(volume))
            else:
                layers.append(image_layer_data(volume))
    return layers


def keep_radiological() -> None:
    """The viewer the plugin reads into shows its coronal and sagittal views head up, from now on
    (`_widgets.orientation`); napari's current viewer is the one opening the file."""
    try:
        import napari
        from napari_dagman._widgets.orientation import follow_radiological

        follow_radiological(napari.current_viewer())
    except Exception:  # noqa: BLE001 (a display nicety must never stop a file from opening)
        return
