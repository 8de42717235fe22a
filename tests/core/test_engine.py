"""The training engine: run folder contents, exact resume after cancel/close/kill, refusals, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from napari_dagman.core.checkpoint import load_pretrained_encoder, load_tensors, save_tensors
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.events import CancelToken, FinishedEvent, LogEvent, PreviewEvent, StepEvent
from napari_dagman.core.io import write_volume
from napari_dagman.core.training import consume, run_pretraining
from napari_dagman.core.volume import Volume


def small_config(shared_data, out, **changes) -> PretrainConfig:
    base = {
        "images": [str(shared_data / "example_ct.nii.gz")],
        "out": str(out),
        "preset": "tiny",
        "roi": 32,
        "spacing": 4.0,
        "steps": 6,
        "batch_size": 1,
        "preview_every": 2,
        "save_every": 2,
        "seed": 3,
    }
    base.update(changes)
    return PretrainConfig(**base)


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("engine") / "full"
    events = list(run_pretraining(small_config(shared_data, out)))
    return out, events


def test_run_folder_contents(uninterrupted):
    out, events = uninterrupted
    assert {
        "config.json",
        "model.safetensors",
        "best.safetensors",
        "resume.safetensors",
        "metrics.jsonl",
        "run.json",
    } <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["job"] == "pretrain" and config["architecture"]["embed_dim"] == 12
    options = config["dagman"]  # the method's options, stored under its name
    assert options["mask_strategy"] == "attention-high" and options["teacher_noise"] == "input-dropout"
    tensors, meta = load_tensors(out / "model.safetensors")
    assert any(k.startswith("student.encoder.swin.") for k in tensors)
    assert any(k.startswith("teacher.encoder.class_attention.") for k in tensors)
    assert meta["step"] == "6"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["steps_done"] == 6 and run["seed"] == 3
    assert len(run["data"][0]["sha256"]) == 64 and run["environment"]["torch"] == torch.__version__
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(e.loss) for e in steps)
    assert isinstance(events[-1], FinishedEvent) and not events[-1].cancelled


def test_previews_are_placed_on_the_crop(uninterrupted):
    _, events = uninterrupted
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert [p.step for p in previews] == [1, 2, 4, 6]
    p = previews[0]
    assert p.image.shape == (32, 32, 32) and p.mask.shape == (2, 2, 2) and p.attention.shape == (4, 2, 2, 2)
    assert p.image_scale == [4.0, 4.0, 4.0] and p.mask_scale == [64.0, 64.0, 64.0]
    # the first cell's centre sits 7.5 voxels (16-voxel cells) from the crop's first voxel
    np.testing.assert_allclose(np.array(p.mask_translate) - p.image_translate, [30.0, 30.0, 30.0])
    assert int(p.mask.sum()) == 5  # round(0.6 * 8)


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_resume_after_stop_repeats_the_uninterrupted_run(uninterrupted, shared_data, tmp_path, how):
    full, _ = uninterrupted
    out = tmp_path / how
    token = CancelToken()
    gen = run_pretraining(small_config(shared_data, out), cancel=token)
    for event in gen:
        if isinstance(event, StepEvent) and event.step == 3:
            if how == "cancel":
                token.cancel()
            else:
                gen.close()  # what the GUI worker / Ctrl-C does
                break
    if how == "cancel":
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "cancelled"
    _, meta = load_tensors(out / "resume.safetensors")
    assert meta["step"] == "3"
    resumed = list(run_pretraining(small_config(shared_data, out), resume=True))
    first_step = next(e for e in resumed if isinstance(e, StepEvent))
    assert first_step.step == 4
    assert losses(out) == losses(full)  # bit-identical on CPU with a fixed seed


def cli_pretrain(shared_data, out) -> list[str]:
    """The CLI command of `small_config` (6 steps, saves every 2)."""
    return [
        sys.executable,
        "-m",
        "napari_dagman.cli",
        "pretrain",
        str(shared_data / "example_ct.nii.gz"),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--roi",
        "32",
        "--spacing",
        "4",
        "--steps",
        "6",
        "--batch-size",
        "1",
        "--save-every",
        "2",
        "--seed",
        "3",
        "--quiet",
    ]


def start_and_signal(shared_data, out, sig: signal.Signals, after_step: int) -> int:
    """Run the CLI, send ``sig`` once step ``after_step`` is logged; the exit status."""
    proc = subprocess.Popen(
        cli_pretrain(shared_data, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # as from a terminal: a background job of a non-interactive shell would start with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= after_step:
            break
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    return proc.wait()


def test_killed_run_resumes_from_its_last_save(uninterrupted, shared_data, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "killed"
    start_and_signal(shared_data, out, signal.SIGKILL, 5)
    _, meta = load_tensors(out / "resume.safetensors")
    saved = int(meta["step"])
    assert saved in (4, 6)
    if saved == 6:
        pytest.skip("the run finished before it could be killed")
    consume(run_pretraining(small_config(shared_data, out), resume=True))
    assert losses(out) == losses(full)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_terminated_cli_run_saves_where_it_stopped(uninterrupted, shared_data, tmp_path, sig):
    """A scheduler's SIGTERM or Ctrl-C: the CLI saves the step it reached, says so, and resumes exactly."""
    full, _ = uninterrupted
    out = tmp_path / sig.name
    status = start_and_signal(shared_data, out, sig, 3)
    _, meta = load_tensors(out / "resume.safetensors")
    saved = int(meta["step"])
    if saved == 6:
        pytest.skip("the run finished before the signal")
    assert status == 128 + sig
    assert saved == max(losses(out))  # saved at the interruption, not only at the last periodic save
    assert json.loads((out / "run.json").read_text())["status"] == "cancelled"
    resumed = list(run_pretraining(small_config(shared_data, out), resume=True))
    assert next(e for e in resumed if isinstance(e, StepEvent)).step == saved + 1
    assert losses(out) == losses(full)


def test_refusals(uninterrupted, shared_data, tmp_path):
    full, _ = uninterrupted
    record = (full / "run.json").read_bytes()
    with pytest.raises(DagmanInputError, match="already holds a run"):
        consume(run_pretraining(small_config(shared_data, full)))
    with pytest.raises(CheckpointError, match="preset 'tiny' -> 'small'"):
        consume(run_pretraining(small_config(shared_data, full, preset="small", steps=8), resume=True))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        consume(run_pretraining(small_config(shared_data, tmp_path / "new"), resume=True))
    with pytest.raises(DagmanInputError, match="already finished 6 of 6"):
        consume(run_pretraining(small_config(shared_data, full), resume=True))
    assert (
        full / "run.json"
    ).read_bytes() == record  # a refused request leaves the finished run's record alone


def test_bad_inputs_write_nothing(shared_data, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_text("not an image")
    out = tmp_path / "run"
    cfg = small_config(shared_data, out, images=[str(shared_data / "example_ct.nii.gz"), str(bad)])
    with pytest.raises(DagmanInputError, match="cannot use .*broken.nii.gz"):
        consume(run_pretraining(cfg))
    assert not out.exists()

    air_hu = np.random.default_rng(0).integers(-1024, -900, (40, 40, 40)).astype(np.int16)  # air with noise
    air = Volume(air_hu, (4.0, 4.0, 4.0))
    with pytest.raises(DagmanInputError, match="no voxel above -175 HU"):
        consume(run_pretraining(small_config(shared_data, out, images=[]), volumes=[air]))
    nan = Volume(np.zeros((40, 40, 40), np.float32), (4.0, 4.0, 4.0))
    nan.array[3, 4, 5] = np.nan
    with pytest.raises(DagmanInputError, match="1 NaN or infinite voxels"):
        consume(run_pretraining(small_config(shared_data, out, images=[]), volumes=[nan]))
    assert not out.exists()
    if not torch.cuda.is_available():
        with pytest.raises(DagmanInputError, match="no CUDA GPU"):
            consume(run_pretraining(small_config(shared_data, out, device="cuda")))
    assert not out.exists()


def test_small_volume_is_padded_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    small = Volume(
        rng.normal(40, 20, (20, 20, 20)).astype(np.float32), (4.0, 4.0, 4.0), metadata={"name": "tiny"}
    )
    cfg = PretrainConfig(
        out=str(tmp_path / "r"), preset="tiny", roi=32, spacing=4.0, steps=1, batch_size=1, preview_every=0
    )
    events = list(run_pretraining(cfg, volumes=[small]))
    warnings = [e.message for e in events if isinstance(e, LogEvent) and e.level == "warning"]
    assert any("smaller than the ROI 32" in w and "padded" in w for w in warnings)
    assert isinstance(events[-1], FinishedEvent)


def test_2d_run(shared_data, tmp_path):
    cfg = small_config(shared_data, tmp_path / "r2d", dims=2, roi=64, spacing=3.0, steps=2, preview_every=1)
    events = list(run_pretraining(cfg))
    preview = next(e for e in events if isinstance(e, PreviewEvent))
    assert preview.image.shape == (1, 64, 64) and preview.mask.shape == (1, 4, 4)
    assert preview.attention.shape == (4, 1, 4, 4)
    assert preview.mask_scale == [3.0, 48.0, 48.0]
    assert json.loads((tmp_path / "r2d" / "config.json").read_text())["architecture"]["window_size"] == 7


def test_loading_the_encoder_is_exact_and_checked(uninterrupted, tmp_path):
    full, _ = uninterrupted
    tensors, _ = load_tensors(full / "model.safetensors")
    pre = load_pretrained_encoder(full)
    assert pre.which == "teacher" and pre.step == 6 and pre.roi == 32
    for name, value in pre.encoder.state_dict().items():
        assert torch.equal(value, tensors[f"teacher.encoder.{name}"])
    student = load_pretrained_encoder(full, "student")
    assert torch.equal(student.encoder.mask_token, tensors["student.encoder.mask_token"])
    # a safetensors file that is not ours, and weights of another architecture
    save_file = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file as st_save

    st_save({"w": torch.zeros(2)}, str(save_file))
    with pytest.raises(CheckpointError, match="not a napari-dagman checkpoint"):
        load_pretrained_encoder(save_file)
    tensors["teacher.encoder.mask_token"] = torch.zeros(24)
    bad = tmp_path / "bad.safetensors"
    save_tensors(
        bad,
        tensors,
        {
            "architecture": json.dumps(json.loads((full / "config.json").read_text())["architecture"]),
            "job": "pretrain",
        },
    )
    with pytest.raises(CheckpointError, match="another shape"):
        load_pretrained_encoder(bad)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a napari-dagman run folder"):
        load_pretrained_encoder(empty)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_pretrained_encoder(tmp_path / "pickle.safetensors")


def test_written_volumes_from_the_engine_inputs_are_untouched(shared_data, tmp_path):
    """The engine reads inputs and never writes next to them."""
    src = tmp_path / "ct.nii.gz"
    from napari_dagman.core.io import read_volume

    write_volume(read_volume(shared_data / "example_ct_sm.nii.gz"), src)
    before = src.read_bytes()
    consume(
        run_pretraining(
            PretrainConfig(
                images=[str(src)],
                out=str(tmp_path / "r"),
                preset="tiny",
                roi=32,
                spacing=4.0,
                steps=1,
                batch_size=1,
                preview_every=0,
            )
        )
    )
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "r"]
