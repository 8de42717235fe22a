"""napari's File > Save Selected Layer(s) of a Labels layer to ``.dcm``: a DICOM SEG over the DICOM series the labels
lie on (the plugin's writer), read back voxel for voxel; a layer on no DICOM series is refused in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_dagman._layers import labels_layer_data
from napari_dagman._widgets.common import volume_from_layer
from napari_dagman.core.errors import DagmanError

hd = pytest.importorskip("highdicom")

NAMES = {1: "liver", 2: "kidney_left"}


def open_series(viewer, shared_data: Path):
    (ct,) = viewer.open(str(shared_data / "example_ct_dicom"), plugin="napari-dagman")
    return ct


def two_organs(hu: np.ndarray) -> np.ndarray:
    """Soft tissue as organ 1 and bone as organ 2: both on every slice of the series."""
    out = np.zeros(hu.shape, np.uint8)
    out[(hu > 0) & (hu <= 100)] = 1
    out[hu > 200] = 2
    assert all((out[k] == i).any() for k in range(len(out)) for i in (1, 2))
    return out


def save(viewer, layer, path: Path) -> list[str]:
    viewer.layers.selection = {layer}
    return viewer.layers.save(str(path), selected=True, plugin="napari-dagman")


def read_back(viewer, path: Path):
    """The SEG through the plugin's reader: one Labels layer, and its organ names by id."""
    (layer,) = viewer.open(str(path), plugin="napari-dagman")
    assert layer._type_string == "labels"
    return layer, dict(zip(layer.features["index"], layer.features["name"], strict=True))


def on_the_series(back, ct) -> np.ndarray:
    """The read-back layer on the CT's voxel grid. A SEG holds no frame for a slice without segments, so it reads
    back as the slab of slices that have some: placed by its own geometry, which must fall on the CT's voxels."""
    np.testing.assert_allclose(back.scale, ct.scale, atol=1e-4)
    offset = (np.asarray(back.translate) - np.asarray(ct.translate)) / np.asarray(ct.scale)
    np.testing.assert_allclose(offset, np.rint(offset), atol=1e-3)
    z, y, x = (int(v) for v in np.rint(offset))
    full = np.zeros(ct.data.shape, np.asarray(back.data).dtype)
    depth, rows, cols = back.data.shape
    full[z : z + depth, y : y + rows, x : x + cols] = back.data
    return full


def assert_on_the_series(back, names: dict[int, str], ct, expected: np.ndarray, expected_names: dict[int, str]):
    """Each named organ's voxels, on the CT's grid, exactly the expected ones."""
    data = on_the_series(back, ct)
    by_name = {name: i for i, name in names.items() if i}
    assert sorted(by_name) == sorted(expected_names.values())
    for organ, name in expected_names.items():
        np.testing.assert_array_equal(data == by_name[name], expected == organ, err_msg=name)


def test_a_labels_layer_on_a_dicom_series_saves_as_a_dicom_seg_and_reads_back(
    make_napari_viewer, shared_data, tmp_path
):
    viewer = make_napari_viewer()
    ct = open_series(viewer, shared_data)
    organs = two_organs(np.asarray(ct.data))
    volume = volume_from_layer(ct, "image").with_array(organs)  # carries the series (source_path, series_uid)
    data, kwargs, _ = labels_layer_data(volume, NAMES, name="thresholds")
    layer = viewer.add_labels(data, **kwargs)
    out = tmp_path / "thresholds.dcm"
    assert save(viewer, layer, out) == [str(out)]
    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and len(seg.get_source_image_uids()) == len(ct.data)
    # not a prediction: the segments say they were made by hand, not by the model
    assert {str(d.SegmentAlgorithmType) for d in seg.SegmentSequence} == {"MANUAL"}
    back, names = read_back(viewer, out)
    assert_on_the_series(back, names, ct, organs, NAMES)


def test_a_labels_layer_drawn_over_a_dicom_ct_finds_the_series_in_the_viewer(
    make_napari_viewer, shared_data, tmp_path
):
    viewer = make_napari_viewer()
    ct = open_series(viewer, shared_data)
    viewer.layers.selection.active = ct
    viewer._new_labels()  # napari's "new labels" button: the CT's grid, none of its metadata
    drawn = viewer.layers[-1]
    assert drawn._type_string == "labels" and not drawn.metadata
    drawn.data[5:9, 200:260, 180:300] = 3
    out = tmp_path / "drawn.dcm"
    assert save(viewer, drawn, out) == [str(out)]
    back, names = read_back(viewer, out)
    assert_on_the_series(back, names, ct, np.asarray(drawn.data), {3: "label_3"})


def test_the_results_dock_prediction_saves_as_a_seg_with_its_ct_closed(make_napari_viewer, shared_data, tmp_path):
    from napari_dagman._widgets.results.dock import SegmentationResultsWidget

    viewer = make_napari_viewer()
    ct = open_series(viewer, shared_data)
    organs = two_organs(np.asarray(ct.data))
    # a prediction as `run_prediction` makes it: the CT's metadata without its source_path
    prediction = volume_from_layer(ct, "image").with_array(
        organs, label_names=NAMES, kind="labels", prediction_source="run/checkpoint.pt"
    )
    prediction.metadata.pop("source_path")
    dock = SegmentationResultsWidget(viewer)
    dock._image_layer = ct
    dock._prediction_layer(SimpleNamespace(prediction=prediction, names=NAMES))
    layer = dock.prediction_layer
    expected_grid = SimpleNamespace(data=ct.data, scale=ct.scale, translate=ct.translate)
    dock._image_layer = None
    viewer.layers.remove(ct)  # the series is named by the prediction's own metadata, not found in the viewer
    out = tmp_path / "prediction.dcm"
    assert save(viewer, layer, out) == [str(out)]
    seg = hd.seg.segread(out)
    assert {str(d.SegmentAlgorithmType) for d in seg.SegmentSequence} == {"AUTOMATIC"}
    back, names = read_back(viewer, out)
    assert_on_the_series(back, names, expected_grid, organs, NAMES)


def test_a_labels_layer_on_no_dicom_series_is_refused_in_one_line(make_napari_viewer, shared_data, tmp_path):
    from napari._app_model import get_app_model
    from napari.plugins._npe2 import file_extensions_string_for_layers
    from napari.utils.notifications import ErrorNotification

    viewer = make_napari_viewer()
    (seg,) = viewer.open(str(shared_data / "example_seg.nii.gz"), plugin="napari-dagman")
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "seg.dcm"
    # napari's save API: our words, not napari's "not a valid writer" (a ValueError from a writer reads as that)
    with pytest.raises(DagmanError, match="DICOM SEG is written over the DICOM series") as caught:
        save(viewer, seg, out)
    assert "\n" not in str(caught.value) and "save it as .nii.gz" in str(caught.value)

    # File > Save Selected Layer(s)... with the DICOM SEG filter chosen: napari shows the exception as its error
    # toast, whose text is the message: that one line
    filters, _ = file_extensions_string_for_layers([seg])
    chosen = next(f for f in filters.split(";;") if "DICOM SEG" in f)
    with (
        pytest.MonkeyPatch.context() as patch,
        pytest.raises(DagmanError) as caught,
    ):
        patch.setattr("napari._qt.qt_viewer.QFileDialog.getSaveFileName", lambda *a, **k: (str(out), chosen))
        get_app_model().commands.execute_command("napari.window.file.save_layers_dialog.selected").result()
    assert ErrorNotification(caught.value).message == str(caught.value)
    assert "\n" not in str(caught.value)
    assert list(folder.iterdir()) == []  # nothing written, no temporary left
