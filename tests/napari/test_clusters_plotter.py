"""napari-clusters-plotter (NCP) over our organ-clusters Points layer: it plots our projection, and a cluster drawn
in its plot comes back to our clusters dock as a selection."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from tests.napari.test_clusters_widget import _cache, between, computed, ct_pair, make_dock  # noqa: F401

from napari_dagman._widgets.clusters.dock import POINTS_LAYER, SELECTION_LAYER
from napari_dagman.core.embeddings import selection_mask
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.interop import MANUAL_CLUSTER_COLUMN, manual_cluster_selection, manual_clusters

ncp = pytest.importorskip("napari_clusters_plotter")


def test_ncp_plots_our_projection_and_a_drawn_cluster_selects_patches(make_napari_viewer, ct_pair, tiny_run):  # noqa: F811
    viewer, dock = make_dock(make_napari_viewer, ct_pair, tiny_run)
    computed(dock)
    table = dock.result.table
    points = viewer.layers[POINTS_LAYER]
    with pytest.raises(DagmanInputError, match="no cluster drawn"):
        manual_cluster_selection(points.features)
    assert (
        not dock.select_from_clusters_plotter() and len(dock.selected) == 0
    )  # nothing drawn: a notification

    plotter = ncp.PlotterWidget(viewer)
    viewer.window.add_dock_widget(plotter)
    viewer.layers.selection.active = points  # NCP plots the layers selected in the layer list
    assert plotter.layers == [points]
    x_choices = {
        plotter.control_widget.x_axis_box.itemText(i)
        for i in range(plotter.control_widget.x_axis_box.count())
    }
    assert {"pca_0", "pca_1", "purity", "x_mm"} <= x_choices
    plotter.x_axis, plotter.y_axis = "pca_0", "pca_1"
    xy = table[["pca_0", "pca_1"]].to_numpy()
    np.testing.assert_allclose(plotter.plotting_widget.active_artist.data, xy)

    # draw a rectangle over part of the scatter with NCP's (biaplotter's) rectangle selector, class 1
    corner = (between(xy[:, 0], 5), between(xy[:, 1], 5))
    far = (between(xy[:, 0], 60), between(xy[:, 1], 70))
    selector = plotter.plotting_widget.selectors["RECTANGLE"]
    selector.on_select(
        SimpleNamespace(xdata=corner[0], ydata=corner[1]), SimpleNamespace(xdata=far[0], ydata=far[1])
    )
    selector.apply_selection()
    inside = np.flatnonzero(
        (xy[:, 0] >= corner[0]) & (xy[:, 0] <= far[0]) & (xy[:, 1] >= corner[1]) & (xy[:, 1] <= far[1])
    )
    assert 0 < len(inside) < len(table)
    assert MANUAL_CLUSTER_COLUMN in points.features.columns and plotter.hue_axis == MANUAL_CLUSTER_COLUMN

    # ... which our dock reads back as a selection of those patches
    ids = manual_cluster_selection(points.features)
    np.testing.assert_array_equal(ids, table["patch_id"].to_numpy()[inside])
    assert list(manual_clusters(points.features)) == [1]
    assert dock.select_from_clusters_plotter()  # the dock's "From clusters plotter" button
    np.testing.assert_array_equal(dock.selected, ids)
    shown = viewer.layers[SELECTION_LAYER].data
    np.testing.assert_array_equal(np.asarray(shown) > 0, selection_mask(dock.result.embeddings, ids) > 0)
    assert set(points.selected_data) == set(ids.tolist())
    assert f"{len(ids)} patches selected" in dock.status.text()
