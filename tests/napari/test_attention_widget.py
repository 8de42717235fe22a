"""Attention & mask explorer in a real viewer, on the real CT with the session's tiny 3D and 2D runs.

Maps must overlay the CT exactly (world extent), the small multiples must show the slice napari shows (and follow
it), a click on a tile must show that head or mask as the layer, masks must be what the core's generators draw
(exact counts), an organ's row must move the viewer to the organ, two runs must be shown side by side (and runs of
another architecture refused in one line), and bad input ends in a one-line notification.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from napari_dagman._layers import image_layer_data, labels_layer_data
from napari_dagman._widgets.common import Settings
from napari_dagman._widgets.explorer.dock import (
    DIFFERENCE_LAYER,
    DROPPED_LAYER,
    HEADS_LAYER,
    MASK_LAYER,
    MEAN_LAYER,
    AttentionWidget,
)
from napari_dagman.core.attention import PREVIEW_STRATEGIES
from napari_dagman.core.attention.preview import RUN_MASK
from napari_dagman.core.errors import DagmanError
from napari_dagman.core.io import read_volume
from napari_dagman.core.masking import hint_count, masked_count
from napari_dagman.core.segmentation import organ_focus


@pytest.fixture(scope="module")
def ct(shared_data):
    return read_volume(shared_data / "example_ct.nii.gz")


@pytest.fixture(scope="module")
def organs(shared_data):
    return read_volume(shared_data / "example_seg_fast_force_split.nii.gz")


@pytest.fixture(scope="module")
def mim_run(tmp_path_factory, shared_data):
    """A 2-step tiny MiM run (ROI 32): a method that does not train the class attention."""
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    out = tmp_path_factory.mktemp("runs") / "mim"
    config = PretrainConfig(
        images=[str(shared_data / "example_ct.nii.gz")], out=str(out), method="mim", preset="tiny", roi=32,
        spacing=4.0, steps=2, batch_size=1, preview_every=0, seed=0,
    )  # fmt: skip
    consume(run_pretraining(config))
    return out


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


def finish(dock, timeout: float = 300.0) -> None:
    assert dock.wait(timeout), "the explorer did not finish"


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


def click_tile(figure, key) -> None:
    """A left click in the middle of a tile, as matplotlib delivers it from the canvas."""
    from matplotlib.backend_bases import MouseEvent

    x, y = figure.tile_axes(key).transAxes.transform((0.5, 0.5))
    MouseEvent("button_press_event", figure.canvas, x, y, button=1)._process()


def layer(viewer, name):
    """The explorer's layer called ``name``, whatever verdict ("(flat)") its shown name carries."""
    from napari_dagman._widgets.explorer.layers import base_name

    return next((x for x in viewer.layers if base_name(x.name) == name), None)


def error_lines(notifications) -> list[str]:
    return [m for s, m in notifications if s == "error"]


def test_crop_maps_heads_and_masks_update_in_place(make_napari_viewer, ct, tiny_run):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    assert dock.compute()
    finish(dock)
    assert dock._runner.last_error is None
    mean, heads = layer(viewer, MEAN_LAYER), layer(viewer, HEADS_LAYER)
    assert heads.data.ndim == 4 and heads.data.shape[0] == 4  # tiny preset: 4 class-attention heads
    np.testing.assert_allclose(mean.data, heads.data.mean(axis=0), rtol=1e-5)
    # relative attention: a head's map averages to 1 over its tokens (uniform = 1)
    np.testing.assert_allclose(heads.data.reshape(4, -1).mean(axis=1), 1.0, rtol=1e-4)
    assert mean.blending == "additive" and mean.colormap.name == "coolwarm (log x uniform)"
    assert mean.colorbar.visible and not heads.colorbar.visible  # the map shown has the canvas' colour bar
    # one fixed, logarithmic colour scale for every head: 1/4 to 4 x uniform, said in the dock
    assert tuple(mean.contrast_limits) == pytest.approx((0.25, 4.0))
    assert tuple(heads.contrast_limits) == pytest.approx((0.25, 4.0))
    assert "logarithmic 0.25 - 4" in dock.contrast_line.text()
    # token-size scale: 16 voxels of 4 mm (the run's spacing), the CT itself is 3 mm
    assert tuple(mean.scale) == pytest.approx((64.0, 64.0, 64.0))
    assert list(heads.scale[1:]) == pytest.approx(list(mean.scale))

    # by default the run's own mask: dagman hides 0.6 of the cells, chosen by a teacher that drops 0.2 of them
    preview = dock.result.preview
    assert list(preview.masks) == [RUN_MASK] and "teacher that drops 20%" in preview.recipe
    cells = int(np.prod(preview.masks[RUN_MASK].shape))
    assert int(preview.masks[RUN_MASK].sum()) == masked_count(cells, 0.6)
    run_layer = layer(viewer, MASK_LAYER.format(RUN_MASK))
    assert run_layer.visible and run_layer.data.shape == preview.image.shape
    np.testing.assert_array_equal(run_layer.data[::16, ::16, ::16], preview.masks[RUN_MASK])
    # the cells the noisy teacher did not see, as their own layer shown with the run's mask
    dropped = layer(viewer, DROPPED_LAYER)
    np.testing.assert_array_equal(dropped.data[::16, ::16, ::16], preview.teacher_dropped)
    assert dropped.visible and int(preview.teacher_dropped.sum()) == masked_count(cells, 0.2)
    assert "diversity of these maps" in dock.diversity_text.text()
    assert "on its probe crops at step 3" in dock.diversity_text.text()

    # every strategy beside it, at the run's ratio, each with exact counts
    dock.strategies.value = "all"
    assert wait_until(lambda: dock.running, 10)
    finish(dock)
    preview = dock.result.preview
    k = masked_count(cells, 0.6)
    expected = (
        {RUN_MASK: k}
        | {s: k for s in PREVIEW_STRATEGIES}
        | {"attention-hint": k - hint_count(cells, 0.6, 0.1)}
    )
    assert {s: int(m.sum()) for s, m in preview.masks.items()} == expected
    # each mask is a Labels layer on the crop's voxels (16-voxel cells), exactly over the crop
    mask_layers = {s: layer(viewer, MASK_LAYER.format(s)) for s in expected}
    for strategy, mask_layer in mask_layers.items():
        assert mask_layer.data.shape == preview.image.shape
        assert int(mask_layer.data.sum()) == expected[strategy] * 16**3
        assert tuple(mask_layer.translate) == pytest.approx(tuple(preview.image_translate))
        np.testing.assert_array_equal(mask_layer.data[::16, ::16, ::16], preview.masks[strategy])
    assert all(x.visible == (s == RUN_MASK) for s, x in mask_layers.items())

    # a new ratio redraws the masks (and the crop's maps) in the same layers; the titles say the share hidden
    n_layers = len(viewer.layers)
    dock.ratio.value = 0.3
    assert wait_until(lambda: dock.running, 10)
    finish(dock)
    k = masked_count(cells, 0.3)
    assert int(dock.result.preview.masks["random"].sum()) == k
    assert int(dock.result.preview.masks[RUN_MASK].sum()) == k
    assert int(layer(viewer, MASK_LAYER.format("random")).data.sum()) == k * 16**3
    assert all(layer(viewer, MASK_LAYER.format(s)) is x for s, x in mask_layers.items())
    assert len(viewer.layers) == n_layers and layer(viewer, MEAN_LAYER) is mean
    titles = [dock.masks_figure.tile_axes(("mask", 0, s)).get_title() for s in PREVIEW_STRATEGIES]
    shares = [float(dock.result.preview.masks[s].mean()) for s in PREVIEW_STRATEGIES]
    assert titles == [f"{s} {share:.0%}" for s, share in zip(PREVIEW_STRATEGIES, shares, strict=True)]
    assert dock.masks_figure.tile_axes(("mask", 0, RUN_MASK)).get_title() == f"this run {k / cells:.0%}"

    assert mask_layers[RUN_MASK].contour == 1  # outlines by default: the map under the mask stays readable
    dock.contour.value = False
    assert mask_layers[RUN_MASK].contour == 0
    dock.show_mask.value = "none"
    assert not any(x.visible for x in mask_layers.values())


def test_an_untrained_run_is_read_as_flat_and_random_and_the_dock_says_so(make_napari_viewer, ct, tiny_run):
    """Three steps change nothing readable: every head flat, in the tiles and the layer names, and the checks say
    the maps are indistinguishable from random initialisation, with diversity not above chance."""
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    assert dock.compute()
    finish(dock)
    stats = dock.result.stats
    assert all(v["flat"] for v in stats["heads"].values()) and stats["mean"]["flat"]
    titles = [dock.heads_figure.tile_axes(("head", 0, h)).get_title() for h in range(4)]
    assert all(t.endswith("· flat") and "peak" in t for t in titles)
    assert layer(viewer, HEADS_LAYER).name == HEADS_LAYER + " (all flat)"
    assert layer(viewer, MEAN_LAYER).name == MEAN_LAYER + " (flat)"
    sentences = [label.text() for label in dock.check_labels]
    assert any("indistinguishable from random initialisation" in t for t in sentences)
    assert any("Head diversity is not above chance" in t for t in sentences)
    assert all(label.toolTip() for label in dock.check_labels)  # the figures behind each sentence
    assert "not above chance" in dock.diversity_text.text()


def test_the_default_colour_scale_is_the_same_for_every_head_and_run_and_a_stretch_says_so(
    make_napari_viewer, ct, tiny_run, tmp_path
):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    dock.compare.value = str(twin)
    assert dock.compute()
    finish(dock)
    first, second = layer(viewer, MEAN_LAYER), layer(viewer, MEAN_LAYER.replace(":", " (second run):"))
    click_tile(dock.heads_figure, ("mean", 1))
    second = layer(viewer, MEAN_LAYER.replace(":", " (second run):"))
    assert tuple(first.contrast_limits) == tuple(second.contrast_limits) == pytest.approx((0.25, 4.0))
    norm = dock.heads_figure._artists[("head", 0, 1)]["overlay"].norm
    assert type(norm).__name__ == "LogNorm" and (norm.vmin, norm.vmax) == (0.25, 4.0)
    # a percentile stretch only when asked, and then the dock says it is stretched and gives the real range
    dock.stretch.value = True
    low, high = np.percentile(
        np.concatenate([dock.result.maps.maps.ravel(), dock.compared.maps.maps.ravel()]), (1, 99)
    )
    assert tuple(first.contrast_limits) == pytest.approx((low, high), rel=1e-4)
    assert "STRETCHED" in dock.contrast_line.text() and "the maps span" in dock.contrast_line.text()


def test_small_multiples_follow_the_slice_and_a_click_shows_the_tile(
    make_napari_viewer, ct, organs, tiny_run
):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run, organs)
    ct_layer = viewer.layers["ct"]
    dock.strategies.value = "all"
    assert dock.compute()
    finish(dock)
    assert wait_until(lambda: not dock._organ_runner.running, 60)
    preview, maps = dock.result.preview, dock.result.maps
    figure = dock.heads_figure
    assert figure.tile_keys() == [("mean", 0)] + [("head", 0, h) for h in range(4)]
    keys = [("mask", 0, s) for s in (RUN_MASK, *PREVIEW_STRATEGIES)] + [("dropped", 0)]
    assert dock.masks_figure.tile_keys() == keys

    def show_slice(z_world: float) -> float:
        """Move napari's slider (it snaps to the CT's slices); the world position napari shows."""
        viewer.dims.set_point(viewer.dims.ndim - 3, z_world)
        shown = float(viewer.dims.point[viewer.dims.ndim - 3])
        assert shown == pytest.approx(z_world, abs=1.6)
        wait_until(lambda: False, 0.3)  # the coalescing timer redraws the tiles
        assert dock.slice_view().world == pytest.approx(shown)
        return shown

    # two slices inside the crop, one token apart: each tile is the CT's own voxels and that head's token plane
    token_z = maps.translate[0] + maps.scale[0] * np.arange(maps.maps.shape[1])
    seen = []
    for z_world in token_z:
        z_world = show_slice(float(z_world))
        z_index = int(round(ct_layer.world_to_data((z_world, 0, 0))[0]))
        background = figure.background_data(("head", 0, 1))
        assert background.shape[0] > 1 and np.isin(background, ct.array[z_index]).all()
        plane = maps.maps[1, int(round((z_world - maps.translate[0]) / maps.scale[0]))]
        np.testing.assert_allclose(figure.overlay_data(("head", 0, 1)), plane, rtol=1e-6)
        seen.append((background, figure.overlay_data(("head", 0, 1))))
    assert not np.array_equal(seen[0][0], seen[1][0])  # the slice changed: so did the tiles
    assert not np.array_equal(seen[0][1], seen[1][1])
    # a mask tile is the strategy's cells on that slice (NaN where nothing is hidden)
    cell_z = int(round((z_world - preview.mask_translate[0]) / preview.mask_scale[0]))
    mask_tile = dock.masks_figure.overlay_data(("mask", 0, "attention-high"))
    np.testing.assert_array_equal(np.nan_to_num(mask_tile), preview.masks["attention-high"][cell_z])

    # a click on head 2 shows the heads layer at head 2 (the mean hidden); a click on a mask shows that mask alone
    click_tile(figure, ("head", 0, 2))
    heads = layer(viewer, HEADS_LAYER)
    assert heads.visible and not layer(viewer, MEAN_LAYER).visible
    assert viewer.dims.point[viewer.dims.ndim - 4] == pytest.approx(2.0)
    assert figure.selected == ("head", 0, 2)
    click_tile(dock.masks_figure, ("mask", 0, "block"))
    shown = [s for s in (RUN_MASK, *PREVIEW_STRATEGIES) if layer(viewer, MASK_LAYER.format(s)).visible]
    assert shown == ["block"] and dock.show_mask.value == "block"
    click_tile(figure, ("mean", 0))
    assert layer(viewer, MEAN_LAYER).visible and not heads.visible

    # attention per organ: a table whose rows move the viewer to the organ
    panel = dock.organ_panel
    assert panel.table.rowCount() > 3 and panel.head.value == "mean"
    table = dock.result.organs
    assert list(table.columns) == ["head", "id", "organ", "attention_share", "volume_share", "enrichment"]
    row = next(r for r in range(panel.table.rowCount()) if panel.organ_of_row(r)[1] == "liver")
    organ = panel.organ_of_row(row)[0]
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    rect = panel.table.visualItemRect(panel.table.item(row, 1))
    QTest.mouseClick(
        panel.table.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, rect.center()
    )
    z_liver = organ_focus(np.asarray(viewer.layers["organs"].data), organ, 0)[0]
    assert viewer.dims.point[viewer.dims.ndim - 3] == pytest.approx(
        ct_layer.data_to_world((z_liver, 0, 0))[0]
    )
    assert wait_until(
        lambda: dock.slice_view().world == pytest.approx(ct_layer.data_to_world((z_liver, 0, 0))[0]), 5
    )
    # the CT and every layer removed (napari then has 2 dims): the tiles keep their slice, no exception in Qt's
    # timer (that aborted a script before)
    keys = figure.tile_keys()
    viewer.layers.clear()
    dock.redraw_slice()
    assert figure.tile_keys() == keys


def test_two_runs_side_by_side_with_their_difference(
    make_napari_viewer, ct, tiny_run, tmp_path, notifications
):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)  # the same run: every difference is 0
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    dock.compare.value = str(twin)
    assert dock.compute()
    finish(dock)
    assert dock._runner.last_error is None and dock.compared is not None
    keys = dock.heads_figure.tile_keys()
    assert ("head", 1, 3) in keys and ("difference",) in keys
    assert ("mask", 1, RUN_MASK) in dock.masks_figure.tile_keys()
    np.testing.assert_allclose(viewer.layers[DIFFERENCE_LAYER].data, 0.0, atol=1e-6)
    # the second run's tiles show the same masks (same crop and seed) and make their layer when clicked
    np.testing.assert_array_equal(dock.compared.preview.masks[RUN_MASK], dock.result.preview.masks[RUN_MASK])
    assert layer(viewer, MASK_LAYER.format(RUN_MASK)).visible
    click_tile(dock.heads_figure, ("head", 1, 3))
    second = layer(viewer, HEADS_LAYER.replace(":", " (second run):"))
    assert second.visible and not layer(viewer, HEADS_LAYER).visible
    # a head shown alone: its slider is named, no mask lies over it, the canvas' one colour bar is its (issue 27)
    assert second.colorbar.visible and not layer(viewer, MEAN_LAYER).colorbar.visible
    heads_axis = viewer.dims.ndim - second.ndim
    assert viewer.dims.axis_labels[heads_axis] == "head" and viewer.dims.point[heads_axis] == 3
    assert not [m for m in dock.layers.mask_layers() if m.visible]
    # the same run twice: their maps agree completely
    assert dock.result.stats["comparison"]["correlation"] == pytest.approx(1.0)
    # both runs' head diversity, with each run's probe figure
    lines = dock.diversity_text.text().splitlines()
    assert len(lines) == 2 and all("on its probe crops at step 3" in line for line in lines)
    assert len(dock.model_line.text().splitlines()) == 2
    assert not error_lines(notifications)


def test_compare_refuses_a_run_of_another_architecture_in_one_line(
    make_napari_viewer, ct, tiny_run, tiny_run_2d, notifications
):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    dock.compare.value = str(tiny_run_2d)
    assert dock.compute()
    finish(dock)
    errors = error_lines(notifications)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "cannot compare" in errors[0] and "dims" in errors[0]
    assert dock.compared is None and layer(viewer, MEAN_LAYER) is None
    assert dock.compute_button.text() == "Compute" and not dock.running


def test_2d_subtoken_maps_smooth_and_3d(make_napari_viewer, ct, tiny_run_2d):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run_2d)
    image = viewer.layers["ct"]
    z = 70
    viewer.dims.set_point(0, image.data_to_world((z, 0, 0))[0])
    dock.scope.value = "slice"
    dock.subtoken.value = 2
    assert dock.compute()
    finish(dock)
    mean = layer(viewer, MEAN_LAYER)
    assert mean.data.shape[0] == 1  # one axial slice
    # half a token in plane: 16 voxels of 3 mm / 2; placed on the displayed slice, covering the image in plane
    assert tuple(mean.scale[1:]) == pytest.approx((24.0, 24.0))
    assert mean.translate[0] == pytest.approx(image.data_to_world((z, 0, 0))[0])
    image_lo, image_hi = edges(image)
    map_lo, map_hi = edges(mean)
    np.testing.assert_allclose(map_lo[1:], image_lo[1:], atol=0.5)
    assert np.all(map_hi[1:] >= image_hi[1:] - 1.5) and np.all(map_hi[1:] < image_hi[1:] + mean.scale[1:])
    assert "1/2 token" in dock.model_line.text()

    # smooth / raw grid: one click, no computation
    dock.smooth.value = True
    assert mean.interpolation2d == "linear" and not dock.running
    dock.smooth.value = False
    assert mean.interpolation2d == "nearest"

    # 3D: an iso surface at the threshold (default: the 90th percentile of the mean map) drawn over the CT, or
    # the MIP of what is above it (transparent below, so the CT shows through)
    threshold = dock.threshold.value
    assert threshold == pytest.approx(np.percentile(mean.data, 90.0), abs=0.01)
    dock.toggle_3d()
    assert viewer.dims.ndisplay == 3
    assert mean.rendering == "iso" and mean.iso_threshold == pytest.approx(threshold)
    assert mean.blending == "translucent"
    dock.rendering.value = "mip"
    dock.threshold.value = threshold + 0.02
    assert mean.rendering == "mip" and mean.contrast_limits[0] == pytest.approx(threshold + 0.02)
    assert mean.colormap.colors[0][3] == 0.0  # the bottom of the scale is transparent
    dock.toggle_3d()
    assert mean.blending == "additive"
    assert tuple(mean.contrast_limits) == pytest.approx((0.25, 4.0))  # back in 2D: the whole scale again


def test_a_method_without_class_attention_says_so_and_shows_its_pictures(
    make_napari_viewer, ct, tiny_run, mim_run, notifications
):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    assert dock.compute()
    finish(dock)
    assert layer(viewer, MEAN_LAYER) is not None
    assert list(dock.strategies.choices) == ["run", "all"] and dock.noise_rate.enabled
    dock.set_run(str(mim_run))
    # MiM hides no cells and has no teacher: no strategy to choose, no teacher noise, even after napari resets
    # the choices (it does on every layer change)
    dock.strategies.reset_choices()
    assert list(dock.strategies.choices) == ["run"] and not dock.strategies.enabled
    assert not dock.noise_rate.enabled and "trains no teacher" in dock.noise_rate.tooltip
    assert dock.compute()
    finish(dock)
    # no maps (the dagman run's are gone), no masks chosen by an untrained attention; the method's pictures instead
    assert (
        dock.result.maps is None and layer(viewer, MEAN_LAYER) is None and layer(viewer, HEADS_LAYER) is None
    )
    assert "does not train the class attention" in dock.model_line.text()
    assert "no attention to show" in dock.heads_reading.text()
    assert any("does not train the class attention" in m for s, m in notifications if s == "warning")
    pictures = [k for k in dock.heads_figure.tile_keys() if k[0] == "picture"]
    assert pictures and not [k for k in dock.heads_figure.tile_keys() if k[0] in ("head", "mean")]
    # MiM hides no cells of its crop (its masks are its levels, a picture): no cell-mask tiles
    assert dock.masks_figure.tile_keys() == []
    assert layer(viewer, MASK_LAYER.format("attention-high")) is None
    click_tile(dock.heads_figure, pictures[0])
    shown = viewer.layers[f"method: {pictures[0][2]}"]
    assert shown.visible


def test_whole_volume_maps_cover_the_image_and_export_with_its_geometry(
    make_napari_viewer, ct, tiny_run, tmp_path
):
    viewer, dock = make_dock(make_napari_viewer, ct, tiny_run)
    dock.scope.value = "volume"
    assert dock.compute()  # a child process: sliding windows over the whole CT
    finish(dock)
    image, mean = viewer.layers["ct"], layer(viewer, MEAN_LAYER)
    image_lo, image_hi = edges(image)
    map_lo, map_hi = edges(mean)
    token = np.asarray(mean.scale)
    # same first edge; the last token reaches past the CT by less than one token (the grid is whole tokens)
    np.testing.assert_allclose(map_lo, image_lo, atol=0.5)
    assert np.all(map_hi >= image_hi - 2.0) and np.all(map_hi < image_hi + token)
    assert dock.result.maps.windows > 1
    # the head tiles show the whole slice of the CT (the maps cut to its extent)
    region = dock.heads_figure.rows[0].region
    np.testing.assert_allclose(region[:, 0], image_lo, atol=0.5)
    np.testing.assert_allclose(region[:, 1], image_hi, atol=0.5)

    # export on the CT's grid: same shape and geometry as the CT; on the token grid: the token size
    assert dock.export(str(tmp_path / "on-ct"))
    assert dock._export_runner.wait(120)
    exported = read_volume(tmp_path / "on-ct" / "attention_volume_mean.nii.gz")
    assert exported.same_grid(ct)
    mask = read_volume(tmp_path / "on-ct" / f"mask_{RUN_MASK}.nii.gz")
    assert mask.same_grid(ct) and set(np.unique(mask.array)) <= {0, 1}
    dock.on_image_grid.value = False
    assert dock.export(str(tmp_path / "tokens"))
    assert dock._export_runner.wait(120)
    coarse = read_volume(tmp_path / "tokens" / "attention_volume_head0.nii.gz")
    assert coarse.spacing == pytest.approx(tuple(token))
    assert coarse.shape == mean.data.shape


def test_bad_input_gives_a_notification_not_a_traceback(
    make_napari_viewer, ct, organs, tiny_run, tiny_run_2d, tmp_path, notifications
):
    def last_error() -> str:
        errors = error_lines(notifications)
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

    # a folder that is not a run, as the run or as the run to compare with
    empty = tmp_path / "empty"
    empty.mkdir()
    dock.set_run(str(empty))
    assert not dock.compute() and "not a napari-dagman run folder" in last_error()
    dock.set_run(str(tiny_run))
    dock.compare.value = str(empty)
    assert not dock.compute() and "not a napari-dagman run folder" in last_error()
    dock.compare.line_edit.value = (
        ""  # cleared as a user clears it (a FileEdit set to "" reads the working folder)
    )

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
    assert all("\n" not in m for m in error_lines(notifications))


def test_last_run_button_takes_the_run_trained_in_the_pretraining_dock(make_napari_viewer, ct, tiny_run):
    Settings("runs").set("last_run", str(tiny_run))
    _, dock = make_dock(make_napari_viewer, ct)
    assert dock.run.line_edit.value == str(tiny_run)  # prefilled
    dock.run.value = ""
    dock.use_last_run()
    assert dock.run.line_edit.value == str(tiny_run)
