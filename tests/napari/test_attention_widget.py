"""Attention & mask explorer in a real viewer, on the real CT with the session's tiny 3D and 2D runs.

Maps must overlay the CT exactly (world extent), masks must be what the core's generators draw (exact counts),
updates happen in place, exports carry the image geometry, and bad input ends in a one-line notification.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from napari_dagman._layers import image_layer_data, labels_layer_data
from napari_dagman._widgets._common import Settings
from napari_dagman._widgets.attention import (
    DROPPED_LAYER,
    HEAD_LAYER,
    HEADS_LAYER,
    MASK_LAYER,
    MEAN_LAYER,
    AttentionWidget,
)
from napari_dagman.core.attention import PREVIEW_STRATEGIES
from napari_dagman.core.errors import DagmanError
from napari_dagman.core.io import read_volume
from napari_dagman.core.masking import hint_count, masked_count


@pytest.fixture(scope="module")
def ct(shared_data):
    return read_volume(shared_data / "example_ct.nii.gz")


@pytest.fixture(scope="module")
def organs(shared_data):
    return read_volume(shared_data / "example_seg_fast_force_split.nii.gz")


def make_dock(make_napari_viewer, ct, run=None, organs=None):
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(ct, name="ct")
    viewer.add_image(data, **kwargs)
    if organs is not None:
        data, kwargs, _ = labels_layer_data(organs, name="organs")
        viewer.add_labels(data, **kwargs)
    dock = AttentionWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Attention")
    dock.image.value = viewer.layers["ct"]
    dock.device.value = "cpu"
    if run is not None:
        dock.set_run(str(run))
    return viewer, dock


def finish(dock, timeout: float = 240.0) -> None:
    assert dock._runner.wait(timeout), "the explorer did not finish"


def wait_until(condition, timeout: float) -> bool:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QApplication.processEvents()
        if condition():
            return True
        time.sleep(0.01)
    return False


def edges(layer) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) position of the first and last voxel *edges* of a layer's last three axes."""
    scale, translate = np.asarray(layer.scale)[-3:], np.asarray(layer.translate)[-3:]
    shape = np.asarray(layer.data.shape)[-3:]
    return translate - scale / 2, translate + scale * (shape - 0.5)


def test_crop_maps_heads_and_masks_update_in_place(make_napari_viewer, ct, tiny_run):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    assert dock.compute()
    finish(dock)
    assert dock._runner.last_error is None
    mean, heads = viewer.layers[MEAN_LAYER], viewer.layers[HEADS_LAYER]
    assert heads.data.ndim == 4 and heads.data.shape[0] == 4  # tiny preset: 4 class-attention heads
    np.testing.assert_allclose(mean.data, heads.data.mean(axis=0), rtol=1e-5)
    # relative attention: a head's map averages to 1 over its tokens (uniform = 1)
    np.testing.assert_allclose(heads.data.reshape(4, -1).mean(axis=1), 1.0, rtol=1e-4)
    assert mean.blending == "additive" and mean.colormap.name == "inferno"
    # token-size scale: 16 voxels of 4 mm (the run's spacing), the CT itself is 3 mm
    assert tuple(mean.scale) == pytest.approx((64.0, 64.0, 64.0))
    assert list(heads.scale[1:]) == pytest.approx(list(mean.scale))

    preview = dock.result.preview
    cells = int(np.prod(next(iter(preview.masks.values())).shape))
    k = masked_count(cells, 0.6)
    expected = {s: k for s in PREVIEW_STRATEGIES} | {"attention-hint": k - hint_count(cells, 0.6, 0.1)}
    assert {s: int(m.sum()) for s, m in preview.masks.items()} == expected
    # each mask is a Labels layer on the crop's voxels (16-voxel cells), exactly over the crop
    mask_layers = {s: viewer.layers[MASK_LAYER.format(s)] for s in PREVIEW_STRATEGIES}
    for strategy, layer in mask_layers.items():
        assert layer.data.shape == preview.image.shape
        assert int(layer.data.sum()) == expected[strategy] * 16**3
        assert tuple(layer.translate) == pytest.approx(tuple(preview.image_translate))
        np.testing.assert_array_equal(layer.data[::16, ::16, ::16], preview.masks[strategy])
    assert all(layer.visible == (s == "noisy-teacher") for s, layer in mask_layers.items())
    # the cells the noisy teacher did not see, as their own layer shown with its mask
    dropped = viewer.layers[DROPPED_LAYER]
    np.testing.assert_array_equal(dropped.data[::16, ::16, ::16], preview.teacher_dropped)
    assert dropped.visible and int(preview.teacher_dropped.sum()) == masked_count(cells, 0.2)
    assert "diversity" in dock.diversity_text.text()

    # a new ratio redraws the masks in the same layers; the maps stay
    n_layers = len(viewer.layers)
    dock.ratio.value = 0.3  # the slider redraws the masks by itself once released
    assert wait_until(lambda: dock.running, 10)
    finish(dock)
    k = masked_count(cells, 0.3)
    assert int(dock.result.preview.masks["random"].sum()) == k
    assert int(viewer.layers[MASK_LAYER.format("random")].data.sum()) == k * 16**3
    assert all(viewer.layers[MASK_LAYER.format(s)] is layer for s, layer in mask_layers.items())
    assert len(viewer.layers) == n_layers and viewer.layers[MEAN_LAYER] is mean

    dock.show_mask.value = "all"
    dock.contour.value = True
    assert all(layer.visible and layer.contour == 1 for layer in mask_layers.values())

    # grid mode: one layer per head in napari's grid; back to the slider restores the grid setting
    dock.view.value = "grid"
    assert HEADS_LAYER not in viewer.layers
    assert all(HEAD_LAYER.format(h) in viewer.layers for h in range(4))
    assert dock._grid().enabled
    dock.view.value = "slider"
    assert HEADS_LAYER in viewer.layers and HEAD_LAYER.format(0) not in viewer.layers
    assert not dock._grid().enabled


def test_whole_volume_maps_cover_the_image_and_export_with_its_geometry(
    make_napari_viewer, ct, tiny_run, tmp_path
):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    dock.scope.value = "volume"
    assert dock.compute()  # a child process: sliding windows over the whole CT
    finish(dock)
    image, mean = viewer.layers["ct"], viewer.layers[MEAN_LAYER]
    image_lo, image_hi = edges(image)
    map_lo, map_hi = edges(mean)
    token = np.asarray(mean.scale)
    # same first edge; the last token reaches past the CT by less than one token (the grid is whole tokens)
    np.testing.assert_allclose(map_lo, image_lo, atol=0.5)
    assert np.all(map_hi >= image_hi - 2.0) and np.all(map_hi < image_hi + token)
    assert dock.result.maps.windows > 1

    # export on the CT's grid: same shape and geometry as the CT; on the token grid: the token size
    assert dock.export(str(tmp_path / "on-ct"))
    assert dock._export_runner.wait(120)
    exported = read_volume(tmp_path / "on-ct" / "attention_volume_mean.nii.gz")
    assert exported.same_grid(ct)
    mask = read_volume(tmp_path / "on-ct" / "mask_noisy-teacher.nii.gz")
    assert mask.same_grid(ct) and set(np.unique(mask.array)) <= {0, 1}
    dock.on_image_grid.value = False
    assert dock.export(str(tmp_path / "tokens"))
    assert dock._export_runner.wait(120)
    coarse = read_volume(tmp_path / "tokens" / "attention_volume_head0.nii.gz")
    assert coarse.spacing == pytest.approx(tuple(token))
    assert coarse.shape == mean.data.shape


def test_2d_model_maps_the_displayed_slice(make_napari_viewer, ct, tiny_run_2d):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run_2d)
    image = viewer.layers["ct"]
    z = 70
    viewer.dims.set_point(0, image.data_to_world((z, 0, 0))[0])
    dock.scope.value = "slice"
    assert dock.compute()
    finish(dock)
    mean = viewer.layers[MEAN_LAYER]
    assert mean.data.shape[0] == 1  # one axial slice of tokens
    # placed on the displayed slice, covering the image in plane
    assert mean.translate[0] == pytest.approx(image.data_to_world((z, 0, 0))[0])
    image_lo, image_hi = edges(image)
    map_lo, map_hi = edges(mean)
    np.testing.assert_allclose(map_lo[1:], image_lo[1:], atol=0.5)
    assert np.all(map_hi[1:] >= image_hi[1:] - 1.5) and np.all(map_hi[1:] < image_hi[1:] + mean.scale[1:])
    assert dock._model_label.value.startswith("dagman")


def test_bad_input_gives_a_notification_not_a_traceback(
    make_napari_viewer, ct, organs, tiny_run, tiny_run_2d, tmp_path, notifications
):
    def last_error() -> str:
        errors = [m for s, m in notifications if s == "error"]
        return errors[-1] if errors else ""

    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run, organs)

    # no image layer chosen
    viewer.layers.remove("ct")
    assert not dock.compute() and "no image layer" in last_error()
    data, kwargs, _ = image_layer_data(ct, name="ct")
    viewer.add_image(data, **kwargs)
    dock.image.value = viewer.layers["ct"]

    # a labels layer where an image is expected
    assert not dock.compute(image=viewer.layers["organs"]) and "not an image layer" in last_error()

    # a folder that is not a run
    empty = tmp_path / "empty"
    empty.mkdir()
    dock.set_run(str(empty))
    assert not dock.compute() and "not a napari-dagman run folder" in last_error()

    # a checkpoint of another architecture (the 2D run's weights in the 3D run's folder): refused in the job
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_run, mixed)
    shutil.copy(tiny_run_2d / "model.safetensors", mixed / "model.safetensors")
    dock.set_run(str(mixed))
    assert dock.compute()
    finish(dock)
    assert isinstance(dock._runner.last_error, DagmanError)
    assert "does not match" in last_error()
    assert dock.compute_button.text() == "Compute" and not dock.running

    # a 3D model cannot map "the displayed slice"
    dock.set_run(str(tiny_run))
    dock.scope.value = "slice"
    assert dock.compute()
    finish(dock)
    assert "3D" in last_error()
    assert all("\n" not in m for s, m in notifications if s == "error")


def test_last_run_button_takes_the_run_trained_in_the_pretraining_dock(make_napari_viewer, ct, tiny_run):
    Settings("runs").set("last_run", str(tiny_run))
    _, dock = make_dock(make_napari_viewer, ct)
    assert dock.run.line_edit.value == str(tiny_run)  # prefilled
    dock.run.value = ""
    dock.use_last_run()
    assert dock.run.line_edit.value == str(tiny_run)
