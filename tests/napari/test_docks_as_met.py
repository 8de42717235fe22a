"""The docks as a radiology researcher meets them (issue 13), in a real napari window under Xvfb (1600 x 1000):
they fit the screen, start from what is open, warn about a label map given as a CT, refuse a wrong run folder at
Start, show every result layer the switch names, jump to the reference organ, keep a resumed run's curves, run
from a script without a main guard, and end a run cleanly when napari closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_dagman._layers import image_layer_data
from napari_dagman._widgets.clusters.dock import ClustersWidget
from napari_dagman._widgets.common import JobDock, dock_widget_of
from napari_dagman._widgets.common.loading import inner_dock
from napari_dagman._widgets.results.dock import SegmentationResultsWidget
from napari_dagman._widgets.training.finetune import FinetuneWidget
from napari_dagman._widgets.training.pretrain import PretrainWidget
from napari_dagman._widgets.window import WindowWidget
from napari_dagman.core.phantom import make_phantom

DOCKS = (
    "CT window",
    "Pretraining",
    "Attention & mask explorer",
    "Organ clusters",
    "Fine-tuning",
    "Segmentation results",
    "Lesion classification",
)


def spin(seconds: float, until=None) -> bool:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        if until is not None and until():
            return True
        time.sleep(0.02)
    return until is None


def open_pair(
    viewer, shared_data: Path, image: str = "example_ct_sm.nii.gz", labels: str = "example_seg.nii.gz"
):
    viewer.open(shared_data / image, plugin="napari-dagman")
    viewer.open(shared_data / labels, plugin="napari-dagman")
    return viewer.layers[-2], viewer.layers[-1]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(40, 48, 48), spacing=(4.0, 4.0, 4.0))


# --- screen and layout ----------------------------------------------------------------------------------------
def test_all_docks_fit_a_1600x1000_screen_and_open_as_tabs_of_one_another(make_napari_viewer, shared_data):
    viewer = make_napari_viewer(show=True)
    open_pair(viewer, shared_data)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    docked = {}
    for name in DOCKS:
        dock, widget = viewer.window.add_plugin_dock_widget("napari-dagman", name)
        assert spin(60, until=lambda w=widget: inner_dock(w) is not None), name
        docked[name] = (dock, inner_dock(widget))
        spin(0.3)
        # the window never grows past the screen, whichever docks are open
        assert window.frameGeometry().height() <= 1000 and window.height() <= 1000, name
    for name, (_, widget) in docked.items():
        if isinstance(widget, JobDock):
            assert widget._scroll is not None and widget._scroll.widget().layout() is not None, name
    # every dock's body scrolls: the pretraining dock's form is taller than the room it is given
    pretrain = docked["Pretraining"][1]
    assert pretrain._scroll.verticalScrollBar().maximum() > 0
    # the job docks open as tabs of one another (from the Plugins menu they stacked as slivers), the window strip
    # stays on its own
    jobs = [docked[name][0] for name in DOCKS[1:]]
    for dock in jobs[1:]:
        assert dock in window.tabifiedDockWidgets(jobs[0])
    assert docked["CT window"][0] not in window.tabifiedDockWidgets(jobs[0])


# --- starting from what is open --------------------------------------------------------------------------------
def test_every_dock_starts_from_the_open_ct_and_its_labels(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    ct, seg = open_pair(viewer, shared_data)
    pretrain, finetune = PretrainWidget(viewer), FinetuneWidget(viewer)
    clusters, results, window = (
        ClustersWidget(viewer),
        SegmentationResultsWidget(viewer),
        WindowWidget(viewer),
    )
    assert pretrain.layers.value == [ct]
    assert (finetune.image.value, finetune.labels.value) == (ct, seg)
    assert finetune.offered_organs[5] == "liver"  # the organ list is filled from the preselected labels
    assert (clusters.image.value, clusters.labels.value) == (ct, seg)
    assert (results.image.value, results.reference.value) == (ct, seg)
    assert results.prediction.value is None  # the user's labels are the reference, not a prediction
    assert window._layer.value is ct
    window._preset.value = "lung"  # choosing a preset applies it
    assert tuple(ct.contrast_limits) == (-1350.0, 150.0)


def test_docks_opened_first_pick_the_ct_when_it_is_opened(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    pretrain, finetune, window = PretrainWidget(viewer), FinetuneWidget(viewer), WindowWidget(viewer)
    assert pretrain.layers.value == [] and finetune.labels.value is None and window._layer.value is None
    ct, seg = open_pair(viewer, shared_data)
    assert pretrain.layers.value == [ct] and window._layer.value is ct
    assert (finetune.image.value, finetune.labels.value) == (ct, seg)
    assert 5 in finetune.offered_organs
    # a second CT does not take the choice away; the active one is the choice of a dock opened now
    other = viewer.add_image(np.asarray(ct.data), scale=ct.scale, translate=ct.translate, name="copy")
    assert pretrain.layers.value == [ct]
    viewer.layers.selection.active = other
    assert PretrainWidget(viewer).layers.value == [other]


def test_a_label_map_given_as_the_ct_is_refused_at_start(make_napari_viewer, shared_data, tmp_path, notifications):
    from napari_dagman._widgets.common.jobs import pretrain_job
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.io import read_volume

    viewer = make_napari_viewer()
    seg = read_volume(shared_data / "example_seg.nii.gz")
    data, kwargs, _ = image_layer_data(seg, name="seg as image")
    layer = viewer.add_image(data, **kwargs)  # opened as an image (another reader, or a script)
    dock = PretrainWidget(viewer)
    dock.layers.value = [layer]
    dock.runs_folder.value = str(tmp_path)
    assert dock.start() is False  # refused at Start, nothing launched
    errors = [m for s, m in notifications if s == "error"]
    assert errors and "'seg as image' looks like a label map" in errors[-1] and "\n" not in errors[-1]
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no run folder
    # the refusal offers "It is a CT"; the CT window dock's checkbox shows the same mark, and Start then goes on
    dock._read_as_ct("seg as image")
    assert layer.metadata["is_ct"] is True
    window = WindowWidget(viewer)
    window._layer.value = layer
    assert window._is_ct.value is True
    window._is_ct.value = False
    assert layer.metadata["is_ct"] is False
    with pytest.raises(DagmanInputError, match="NAPARI_DAGMAN_IMAGE_IS_CT=1"):
        dock.build_job()
    window._is_ct.value = True
    assert dock.build_job()[1]  # the layer's volume goes to the job
    # the real CT is not refused
    ct = viewer.open(shared_data / "example_ct_sm.nii.gz", plugin="napari-dagman")[0]
    dock.layers.value = [ct]
    count = len(notifications)
    dock.build_job()
    assert not [m for s, m in notifications[count:] if "label map" in m]
    # a label-map file given to pretrain (the child process reads files itself): refused before any step
    config = PretrainConfig(
        images=[str(shared_data / "example_seg.nii.gz")], out=str(tmp_path / "x"), preset="tiny"
    )
    with pytest.raises(DagmanInputError, match="example_seg.nii.gz' looks like a label map"):
        list(pretrain_job(config))
    assert not (tmp_path / "x").exists()


# --- run folders checked at Start ------------------------------------------------------------------------------
def test_run_folders_are_checked_at_start(
    make_napari_viewer, shared_data, tiny_run, ft_run, tmp_path, notifications
):
    viewer = make_napari_viewer()
    open_pair(viewer, shared_data, "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")
    dock = FinetuneWidget(viewer)
    dock.runs_folder.value, dock.device.value, dock.organs.value = str(tmp_path), "cpu", [5]
    errors = lambda: [m for s, m in notifications if s == "error"]  # noqa: E731
    empty = tmp_path / "empty"
    empty.mkdir()
    for init, said in (
        (empty, "not a napari-dagman run folder"),
        (ft_run, "is a finetune run, not a pretraining"),
    ):
        dock.init_run.value = str(init)
        started = time.monotonic()
        assert not dock.start() and not dock.running
        assert said in errors()[-1] and "\n" not in errors()[-1]
        assert time.monotonic() - started < 30  # said at once, not after a child process has started
        assert dock.status.text().startswith("not started:")
    # a pretraining run given to resume a fine-tuning run
    dock.init_run.value = str(tiny_run)
    dock.resume_from.value = str(tiny_run)
    assert not dock.start() and "is a pretrain run, not a fine-tuning run" in errors()[-1]
    # a new run over an old one
    dock.resume_from.line_edit.value = ""
    dock.runs_folder.value, dock.run_name.value = str(ft_run.parent), ft_run.name
    assert not dock.start() and "already holds a run" in errors()[-1] and "'resume from'" in errors()[-1]
    # the results dock: a pretraining run where a fine-tuned one is expected
    results = SegmentationResultsWidget(viewer)
    results.checkpoint.value = str(tiny_run)
    assert not results.predict() and "is a pretrain run, not a fine-tuning run" in errors()[-1]
    # core messages name command-line flags; a dock names its own fields
    assert dock.user_text("move the slab (--val-position)") == "move the slab ('slab position')"


def test_fine_tuning_says_at_start_which_organs_the_validation_slab_misses(
    make_napari_viewer, shared_data, tiny_run, tmp_path, notifications
):
    viewer = make_napari_viewer()
    open_pair(viewer, shared_data, "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")
    dock = FinetuneWidget(viewer)
    dock.init_run.value, dock.runs_folder.value, dock.device.value = str(tiny_run), str(tmp_path), "cpu"
    dock.spacing.value, dock.roi.value = 6.0, 64
    dock.organs.value = [20, 21]  # colon and urinary bladder (pelvis)
    dock.val_fraction.value, dock.val_position.value = 0.25, 0.75  # a slab in the upper abdomen
    assert not dock.start() and not dock.running
    warning = [m for s, m in notifications if s == "warning"][-1]
    assert "holds no urinary_bladder" in warning and "--" not in warning
    assert "'slab position' 0.35 holds 2 of the 2 organs" in warning  # the dock's field, and the alternative
    assert dock.status.text().startswith("not started:")
    dock._move_slab(0.35)  # the notification's "Move the slab to 0.35"
    assert dock.val_position.value == pytest.approx(0.35)
    assert dock._ready(*dock.build_job())  # that slab holds both: nothing to say
    # a slab that cannot hold both is said once; Start again starts anyway
    dock.organs.value = [5, 21]
    dock.val_position.value = 0.75
    assert not dock._ready(*dock.build_job()) and dock._ready(*dock.build_job())
    # ROI and spacing left on auto say what the run will use
    dock.spacing.value = None
    assert dock.spacing.native.placeholderText() == "auto: 4 mm (the pretraining run's)"


# --- results you can trust -----------------------------------------------------------------------------------
def test_results_switch_sets_every_result_layer_and_rows_land_on_the_reference(
    make_napari_viewer, shared_data
):
    viewer = make_napari_viewer()
    ct, ref = open_pair(viewer, shared_data)
    reference = np.asarray(ref.data)
    colon = reference == 20
    z = int(np.argmax(colon.sum(axis=(1, 2))))
    # a "prediction" that misses the colon on its largest slice and has a small colon blob far from it
    predicted = reference.copy()
    predicted[z][predicted[z] == 20] = 0
    far = 0 if z > len(reference) // 2 else len(reference) - 1
    predicted[far, 5:8, 5:8] = 20
    pred = viewer.add_labels(
        predicted, scale=ref.scale, translate=ref.translate, name="pred", features=ref.features
    )
    dock = SegmentationResultsWidget(viewer)
    dock.prediction.value, dock.reference.value = pred, ref
    assert dock.evaluate_layers() and dock.wait(120)
    diff = dock.disagreement_layer
    assert diff is not None
    for mode, shown in (
        ("prediction", {pred}),
        ("reference", {ref}),
        ("both (contours)", {pred, ref}),
        ("disagreement", {diff, ref}),
    ):
        dock.view.value = mode
        assert {layer for layer in (pred, ref, diff) if layer.visible} == shown, mode
    assert "false positive" in dock.legend.text() and "wrong organ" in dock.legend.text()
    # its mean Dice says over what (the fine-tuning dock's is over the held-out slab: the two differ)
    assert "mean Dice" in dock.status.text() and "whole CT" in dock.status.text()
    # predicted and reference volumes side by side, full organ names
    header = [dock.table.horizontalHeaderItem(c).text() for c in range(dock.table.columnCount())]
    assert header[:3] == ["organ", "predicted ml", "reference ml"]
    names = [dock.table.item(r, 0).text() for r in range(dock.table.rowCount())]
    assert "adrenal_gland_right" in names
    longest = max(names, key=dock.table.fontMetrics().horizontalAdvance)
    assert dock.table.columnWidth(0) > dock.table.fontMetrics().horizontalAdvance(longest)  # never cut
    row = names.index("colon")
    table = dock.results.table.set_index("organ")
    assert float(dock.table.item(row, 2).text()) == pytest.approx(
        table.loc["colon", "reference_ml"], abs=0.05
    )
    # the colon row: the reference's largest colon slice, not the prediction's blob
    assert dock.go_to_organ(row)
    assert viewer.dims.point[0] == pytest.approx(ref.translate[0] + ref.scale[0] * z)


# --- curves and status ------------------------------------------------------------------------------------------
def test_a_resumed_run_keeps_its_whole_history_with_stable_colours(make_napari_viewer, phantom, tmp_path):
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(phantom[0], name="ct")
    viewer.add_image(data, **kwargs)
    dock = PretrainWidget(viewer)
    dock.preset.value, dock.roi.value, dock.spacing.value, dock.batch_size.value = "tiny", 32, 4.0, 1
    dock.device.value, dock.runs_folder.value, dock.run_name.value = "cpu", str(tmp_path), "history"
    dock.in_process.value = False  # a thread: the curves are the dock's, not the process's
    dock.length.value = 2
    assert dock.lr.value is None  # auto
    assert dock.start() and dock.wait(300) and not dock.last_finished.cancelled
    terms = [name for name in dock.plot._series if name != "loss"]
    colours = {name: dock.plot.colour(name) for name in ("loss", *terms)}
    # resume: the run's settings come back, and what replaced "auto" is said
    dock.resume_from.value = str(tmp_path / "history")
    assert "learning rate auto -> 0.0001" in dock.status.text()
    dock.length.value = 4
    assert dock.start() and dock.wait(300) and not dock.last_finished.cancelled
    assert dock.plot.series("loss")[0] == [1.0, 2.0, 3.0, 4.0]  # the steps before the resume are drawn too
    assert all(dock.plot.series(term)[0] == [1.0, 2.0, 3.0, 4.0] for term in terms)
    assert {name: dock.plot.colour(name) for name in colours} == colours
    lines = dock.plot._lines
    assert lines["loss"].get_zorder() > max(lines[t].get_zorder() for t in terms)  # the total on top
    dock.plot.redraw()
    ticks = dock.plot.axes.get_xticks()
    assert np.allclose(ticks, np.round(ticks))  # whole steps only


def test_notification_buttons_keep_their_ampersand():
    from napari.utils.notifications import notification_manager

    from napari_dagman._widgets.common.notify import notify_info

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        notify_info("done", actions=[("Predict & inspect", lambda *_: None)])
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert seen[-1].actions[0][0] == "Predict && inspect"  # Qt shows "&&" as "&"


# --- scripting and shutdown -------------------------------------------------------------------------------------
SCRIPT = """
    # a user's script: no `if __name__ == "__main__":` guard on purpose
    import sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    with open(out / "script-runs.txt", "a") as fh:
        fh.write("run\\n")  # a child process that imported this script would add a line

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_dagman._layers import image_layer_data
    from napari_dagman._widgets.common import dock_widget_of
    from napari_dagman._widgets.training.pretrain import PretrainWidget
    from napari_dagman.core.phantom import make_phantom

    viewer = napari.Viewer(show=False)
    ct, _ = make_phantom(shape=(40, 48, 48), spacing=(4.0, 4.0, 4.0))
    data, kwargs, _ = image_layer_data(ct, name="ct")
    viewer.add_image(data, **kwargs)
    dock = PretrainWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Pretraining")
    dock.preset.value, dock.roi.value, dock.spacing.value, dock.batch_size.value = "tiny", 32, 4.0, 1
    dock.device.value, dock.runs_folder.value, dock.process_nice = "cpu", str(out), 0
    assert dock.in_process.value  # the default: a child process
    dock.length.value, dock.run_name.value = 2, "two-steps"
    assert dock.start()
    assert dock.wait(600), "the 2-step run did not finish"
    print("FIRST", dock.last_finished.steps_done, dock.last_finished.cancelled, flush=True)

    dock.length.value, dock.run_name.value = 1000, "closed"
    assert dock.start()
    end = time.monotonic() + 600
    while not dock.plot.series("loss")[0] and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.05)
    assert dock.plot.series("loss")[0], "no step"
    dock_widget_of(dock).hide()  # the dock hidden, its run going on
    viewer.close()
    print("CLOSED", flush=True)
    # the interpreter exits here, the run still going
"""


def test_a_script_without_main_guard_trains_and_closing_napari_ends_the_run_cleanly(tmp_path):
    from napari_dagman.core.checkpoint import RESUME_FILE, RunFolder

    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "runs"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=1500, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FIRST 2 False" in done.stdout and "CLOSED" in done.stdout
    assert (out / "script-runs.txt").read_text() == "run\n"  # the child never ran the user's script
    assert RunFolder(out / "two-steps").read_run_info()["status"] == "completed"
    info = json.loads((out / "closed" / "run.json").read_text())
    assert info["status"] == "cancelled" and info["steps_done"] >= 1  # saved and recorded, not left "running"
    assert (out / "closed" / RESUME_FILE).is_file()  # resumable
    assert "Traceback" not in done.stderr and "deleted" not in done.stderr, done.stderr[-3000:]


def test_dock_widget_of_finds_the_dock(make_napari_viewer):
    viewer = make_napari_viewer()
    dock = PretrainWidget(viewer)
    assert dock_widget_of(dock) is None
    viewer.window.add_dock_widget(dock, name="Pretraining")
    assert dock_widget_of(dock) is not None
