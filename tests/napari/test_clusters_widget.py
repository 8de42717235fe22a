"""Organ-clusters dock in a real viewer: compute, click -> viewer, lasso -> patches, viewer -> plot, bad input."""

from __future__ import annotations

import types

import numpy as np
import pytest

from napari_dagman._layers import image_layer_data, labels_layer_data
from napari_dagman._widgets.clusters.dock import (
    PICKED_LAYER,
    POINTS_LAYER,
    SELECTION_LAYER,
    ClustersWidget,
)
from napari_dagman.core.embeddings import selection_mask
from napari_dagman.core.io import read_volume
from napari_dagman.core.volume import Volume


def crop(volume: Volume, start, size) -> Volume:
    region = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    origin = tuple(volume.index_to_physical(np.asarray(start, float)))
    return Volume(
        volume.array[region].copy(), volume.spacing, origin, volume.direction, dict(volume.metadata)
    )


@pytest.fixture(scope="module")
def ct_pair(shared_data):
    """A 129 mm cube of the real CT around the liver and its labels (one encoder window at 4 mm)."""
    image = read_volume(shared_data / "example_ct.nii.gz")
    labels = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    return crop(image, (69, 20, 20), (43, 43, 43)), crop(labels, (69, 20, 20), (43, 43, 43))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NAPARI_DAGMAN_CACHE", str(tmp_path_factory.getbasetemp() / "embedding-cache"))


def make_dock(make_napari_viewer, ct_pair, run):
    viewer = make_napari_viewer()
    image, labels = ct_pair
    data, kwargs, _ = image_layer_data(image, name="ct")
    image_layer = viewer.add_image(data, **kwargs)
    data, kwargs, _ = labels_layer_data(labels, name="organs")
    labels_layer = viewer.add_labels(data, **kwargs)
    dock = ClustersWidget(viewer)
    viewer.window.add_dock_widget(dock)
    dock.image.value, dock.labels.value = image_layer, labels_layer
    dock.run.value = str(run)
    dock.method.value = "pca"  # real UMAP lives in one core test (numba compiles for 15-60 s)
    # millimetres: at the run's 4 mm, 8 and 4 voxels; the lattice only, for a known count of patches
    dock.patch_mm.value, dock.stride_mm.value, dock.sampling.value = 32.0, 16.0, "grid"
    return viewer, dock


def between(values: np.ndarray, q: float) -> float:
    """A value near the q-th percentile that no point has (many air patches share one position)."""
    unique = np.unique(values)
    i = int(np.clip(np.searchsorted(unique, np.percentile(values, q)), 1, len(unique) - 1))
    return float(unique[i - 1] + unique[i]) / 2.0


def computed(dock) -> None:
    dock.compute()
    assert dock.runner.wait(180), "the embedding job did not finish"
    assert dock.result is not None, dock.status.text()


@pytest.fixture
def dock(make_napari_viewer, ct_pair, tiny_run):
    viewer, dock = make_dock(make_napari_viewer, ct_pair, tiny_run)
    computed(dock)
    return viewer, dock


def test_compute_gives_points_with_features_and_a_scatter(dock):
    viewer, dock = dock
    table = dock.result.table
    points = viewer.layers[POINTS_LAYER]
    assert len(points.data) == len(table) == 7**3
    assert {"pca_0", "pca_1", "organ", "cluster", "purity", "x_mm"} <= set(points.features.columns)
    assert (points.features["organ"] == table["organ"]).all()
    # the points sit in the CT's voxel grid: same placement, centres inside the image
    image = viewer.layers["ct"]
    assert np.allclose(points.scale, image.scale) and np.allclose(points.translate, image.translate)
    assert ((points.data >= 0) & (points.data < np.array(image.data.shape))).all()
    assert len(dock.scatter.xy) == len(table) and len(dock.scatter.drawn) == len(table)
    # a plain reading on one line; the figures one click away, each with its explanation
    assert dock.metrics.text().startswith(("Organs separate", "The clusters follow", "Not enough"))
    assert "\n" not in dock.metrics.text()
    figures = dock._figures_layout
    titles = [
        figures.itemAt(r, figures.ItemRole.LabelRole).widget().text() for r in range(figures.rowCount())
    ]
    assert "NMI (clusters vs organs)" in titles and "k-NN balanced accuracy" in titles
    nmi = figures.itemAt(titles.index("NMI (clusters vs organs)"), figures.ItemRole.FieldRole).widget()
    assert "mutual information" in nmi.toolTip() and float(nmi.text()) == pytest.approx(
        dock.result.metrics["nmi"], abs=1e-3
    )
    # organ colours match the Labels layer's colours
    liver = np.flatnonzero(table["organ"].to_numpy() == "liver")[0]
    organs = viewer.layers["organs"]
    assert np.allclose(points.face_color[liver][:3], organs.colormap.color_dict[5][:3], atol=1e-3)
    dock.colour_by.value = "cluster"
    assert not np.allclose(points.face_color[liver], organs.colormap.color_dict[5])


def test_click_on_a_point_moves_the_viewer_to_its_patch(dock):
    from matplotlib.backend_bases import MouseEvent

    viewer, dock = dock
    scatter = dock.scatter
    scatter.canvas.draw()
    patch = int(np.argmax(dock.result.table["purity"].to_numpy() * (dock.result.table["organ_id"] == 5)))
    x, y = scatter.axes.transData.transform(scatter.xy[patch])
    for name in ("button_press_event", "button_release_event"):
        MouseEvent(name, scatter.canvas, x, y, button=1)._process()
    picked = scatter.nearest(x, y)
    assert picked is not None and np.allclose(scatter.xy[picked], scatter.xy[patch])
    image = viewer.layers["ct"]
    centre = np.asarray(image.translate) + np.asarray(image.scale) * np.round(
        dock.result.embeddings.centres_index()[picked]
    )
    assert viewer.dims.point[0] == pytest.approx(centre[0])  # the slider shows the patch's slice
    assert np.allclose(viewer.camera.center[-2:], centre[1:])  # and the camera is centred on it
    marker = viewer.layers[PICKED_LAYER]
    assert np.allclose(marker.data[0], dock.index[picked])
    assert f"patch {picked}" in dock.status.text() and "liver" in dock.status.text()
    assert viewer.layers.selection.active is viewer.layers["organs"]  # the marker did not steal it


def test_lasso_selects_the_right_patches(dock):
    from matplotlib.backend_bases import MouseEvent

    viewer, dock = dock
    scatter = dock.scatter
    scatter.canvas.draw()
    xy = scatter.xy
    x0, x1 = between(xy[:, 0], 10), between(xy[:, 0], 60)
    y0, y1 = between(xy[:, 1], 20), between(xy[:, 1], 70)
    expected = np.flatnonzero((xy[:, 0] > x0) & (xy[:, 0] < x1) & (xy[:, 1] > y0) & (xy[:, 1] < y1))
    assert 0 < len(expected) < len(xy)
    # drag a lasso around that box with the mouse
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    path = [c for a, b in zip(corners[:-1], corners[1:], strict=True) for c in np.linspace(a, b, 8)]
    pixels = scatter.axes.transData.transform(np.asarray(path))
    MouseEvent("button_press_event", scatter.canvas, *pixels[0], button=1)._process()
    for px, py in pixels[1:]:
        MouseEvent("motion_notify_event", scatter.canvas, px, py, button=1)._process()
    MouseEvent("button_release_event", scatter.canvas, *pixels[-1], button=1)._process()
    assert np.array_equal(dock.selected, expected)
    assert sorted(viewer.layers[POINTS_LAYER].selected_data) == expected.tolist()
    assert np.array_equal(scatter.highlighted, expected)
    mask = viewer.layers[SELECTION_LAYER].data
    assert np.array_equal(mask, selection_mask(dock.result.embeddings, expected))
    centre = np.round(dock.result.embeddings.centres_index()[expected[0]]).astype(int)
    assert mask[tuple(centre)] == 1
    # the viewer moved to the slice that holds most of the selection: what lit up is on screen
    assert shown_slice(viewer) == int(np.argmax(mask.sum(axis=(1, 2))))
    # the rectangle tool, dragged corner to corner, selects the same patches
    dock.select(np.zeros(0, np.int64))
    dock.scatter.tool.value = "rectangle"
    (ax0, ay0), (ax1, ay1) = scatter.axes.transData.transform([(x0, y0), (x1, y1)])
    MouseEvent("button_press_event", scatter.canvas, ax0, ay0, button=1)._process()
    for t in np.linspace(0, 1, 6)[1:]:
        MouseEvent(
            "motion_notify_event", scatter.canvas, ax0 + t * (ax1 - ax0), ay0 + t * (ay1 - ay0)
        )._process()
    MouseEvent("button_release_event", scatter.canvas, ax1, ay1, button=1)._process()
    assert np.array_equal(dock.selected, expected)
    # and the selection can be kept as a Labels layer
    kept = dock.keep_selection()
    assert kept.name == "cluster selection 1" and np.array_equal(kept.data, mask)
    assert np.allclose(kept.scale, viewer.layers["ct"].scale)
    assert kept.metadata["label_names"] == {1: "cluster selection 1"}


def shown_slice(viewer) -> int:
    image = viewer.layers["ct"]
    return int(round((viewer.dims.point[0] - image.translate[0]) / image.scale[0]))


def test_a_selection_away_from_the_slice_on_screen_moves_the_viewer_to_it(dock):
    viewer, dock = dock
    image = viewer.layers["ct"]
    centres = np.round(dock.result.embeddings.centres_index())
    viewer.dims.set_point(0, image.data_to_world((0, 0, 0))[0])  # the first slice on screen
    top = np.flatnonzero(centres[:, 0] == centres[:, 0].max())  # patches at the other end of the volume
    dock.select(top)
    mask = viewer.layers[SELECTION_LAYER].data
    assert not mask[0].any() and mask[shown_slice(viewer)].any()
    assert shown_slice(viewer) == int(np.argmax(mask.sum(axis=(1, 2))))
    # the camera is centred on the selection in that slice
    rows, cols = np.nonzero(mask[shown_slice(viewer)])
    centre = np.asarray(image.translate[1:]) + np.asarray(image.scale[1:]) * (rows.mean(), cols.mean())
    assert np.allclose(viewer.camera.center[-2:], centre, atol=1e-6)
    assert "most of them on slice" in dock.status.text()


def test_viewer_selections_highlight_the_plot(dock):
    viewer, dock = dock
    points = viewer.layers[POINTS_LAYER]
    points.selected_data = {3, 5, 8}
    assert dock.scatter.highlighted.tolist() == [3, 5, 8]
    # a click (press, release) on the liver in the Labels layer rings every liver patch
    organs = viewer.layers["organs"]
    organs.mode = "pan_zoom"
    z, y, x = np.argwhere(organs.data == 5)[len(np.argwhere(organs.data == 5)) // 2]
    world = np.asarray(organs.data_to_world((z, y, x)))
    viewer.dims.set_point(0, world[0])
    event = types.SimpleNamespace(
        type="mouse_press", position=tuple(world), view_direction=None, dims_displayed=[1, 2]
    )
    handler = dock._on_labels_click(organs, event)
    next(handler)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(handler)
    liver = np.flatnonzero(dock.result.embeddings.organ_id == 5)
    assert len(liver) and np.array_equal(dock.scatter.highlighted, liver)
    assert "liver" in dock.status.text()
    assert dock._on_labels_click in organs.mouse_drag_callbacks


def test_exports(dock, tmp_path):
    import pandas as pd

    viewer, dock = dock
    table = dock.export_table(tmp_path / "patches.csv")
    assert len(pd.read_csv(table)) == len(dock.result.table)
    png = dock.save_plot(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000 and png.endswith("plot.png")


def test_bad_inputs_are_one_line_notifications(
    make_napari_viewer, ct_pair, tiny_run, tmp_path, notifications
):
    viewer, dock = make_dock(make_napari_viewer, ct_pair, tiny_run)
    errors = lambda: [m for s, m in notifications if s == "error"]  # noqa: E731

    # labels on another grid
    organs = viewer.layers["organs"]
    shifted = viewer.add_labels(
        organs.data[:, :30], scale=organs.scale, translate=organs.translate, name="cut"
    )
    dock.labels.value = shifted
    dock.compute()
    dock.runner.wait(60)
    assert "not on the image grid" in errors()[-1] and "\n" not in errors()[-1]
    assert dock.result is None

    # a folder that is no run: refused at once, no job started
    dock.labels.value = organs
    (tmp_path / "not_a_run").mkdir()
    dock.run.value = str(tmp_path / "not_a_run")
    assert not dock.compute() and not dock.runner.running
    assert "not a napari-dagman run folder" in errors()[-1]
    assert dock.status.text().startswith("not started:")

    # a volume smaller than one patch
    tiny = viewer.add_image(np.arange(216, dtype=np.float32).reshape(6, 6, 6), scale=(3, 3, 3), name="tiny")
    dock.image.value, dock.labels.value = tiny, None
    dock.run.value = str(tiny_run)
    dock.compute()
    dock.runner.wait(60)
    assert "smaller than one patch" in errors()[-1]

    # no image at all, nothing selected: notified at once, no job started
    viewer.layers.clear()
    assert dock.image.value is None
    dock.compute()
    assert "no image layer" in errors()[-1] and not dock.runner.running
    dock.keep_selection()
    assert "nothing selected" in errors()[-1]
    assert dock.compute_button.enabled and not dock.cancel_button.enabled
