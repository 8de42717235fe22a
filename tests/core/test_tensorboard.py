"""``--tensorboard``: event files in the run folder, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import importlib.util
import math

import pytest

from napari_dagman.cli import main
from napari_dagman.core.checkpoint import RunFolder
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.training import consume, run_pretraining
from napari_dagman.core.training.tensorboard import INSTALL_HINT

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(folder):
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_pretraining_writes_every_term_lr_momentum_probes_and_previews(shared_data, tmp_path):
    out = tmp_path / "run"
    config = PretrainConfig(images=[str(shared_data / "example_ct.nii.gz")], out=str(out), preset="tiny", roi=32,
                            spacing=4.0, steps=3, batch_size=1, preview_every=2, probe_every=2, tensorboard=True)  # fmt: skip
    consume(run_pretraining(config))
    assert list(out.glob("events.out.tfevents.*"))
    events = read_events(out)
    scalars = set(events.Tags()["scalars"])
    metrics = [r for r in RunFolder(out).read_metrics() if r.get("kind") == "train"]
    terms = {"global", "patch", "reconstruction"}  # DAGMaN's loss terms
    assert {"loss", "lr", "train/momentum", "train/grad_norm"} | {f"loss/{t}" for t in terms} <= scalars
    assert {
        "probe/teacher_head_diversity",
        "probe/student_head_diversity",
        "probe/teacher_entropy_h0",
    } <= scalars
    # the values are the run's: the same as metrics.jsonl, step by step
    for tag, key in (("loss", "loss"), ("lr", "lr"), ("train/momentum", "momentum"), ("loss/patch", "patch")):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(logged) == [1, 2, 3]
        for record in metrics:
            assert math.isclose(logged[record["step"]], record[key], rel_tol=1e-6), (tag, record["step"])
    probed = {e.step for e in events.Scalars("probe/teacher_head_diversity")}
    assert probed == {1, 2, 3}  # the first, every 2nd and the last step
    images = set(events.Tags()["images"])
    assert {"preview/image", "preview/mask", "preview/attention_mean", "preview/attention_head0"} <= images
    assert [e.step for e in events.Images("preview/mask")] == [1, 2]  # the first step and every 2nd
    picture = events.Images("preview/attention_mean")[0]
    assert (picture.height, picture.width) == (32, 32)  # the crop's slice, attention tokens repeated onto it


def test_finetuning_writes_validation_dice(shared_data, tmp_path):
    from tests.helpers import ft_config

    from napari_dagman.core.segmentation import run_finetuning

    out = tmp_path / "seg"
    consume(run_finetuning(ft_config(shared_data, out, steps=2, val_every=2, tensorboard=True)))
    scalars = set(read_events(out).Tags()["scalars"])
    assert {"loss", "lr", "validation/mean_dice", "validation/dice/liver"} <= scalars


def test_without_the_package_it_is_one_line_before_anything_runs(shared_data, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    out = tmp_path / "run"
    argv = ["pretrain", str(shared_data / "example_ct_sm.nii.gz"), "--out", str(out), "--tensorboard", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(INSTALL_HINT) and len(err.splitlines()) == 1
    assert not out.exists()
