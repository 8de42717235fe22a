"""napari face of the foundation: reader, writer, sample data and the CT window dock, in a real viewer."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from tests.helpers import write_dicom_series

from napari_dagman._reader import get_reader
from napari_dagman._widgets.window import WindowWidget
from napari_dagman.core.io import read_label_names, read_volume


def test_open_ct_and_labels_with_geometry_and_names(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    viewer.open(shared_data / "example_ct_sm.nii.gz", plugin="napari-dagman")
    viewer.open(shared_data / "example_seg.nii.gz", plugin="napari-dagman")
    ct, seg = viewer.layers
    assert ct._type_string == "image" and seg._type_string == "labels"
    assert tuple(ct.scale) == (3.0, 3.0, 3.0)
    np.testing.assert_allclose(ct.translate, (94.3017578, -311.319, -185.0436707), atol=1e-3)
    assert ct.data.shape == (30, 101, 122) and ct.data.min() < -1000  # Hounsfield units
    assert {"spacing", "origin", "direction", "source_path", "source_orientation"} <= set(ct.metadata)
    assert tuple(ct.contrast_limits) == (-160.0, 240.0)  # abdomen window by default
    # the label map overlays the CT exactly (same scale and translate) and names organs on hover
    np.testing.assert_allclose(seg.translate, ct.translate)
    names = dict(zip(seg.features["index"], seg.features["name"], strict=True))
    assert names[5] == "liver" and names[1] == "spleen"
    z, y, x = np.argwhere(seg.data == 5)[0]
    world = np.asarray(seg.data_to_world((z, y, x)))
    viewer.dims.set_point(0, world[0])  # show the slice that holds the voxel
    status = seg.get_status(world, world=True)
    assert "liver" in str(status)
    colours = seg.colormap.color_dict
    assert not np.allclose(colours[5], colours[1])


def test_dicom_folder_with_two_series_opens_two_layers(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(0)
    write_dicom_series(
        tmp_path,
        rng.normal(0, 40, (4, 16, 16)),
        uid="1.2.826.0.1.3680043.2.1125.11",
        description="arterial",
        prefix="a",
    )
    write_dicom_series(
        tmp_path,
        rng.normal(0, 40, (3, 16, 16)),
        uid="1.2.826.0.1.3680043.2.1125.12",
        description="venous",
        prefix="v",
    )
    viewer = make_napari_viewer()
    viewer.open(tmp_path, plugin="napari-dagman")
    assert sorted(layer.name for layer in viewer.layers) == ["arterial", "venous"]
    assert sorted(layer.data.shape[0] for layer in viewer.layers) == [3, 4]


def test_real_dicom_series_opens_in_hu(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    viewer.open(shared_data / "example_ct_dicom", plugin="napari-dagman")
    (layer,) = viewer.layers
    assert layer.data.shape == (20, 512, 512) and layer.data.min() == -1024
    np.testing.assert_allclose(layer.scale, (2.0, 0.9765625, 0.9765625))


def test_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-dagman", "phantom")
    ct, organs = viewer.layers
    assert ct._type_string == "image" and organs._type_string == "labels"
    assert ct.data.shape == organs.data.shape
    assert "liver" in set(organs.features["name"])


def test_save_labels_back_with_source_geometry_and_names(make_napari_viewer, shared_data, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(shared_data / "example_seg.nii.gz", plugin="napari-dagman")
    seg = viewer.layers[0]
    seg.data[0, 0, 0] = 7  # a user edit
    out = tmp_path / "edited.nii.gz"
    written = viewer.layers.save(str(out), selected=False, plugin="napari-dagman")
    assert str(out) in written
    raw_in, raw_out = sitk.ReadImage(str(shared_data / "example_seg.nii.gz")), sitk.ReadImage(str(out))
    assert raw_out.GetDirection() == raw_in.GetDirection()
    np.testing.assert_allclose(raw_out.GetOrigin(), raw_in.GetOrigin(), atol=1e-4)
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, seg.data)
    names = read_label_names(out)
    assert names[5] == "liver" and names[7] == "pancreas"


def test_window_presets_change_display_only(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    viewer.open(shared_data / "example_ct_sm.nii.gz", plugin="napari-dagman")
    layer = viewer.layers[0]
    before = layer.data.copy()
    dock = WindowWidget(viewer)
    dock._preset.value = "lung"
    assert tuple(layer.contrast_limits) == (-1350.0, 150.0)
    dock._preset.value = "custom"
    dock._width.value, dock._level.value = 100, 30
    dock.apply()
    assert tuple(layer.contrast_limits) == (-20.0, 80.0)
    np.testing.assert_array_equal(layer.data, before)


def test_window_dock_shows_the_dicom_window_a_series_opened_with(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    viewer.open(shared_data / "example_ct_dicom", plugin="napari-dagman")
    layer = viewer.layers[0]
    assert tuple(layer.contrast_limits) == (-110.0, 190.0)  # the series' WindowCenter 40 / WindowWidth 300
    dock = WindowWidget(viewer)
    assert (dock._preset.value, dock._width.value, dock._level.value) == ("custom", 300.0, 40.0)
    assert "DICOM window" in dock._status.value


def test_window_dock_without_image_warns(make_napari_viewer, notifications):
    viewer = make_napari_viewer()
    dock = WindowWidget(viewer)
    dock.apply()
    assert any("open a CT first" in message for _, message in notifications)


@pytest.mark.parametrize("kind", ["text", "empty_dir", "junk_dir", "png"])
def test_reader_declines_what_it_cannot_read(tmp_path, kind):
    if kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("x")
    elif kind == "empty_dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif kind == "junk_dir":
        path = tmp_path / "junk"
        path.mkdir()
        (path / "a.bin").write_bytes(b"0" * 200)
    else:
        path = tmp_path / "photo.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert get_reader(str(path)) is None
    assert get_reader([str(path)]) is None


def test_broken_file_gives_a_clear_message_and_napari_keeps_running(make_napari_viewer, tmp_path):
    from napari_dagman.core.errors import DagmanInputError

    bad = tmp_path / "renamed.nii.gz"
    bad.write_text("this is a text file")
    viewer = make_napari_viewer()
    with pytest.raises(DagmanInputError, match="cannot read renamed.nii.gz: not an image file"):
        viewer.open(bad, plugin="napari-dagman")
    assert len(viewer.layers) == 0
    viewer.add_image(np.zeros((4, 4)))  # the viewer still works
    assert len(viewer.layers) == 1


def test_labels_layer_from_elsewhere_keeps_its_feature_names(make_napari_viewer):
    """A Labels layer painted or added by another plugin: names come from its features table."""
    import pandas as pd

    from napari_dagman._widgets.common import volume_from_layer

    viewer = make_napari_viewer()
    data = np.zeros((4, 5, 6), dtype=np.int32)
    data[1, 2, 3] = 7
    features = pd.DataFrame({"index": [0, 7], "name": ["background", "my_tumour"]})
    layer = viewer.add_labels(data, scale=(2.0, 1.0, 1.0), features=features)
    volume = volume_from_layer(layer, kind="labels")
    assert volume.metadata["label_names"] == {7: "my_tumour"}
    assert tuple(volume.spacing) == (2.0, 1.0, 1.0)
    with pytest.raises(Exception, match="is a Image layer, not a labels layer"):
        volume_from_layer(viewer.add_image(data.astype(float)), kind="labels")


def test_coronal_and_sagittal_views_show_the_head_up_and_axial_stays_radiological(make_napari_viewer, shared_data):
    """napari draws the first displayed axis downwards: the LPS volume's z (inferior -> superior) displayed
    vertically put the head at the bottom of coronal and sagittal views (issue 27)."""
    viewer = make_napari_viewer()
    viewer.open(shared_data / "example_ct_sm.nii.gz", plugin="napari-dagman")

    def shown() -> tuple[str, str]:
        return tuple(str(v.value) for v in viewer.camera.orientation2d)

    assert shown() == ("down", "right")  # axial: anterior up, the patient's right on the screen's left
    viewer.dims.order = (1, 0, 2)  # coronal: z vertical, x horizontal
    assert shown() == ("up", "right")  # superior up, the patient's right on the left
    viewer.dims.order = (2, 0, 1)  # sagittal: z vertical, y horizontal (anterior on the left)
    assert shown() == ("up", "right")
    viewer.dims.order = (0, 1, 2)
    assert shown() == ("down", "right")


def test_edge_letters_name_the_patient_directions_of_each_view(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    viewer.open(shared_data / "example_ct_sm.nii.gz", plugin="napari-dagman")

    def letters() -> tuple[str, str, str, str]:
        overlays = viewer.canvas.overlays
        return tuple(
            overlays[f"dagman_orientation_{edge}"].text for edge in ("top", "bottom", "left", "right")
        )

    assert letters() == ("A", "P", "R", "L")  # axial, radiological: the patient's right on the screen's left
    viewer.dims.order = (1, 0, 2)
    assert letters() == ("S", "I", "R", "L")  # coronal
    viewer.dims.order = (2, 0, 1)
    assert letters() == ("S", "I", "A", "P")  # sagittal
    viewer.camera.orientation2d = ("up", "left")  # a user's flip: the letters follow the camera
    assert letters() == ("S", "I", "P", "A")
    viewer.dims.ndisplay = 3
    assert not viewer.canvas.overlays["dagman_orientation_top"].visible


def test_a_coronal_screenshot_shows_the_marked_head_end_at_the_top(make_napari_viewer):
    """Pixels, not only napari's state: a volume bright at its superior end (high z in LPS) is bright at the top of
    the coronal canvas, under the letter S."""
    import numpy as np

    from napari_dagman._layers import image_layer_data
    from napari_dagman._widgets.orientation import follow_radiological
    from napari_dagman.core.volume import Volume

    array = np.full((40, 40, 40), -1000.0, np.float32)
    array[30:, 5:35, 5:35] = 1000.0  # the head end: the top quarter of z
    viewer = make_napari_viewer(show=True)
    viewer._add_layer_from_data(*image_layer_data(Volume(array, spacing=(2.0, 2.0, 2.0)), window="bone"))
    follow_radiological(viewer)
    viewer.dims.order = (1, 0, 2)  # coronal
    viewer.reset_view()
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(float)
    grey = shot.mean(axis=2)
    middle = grey[:, grey.shape[1] // 4 : 3 * grey.shape[1] // 4]
    rows = middle.mean(axis=1)
    bright = np.flatnonzero(rows > 0.5 * rows.max())
    assert bright.size and bright.max() < grey.shape[0] / 2, "the bright (superior) end is not at the top"
    # the letter S is drawn at the top centre: yellowish pixels (red and green high, blue low) in the top band
    top = shot[: shot.shape[0] // 8, shot.shape[1] // 3 : 2 * shot.shape[1] // 3]
    yellow = (top[..., 0] > 180) & (top[..., 1] > 150) & (top[..., 2] < 120)
    assert yellow.sum() > 5


def test_other_images_keep_napari_s_orientation(make_napari_viewer):
    import numpy as np

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 9, 10)))  # not the plugin's: a microscope stack, say
    from napari_dagman._widgets.orientation import follow_radiological

    follow_radiological(viewer)
    viewer.dims.order = (1, 0, 2)
    assert str(viewer.camera.orientation2d[0].value) == "down"
