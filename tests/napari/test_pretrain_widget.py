"""Pretraining dock in a real viewer: methods from the registry, a tiny run to the end, cancel, pause, close, bad input.

Runs use the tiny preset at ROI 32 and 4 mm on the phantom, in the dock's default mode (a child process).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from napari_dagman._layers import image_layer_data, labels_layer_data
from napari_dagman._widgets.training.pretrain import (
    PREVIEW_ATTENTION,
    PREVIEW_CROP,
    PREVIEW_MASK,
    PREVIEW_UNSEEN,
    PretrainWidget,
)
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import PreviewEvent, StepEvent
from napari_dagman.core.methods.registry import REGISTRY, register
from napari_dagman.core.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    # a small field of view: one ROI-32 crop at 4 mm fits, and a step takes about a second on 2 cores
    return make_phantom(shape=(40, 48, 48), spacing=(4.0, 4.0, 4.0))


def make_dock(make_napari_viewer, phantom, tmp_path, **form):
    viewer = make_napari_viewer()
    ct, organs = phantom
    data, kwargs, _ = image_layer_data(ct, name="ct")
    layer = viewer.add_image(data, **kwargs)
    data, kwargs, _ = labels_layer_data(organs, name="organs")
    viewer.add_labels(data, **kwargs)
    dock = PretrainWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Pretraining")
    dock.layers.value = [layer]
    dock.preset.value, dock.roi.value, dock.spacing.value = "tiny", 32, 4.0
    dock.batch_size.value = 1
    dock.device.value = "cpu"
    dock.runs_folder.value = str(tmp_path / "runs")
    # the child's lower priority is a speed/responsiveness knob, not behaviour: on a shared test machine
    # nice 10 would make these runs wait for everyone else's jobs
    dock.process_nice = 0
    for name, value in form.items():
        getattr(dock, name).value = value
    return viewer, dock


def record_events(dock):
    """Wrap the dock's event handler: (arrival time, event) of everything the job yields."""
    seen: list[tuple[float, object]] = []
    handler = dock._runner.on_event

    def on_event(event):
        seen.append((time.monotonic(), event))
        handler(event)

    dock._runner.on_event = on_event
    return seen


def wait_until(condition, timeout: float) -> bool:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QApplication.processEvents()
        if condition():
            return True
        time.sleep(0.02)
    return False


def steps_seen(seen) -> int:
    return sum(isinstance(event, StepEvent) for _, event in seen)


def test_methods_listed_are_the_registry(make_napari_viewer, phantom, tmp_path):
    _, dock = make_dock(make_napari_viewer, phantom, tmp_path)
    assert list(dock.method.choices) == list(REGISTRY)
    combo = dock.method.native
    assert [combo.itemText(i) for i in range(combo.count())] == [spec.title for spec in REGISTRY.values()]
    for name, spec in REGISTRY.items():
        dock.method.value = name
        assert dock._method_summary.value.startswith(spec.summary)
        # the method's own options form, rebuilt with this preset's values
        assert dock.method_form.config_class is spec.options_class()
        assert dock.method_form.values() == spec.default_options()
        if "mask_ratio" in spec.defaults:
            assert dock.method_form["mask_ratio"].value == pytest.approx(spec.defaults["mask_ratio"])
        # teacher options only for a method with a teacher (its options class has them; no name is tested)
        if "teacher_noise" in dock.method_form:
            assert spec.capabilities.has_teacher
    # tooltips come from the config's help texts
    assert "multiple of 32" in dock.roi.tooltip


def test_the_config_goes_through_from_dict_with_the_method_options(make_napari_viewer, phantom, tmp_path):
    _, dock = make_dock(make_napari_viewer, phantom, tmp_path, length=7, run_name="built")
    dock.method.value = "smit"
    dock.method_form["mask_ratio"].value = 0.55
    dock.lr.value = "2e-4"
    config, volumes, resume = dock.build_job()
    assert isinstance(config, PretrainConfig) and not resume and len(volumes) == 1
    assert (config.method, config.steps, config.epochs, config.lr) == ("smit", 7, None, 2e-4)
    assert config.method_options().mask_ratio == 0.55
    assert config.method_options().teacher_noise == REGISTRY["smit"].defaults["teacher_noise"]
    dock.length_unit.value = "epochs"
    config, *_ = dock.build_job()
    assert (config.steps, config.epochs) == (None, 7)
    # what the dock builds is checked by PretrainConfig.from_dict: an unknown option is refused
    values = dock.config_values()
    values["options"]["mask_ration"] = 0.5
    with pytest.raises(DagmanInputError, match="did you mean 'mask_ratio'"):
        PretrainConfig.from_dict(values)


def test_tiny_run_finishes_writes_run_folder_and_updates_previews_in_place(
    make_napari_viewer, phantom, tmp_path, notifications
):
    viewer, dock = make_dock(
        make_napari_viewer, phantom, tmp_path, length=3, preview_every=1, run_name="tiny"
    )
    seen = record_events(dock)
    placements = []

    def after_preview(event):
        placements.append(
            (
                len(viewer.layers),
                tuple(id(viewer.layers[name]) for name in (PREVIEW_CROP, PREVIEW_ATTENTION, PREVIEW_MASK)),
                tuple(viewer.layers[PREVIEW_MASK].scale),
            )
        )

    pieces = dock._preview_pieces  # a preview is drawn one layer per event-loop turn: check after its last piece
    dock._preview_pieces = lambda event: [*pieces(event), lambda: after_preview(event)]
    assert dock.start()
    assert dock.start_button.text() == "Cancel"
    assert wait_until(lambda: not dock.running, 240), "the 3-step run did not finish"
    assert dock.drawing.finish()

    run = tmp_path / "runs" / "tiny"
    assert dock.last_finished is not None and not dock.last_finished.cancelled
    assert dock.last_finished.steps_done == 3
    for name in ("config.json", "model.safetensors", "best.safetensors", "resume.safetensors", "run.json"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    # the start, stage by stage (the child process, imports, preparing, the first step), with its time
    stages = [name for name, _ in dock.stages]
    assert stages[:2] == ["starting the background process", "importing torch and MONAI"]
    assert stages[-1] == "first step" and dock.first_step_s > 0
    assert any(message.startswith("first step after") for message in dock.messages)
    # the loss curve has every step, with each loss term
    assert dock.plot.series("loss")[0] == [1.0, 2.0, 3.0]
    terms = next(event for _, event in seen if isinstance(event, StepEvent)).terms
    assert set(terms) and all(dock.plot.series(term)[0] == [1.0, 2.0, 3.0] for term in terms)
    # previews: one layer each, updated in place (same objects, layer count unchanged), at the mask-cell size
    previews = [event for _, event in seen if isinstance(event, PreviewEvent)]
    assert len(previews) == 3 and len(placements) == 3
    assert len({p[0] for p in placements}) == 1 and len({p[1] for p in placements}) == 1
    assert placements[0][0] == 6  # ct, organs + crop, attention, mask, cells the noisy teacher did not see
    assert previews[-1].unseen is not None
    unseen = viewer.layers[PREVIEW_UNSEEN]
    np.testing.assert_array_equal(unseen.data[::16, ::16, ::16], previews[-1].unseen)
    # the mask is drawn as outlines on the crop's 4 mm voxels: 16-voxel cells, 2 x 2 x 2 in a 32-voxel crop
    assert placements[-1][2] == pytest.approx((4.0, 4.0, 4.0))
    mask = viewer.layers[PREVIEW_MASK]
    assert mask.data.shape == (32, 32, 32) and mask.contour == 1
    np.testing.assert_array_equal(mask.data[::16, ::16, ::16], previews[-1].mask)
    attention = viewer.layers[PREVIEW_ATTENTION]
    assert attention.blending == "translucent" and attention.data.shape == (2, 2, 2)
    # the explorer's honest scale: x uniform from 1/4 to 4 on a log colour map, with napari's colour bar
    assert tuple(attention.contrast_limits) == pytest.approx((0.25, 4.0))
    assert "log x uniform" in attention.colormap.name and attention.colorbar.visible
    # the finish notification names the run folder; the dock is idle again
    assert any(str(run) in message for severity, message in notifications if severity == "info")
    assert dock.start_button.text() == "Start" and dock.explore_button.isEnabled()
    # "Explore attention" docks the explorer with this run chosen
    explorer = dock.open_in_explorer()
    assert explorer is not None and explorer.run.line_edit.value == str(run)
    # the previews are hidden at once and removed once the explorer's first job has ended (see open_in_explorer)
    assert not viewer.layers[PREVIEW_MASK].visible and not viewer.layers[PREVIEW_ATTENTION].visible
    assert explorer.compute() and explorer.wait(120)
    assert PREVIEW_MASK not in viewer.layers and PREVIEW_ATTENTION not in viewer.layers


def test_pause_holds_the_run_and_cancel_stops_within_a_step(make_napari_viewer, phantom, tmp_path):
    from napari_dagman.core.checkpoint import load_pretrained_encoder

    _, dock = make_dock(make_napari_viewer, phantom, tmp_path, length=1000, run_name="cancelled")
    seen = record_events(dock)
    assert dock.start()
    # the first steps are slow (allocations, kernel selection): pause once the steps run at their pace
    assert wait_until(lambda: steps_seen(seen) >= 3, 240), "no training steps arrived"

    dock.toggle_pause()
    assert dock.pause_button.text() == "Resume" and dock._runner.paused
    step_seconds = 1.5 * [e.seconds_per_step for _, e in seen if isinstance(e, StepEvent)][-1]
    wait_until(lambda: False, step_seconds + 1.0)  # the step in flight may still report
    held = steps_seen(seen)
    wait_until(lambda: False, 1.5 * step_seconds + 1.0)
    assert steps_seen(seen) == held, "steps went on while paused"
    dock.toggle_pause()
    assert wait_until(lambda: steps_seen(seen) > held, 120), "no step after Resume"

    clicked = time.monotonic()
    dock.start_or_cancel()  # the Start button reads Cancel while running
    assert wait_until(lambda: not dock.running, 60)
    latency = time.monotonic() - clicked
    # the run finishes the step in progress, then saves: a step plus a few seconds at most
    assert latency < step_seconds + 5.0, f"cancel took {latency:.1f} s (a step takes {step_seconds:.1f} s)"

    finished = dock.last_finished
    assert finished is not None and finished.cancelled and held < finished.steps_done < 1000
    run = Path(finished.run_dir)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "cancelled" and info["steps_done"] == finished.steps_done
    pretrained = load_pretrained_encoder(run)
    assert pretrained.step == finished.steps_done and pretrained.which == "teacher"
    assert (run / "resume.safetensors").is_file()
    # a cancelled run is offered to go on (Resume), not to be explored
    _, actions = dock._finish_report(finished)
    assert [text for text, _ in actions] == ["Resume", "Open folder"]
    actions[0][1]()
    assert dock.resume_from.line_edit.value == str(run)


def test_closing_the_dock_stops_the_run(make_napari_viewer, phantom, tmp_path):
    from napari_dagman.core.events import LogEvent

    viewer, dock = make_dock(make_napari_viewer, phantom, tmp_path, length=1000, run_name="closed")
    seen = record_events(dock)
    assert dock.start()
    # the child has read the data and built the model once it reports what it is about to do
    assert wait_until(lambda: any(isinstance(e, LogEvent) for _, e in seen), 240)
    process = dock._runner.process_job.process
    viewer.window.remove_dock_widget(dock)
    assert not dock.running and not process.is_alive()
    info = json.loads((tmp_path / "runs" / "closed" / "run.json").read_text())
    assert info["status"] == "cancelled"


def test_bad_input_gives_a_notification_not_a_traceback(make_napari_viewer, phantom, tmp_path, notifications):
    _, dock = make_dock(make_napari_viewer, phantom, tmp_path, length=3)
    errors = lambda: [m for s, m in notifications if s == "error"]  # noqa: E731

    dock.layers.value = []
    assert not dock.start() and "no training data" in errors()[-1]

    dock.layers.value = [dock._viewer.layers["ct"]]
    dock.lr.value = "fast"
    assert not dock.start() and "learning rate" in errors()[-1]
    dock.lr.value = "auto"

    dock.files.value = [str(tmp_path / "missing.nii.gz")]
    assert not dock.start() and "does not exist" in errors()[-1]
    dock.files.value = []

    empty = tmp_path / "empty-run"
    empty.mkdir()
    dock.resume_from.value = str(empty)  # loading its settings fails at once
    assert "not a napari-dagman run folder" in errors()[-1]
    assert not dock.start() and "not a napari-dagman run folder" in errors()[-1]
    assert not dock.running and dock.start_button.text() == "Start"
    assert all("\n" not in message for message in errors())


def test_device_and_runs_folder_persist(make_napari_viewer, phantom, tmp_path):
    _, dock = make_dock(make_napari_viewer, phantom, tmp_path)
    dock.device.value = "cpu"
    dock.runs_folder.value = str(tmp_path / "elsewhere")
    # a new dock (a new napari session) reads them back
    again = PretrainWidget(make_napari_viewer())
    assert again.device.value == "cpu"
    assert again.runs_folder.line_edit.value == str(tmp_path / "elsewhere")


def test_job_events_are_drawn_in_order_when_drawing_reenters_the_event_loop(qtbot):
    """Drawing an event may spin Qt's loop (napari's progress bar does); later events must still come after."""
    from qtpy.QtWidgets import QApplication

    from napari_dagman._widgets.common import JobRunner

    drawn: list[int] = []

    def draw(event: int) -> None:
        if event == 1:
            time.sleep(0.3)  # the worker has sent the later events by now
            QApplication.processEvents()
        drawn.append(event)

    finished: list[object] = []
    runner = JobRunner(draw, on_done=finished.append)

    def job(token):
        yield from range(1, 6)
        return "done"

    runner.start(job)
    assert runner.wait(30)
    assert drawn == [1, 2, 3, 4, 5]
    assert finished == ["done"]


def test_a_method_registered_at_run_time_trains_from_the_dock(make_napari_viewer, phantom, tmp_path):
    """The toy of the conformance suite (tests/toy_method.py, registered in napari's process by user code): its own
    options in the form, the child process registers the same spec and trains, its own encoder names are offered."""
    from tests.toy_method import TOY, ToyOptions

    register(TOY)
    viewer, dock = make_dock(make_napari_viewer, phantom, tmp_path, length=2, preview_every=1, run_name="toy")
    dock.method.reset_choices()
    dock.method.value = TOY.name
    assert dock.method_form.config_class is ToyOptions
    assert dock.method_form["toy_scale"].value == 0.5
    assert "teacher_noise" not in dock.method_form and "mask_ratio" not in dock.method_form
    dock.method_form["toy_scale"].value = 2.0
    assert dock.in_process.value  # the child knows nothing of this registration until told
    assert dock.start()
    assert wait_until(lambda: not dock.running, 240), "the toy run did not finish"
    assert dock.last_finished is not None and not dock.last_finished.cancelled, dock.status.text()
    run = tmp_path / "runs" / "toy"
    saved = json.loads((run / "config.json").read_text())
    assert saved["method"] == TOY.name and saved[TOY.name]["toy_scale"] == 2.0
    # previews follow the capabilities: a mask, no attention (its class attention is untrained)
    assert PREVIEW_MASK in viewer.layers
    assert PREVIEW_ATTENTION not in viewer.layers and PREVIEW_UNSEEN not in viewer.layers
    # the downstream docks offer the toy's own encoder names
    from napari_dagman._widgets.training.finetune import FinetuneWidget

    finetune = FinetuneWidget(viewer)
    finetune.init_run.value = str(run)
    assert list(finetune.encoder.choices) == ["auto", "online", "target"]


def test_mims_own_pictures_are_previewed(make_napari_viewer, phantom, tmp_path):
    from napari_dagman._widgets.training.pretrain import PREVIEW_PICTURE

    viewer, dock = make_dock(make_napari_viewer, phantom, tmp_path, length=1, preview_every=1, run_name="mim")
    dock.method.value = "mim"
    dock.method_form["samples_mid"].value, dock.method_form["samples_fine"].value = 1, 1
    seen = record_events(dock)
    assert dock.start()
    assert wait_until(lambda: not dock.running, 300), "the MiM step did not finish"
    preview = next(event for _, event in seen if isinstance(event, PreviewEvent))
    levels = viewer.layers[PREVIEW_PICTURE.format("levels")]
    assert levels.data.shape == (64, 64, 64)  # MiM reads a region twice the ROI
    assert set(np.unique(levels.data)) <= {0, 1, 2, 3} and (levels.data == 3).any()
    assert tuple(levels.translate) == pytest.approx(tuple(preview.image_translate))
    recon = viewer.layers[PREVIEW_PICTURE.format("reconstruction (coarse level)")]
    assert tuple(recon.scale) == pytest.approx((8.0, 8.0, 8.0))  # the coarse level is half the resolution
    assert PREVIEW_ATTENTION not in viewer.layers  # MiM trains no class attention: none is shown
