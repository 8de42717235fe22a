"""Run folders and commands under faults: one line and exit status 2 before work is spent, nothing lost.

Issue 14's cases about the command line and run folders: values out of range, config typos, outputs that cannot be
written, hand-edited run configs and checkpoints, NaN weights, a full disk, a crash, two jobs on one folder and a
killed job's leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import ORGANS, file_size_limit, read_only_folder, run_cli

from napari_dagman.cli import main
from napari_dagman.core.checkpoint import load_tensors, save_tensors
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import read_volume, write_volume
from napari_dagman.core.training import consume, run_pretraining

LOCK_FILE = ".lock"  # core.checkpoint.LOCK_FILE
#: A tiny one-step pretraining run (tests that need more steps give --steps again: the last flag wins).
TINY = ["--preset", "tiny", "--roi", "32", "--spacing", "4", "--batch-size", "1", "--steps", "1", "--quiet"]


def saved_step(path: Path) -> int | None:
    """The step a checkpoint was saved at, or None when there is none yet (or it is being written)."""
    try:
        return int(load_tensors(path)[1]["step"])
    except (DagmanInputError, KeyError, ValueError):
        return None


def copy_run(run: Path, target: Path, *, link: tuple[str, ...] = ("model.safetensors", "best.safetensors")) -> Path:
    """A copy of a run folder whose large weights files are symbolic links (fast; edited files are replaced)."""
    target.mkdir(parents=True)
    for entry in run.iterdir():
        if entry.is_file():
            if entry.name in link:
                (target / entry.name).symlink_to(entry)
            else:
                shutil.copy(entry, target / entry.name)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def resave(source: Path, target: Path, edit) -> None:
    """Write ``target`` as ``source`` with its tensors and metadata changed by ``edit(tensors, meta)``."""
    tensors, meta = load_tensors(source)
    edit(tensors, meta)
    if target.is_symlink():
        target.unlink()
    save_tensors(target, tensors, {k: v for k, v in meta.items() if k != "format"})


# --- 10, 12: values and config files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, flags, reason",
    [
        ("pretrain", ["--lr", "nan"], "lr must be a finite number, got nan"),
        ("pretrain", ["--lr", "inf"], "lr must be a finite number, got inf"),
        ("pretrain", ["--lr", "1e38"], "lr must be <= 1.0"),  # finite, but torch overflowed with a traceback
        ("pretrain", ["--roi", "3200000"], "roi must be <= 1024"),
        ("pretrain", ["--spacing", "1e6"], "spacing must be <= 50.0"),
        ("finetune", ["--roi", "3200000"], "roi must be <= 1024"),
        ("finetune", ["--spacing", "1e6"], "spacing must be <= 50.0"),
        ("finetune", ["--lr", "nan"], "lr must be a finite number"),
        ("predict", ["--overlap", "nan"], "overlap must be a finite number"),
        ("predict", ["--roi", "3200000"], "roi must be <= 1024"),
        ("attention", ["--overlap", "nan"], "overlap must be a finite number"),
        ("embed", ["--overlap", "inf"], "overlap must be a finite number"),
    ],
)
def test_values_out_of_range_are_refused_before_any_work(shared_data, tmp_path, capsys, command, flags, reason):
    ct, seg = shared_data / "example_ct_sm.nii.gz", shared_data / "example_seg.nii.gz"
    out = tmp_path / "out"
    inputs = {
        "pretrain": [ct, "--out", out, *TINY],
        "finetune": [ct, seg, "--out", out, "--preset", "tiny", "--steps", "1"],
        "predict": [ct, "--checkpoint", tmp_path / "none", "--out", out / "seg.nii.gz"],
        "attention": [ct, "--checkpoint", tmp_path / "none", "--out", out],
        "embed": [ct, "--checkpoint", tmp_path / "none", "--out", out],
    }[command]
    status, err = run_cli(capsys, command, *inputs, *flags)
    assert status == 2 and reason in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_typo_in_a_config_file_is_refused_with_the_closest_name(shared_data, tmp_path, capsys, command):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"lerning_rate": 0.1, "preset": "tiny", "stpes": 2}))
    inputs = [shared_data / "example_ct_sm.nii.gz"] + ([shared_data / "example_seg.nii.gz"] if command == "finetune" else [])
    status, err = run_cli(capsys, command, *inputs, "--out", tmp_path / "run", "--config", config, "--steps", "1")
    assert status == 2 and f"unknown {command} option(s): 'lerning_rate' (did you mean 'lr'?), 'stpes'" in err
    assert "(did you mean 'steps'?)" in err and str(config) in err
    assert not (tmp_path / "run").exists()


def test_a_run_config_json_is_accepted_as_a_config_file(tiny_run, shared_data, tmp_path, capsys):
    """What a run folder records beside its options (architecture, encoders...) is not taken for typos."""
    status, _ = run_cli(capsys, "pretrain", shared_data / "example_ct_sm.nii.gz", "--out", tmp_path / "run",
                        "--config", tiny_run / "config.json", "--steps", "1", "--quiet")  # fmt: skip
    assert status == 0


# --- 9: outputs that cannot be written ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["a file", "under a file", "a folder named like a file"])
@pytest.mark.parametrize("command", ["pretrain", "attention", "embed", "predict"])
def test_an_output_that_cannot_be_written_is_refused_first(shared_data, tmp_path, capsys, command, where):
    """Checked before the checkpoint is even read (the checkpoint here does not exist): no work is spent."""
    blocker = tmp_path / "blocker.nii.gz"
    if where == "a folder named like a file":
        if command != "predict":
            pytest.skip("only predict writes a file")
        blocker.mkdir()
        out = blocker
    else:
        blocker.write_text("a file")
        out = blocker if where == "a file" else blocker / "out.nii.gz"
        if command == "predict" and where == "a file":
            pytest.skip("predict overwrites its output file")
    ct = shared_data / "example_ct_sm.nii.gz"
    args = [ct, "--out", out, *TINY] if command == "pretrain" else [ct, "--checkpoint", tmp_path / "none", "--out", out]
    status, err = run_cli(capsys, command, *args)
    assert status == 2
    assert {"a file": "is a file, not a folder", "under a file": f"{blocker} is a file",
            "a folder named like a file": "is a folder"}[where] in err  # fmt: skip
    assert "none" not in err  # the output was checked first


@pytest.mark.parametrize("command", ["pretrain", "attention", "predict"])
def test_a_read_only_output_is_refused_first(shared_data, tmp_path, capsys, command):
    ct = shared_data / "example_ct_sm.nii.gz"
    with read_only_folder() as folder:
        out = folder / ("seg.nii.gz" if command == "predict" else "out")
        args = [ct, "--out", out, *TINY] if command == "pretrain" else [ct, "--checkpoint", tmp_path, "--out", out]
        status, err = run_cli(capsys, command, *args)
        assert status == 2 and "Permission denied" in err and str(folder) in err
        assert not list(folder.iterdir())


# --- 13: attention --center ---------------------------------------------------------------------------------------------
def test_a_crop_centre_outside_the_image_is_refused(tiny_run, shared_data, tmp_path, capsys):
    ct = read_volume(shared_data / "example_ct_sm.nii.gz")
    inside = ct.index_to_physical(np.asarray(ct.shape) / 2)
    far = inside + [0.0, 0.0, 5000.0]
    status, err = run_cli(capsys, "attention", shared_data / "example_ct_sm.nii.gz", "--checkpoint", tiny_run,
                          "--out", tmp_path / "att", "--scope", "crop", "--center", *map(str, far))  # fmt: skip
    assert status == 2 and "lies outside the image, which spans z " in err
    assert not (tmp_path / "att").exists()


# --- 10: hand-edited run configs and checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"roi": "abc"}, "roi must be int, got 'abc'"),
        ({"roi": 0}, "roi must be >= 32, got 0"),
        ({"roi": 40}, "roi must be a multiple of 32"),
        ({"spacing": -2}, "spacing must be >= 0.05"),
        ({"hu_min": 500}, "hu_max (250.0) must be above hu_min (500.0)"),
        ({"architecture": {"preset": "tiny", "dims": 3, "embed_dim": 12, "depths": 2, "num_heads": [1],
                           "window_size": 4}}, "architecture description in"),  # fmt: skip
    ],
    ids=["roi-text", "roi-zero", "roi-40", "spacing-negative", "hu-order", "architecture"],
)
def test_a_hand_edited_run_config_is_refused_before_any_map_is_written(
    tiny_run, shared_data, tmp_path, capsys, changes, reason
):
    run = copy_run(tiny_run, tmp_path / "run")
    edit_json(run / "config.json", **changes)
    out = tmp_path / "att"
    status, err = run_cli(capsys, "attention", shared_data / "example_ct_sm.nii.gz", "--checkpoint", run,
                          "--out", out, "--quiet")  # fmt: skip
    assert status == 2 and reason in err and str(run / "config.json") in err
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("sibling", ["{not json", "roi-text"])
def test_a_broken_config_beside_a_weights_file_is_refused(tiny_run, shared_data, tmp_path, capsys, sibling):
    run = copy_run(tiny_run, tmp_path / "run")
    if sibling == "roi-text":
        edit_json(run / "config.json", roi="abc")
    else:
        (run / "config.json").write_text(sibling)
    status, err = run_cli(capsys, "attention", shared_data / "example_ct_sm.nii.gz", "--checkpoint",
                          run / "model.safetensors", "--out", tmp_path / "att")  # fmt: skip
    assert status == 2 and "config.json" in err


def test_a_step_that_is_not_an_integer_is_refused(tiny_run, ft_run, shared_data, tmp_path, capsys):
    def half_step(tensors, meta):
        meta["step"] = "2.5"

    run = copy_run(tiny_run, tmp_path / "pre")
    resave(tiny_run / "model.safetensors", run / "model.safetensors", half_step)
    status, err = run_cli(capsys, "attention", shared_data / "example_ct_sm.nii.gz", "--checkpoint", run,
                          "--out", tmp_path / "att")  # fmt: skip
    assert status == 2 and "unreadable step ('2.5')" in err
    seg = copy_run(ft_run, tmp_path / "seg")
    resave(ft_run / "best.safetensors", seg / "best.safetensors", half_step)
    status, err = run_cli(capsys, "predict", shared_data / "example_ct_sm.nii.gz", "--checkpoint", seg,
                          "--out", tmp_path / "seg.nii.gz")  # fmt: skip
    assert status == 2 and "unreadable step ('2.5')" in err and not (tmp_path / "seg.nii.gz").exists()


# --- 6: non-finite weights ---------------------------------------------------------------------------------------------
def test_a_run_whose_weights_hold_nan_is_refused_by_every_user(tiny_run, shared_data, tmp_path, capsys):
    def poison(tensors, meta):
        key = next(k for k in tensors if k.startswith("teacher.encoder.") and tensors[k].is_floating_point())
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    run = copy_run(tiny_run, tmp_path / "nan")
    resave(tiny_run / "model.safetensors", run / "model.safetensors", poison)
    ct, seg = shared_data / "example_ct_sm.nii.gz", shared_data / "example_seg.nii.gz"
    for command, args in (
        ("attention", [ct, "--checkpoint", run, "--out", tmp_path / "att"]),
        ("embed", [ct, "--checkpoint", run, "--out", tmp_path / "emb", "--cache-dir", tmp_path / "cache"]),
        ("finetune", [ct, seg, "--init", run, "--out", tmp_path / "ft", "--steps", "1", "--quiet"]),
    ):
        status, err = run_cli(capsys, command, *args)
        assert status == 2 and "holds NaN or infinity in its teacher encoder" in err, command
    assert not (tmp_path / "ft").exists() and not (tmp_path / "att").exists()


def test_a_diverging_run_stops_before_a_non_finite_checkpoint(shared_data, tmp_path, capsys, monkeypatch):
    """A step that makes a weight NaN stops the run in one line; every checkpoint on disk stays finite."""
    real, calls = torch.optim.AdamW.step, []

    def diverge(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", diverge)
    run = tmp_path / "run"
    status, err = run_cli(capsys, "pretrain", shared_data / "example_ct_sm.nii.gz", "--out", run, *TINY,
                          "--steps", "3", "--save-every", "1")  # fmt: skip
    assert status == 2 and "step 2 made weights non-finite" in err
    for name in ("model.safetensors", "best.safetensors", "resume.safetensors"):
        if (run / name).exists():
            tensors, meta = load_tensors(run / name)
            assert meta["step"] == "1" and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert json.loads((run / "run.json").read_text())["status"].startswith("failed: step 2 made weights non-finite")


# --- 10: an edited optimiser state ------------------------------------------------------------------------------------------
def _wrong_shape(tensors, meta):
    key = next(k for k in tensors if k.startswith("optim.") and k.endswith("exp_avg") and tensors[k].ndim == 2)
    tensors[key] = tensors[key][:, :1].contiguous()


def _wrong_dtype(tensors, meta):
    key = next(k for k in tensors if k.startswith("optim.") and k.endswith("exp_avg_sq"))
    tensors[key] = tensors[key].double()


def _bad_group(tensors, meta):
    optimiser = json.loads(meta["optimizer"])
    optimiser["param_groups"][0]["eps"] = "small"
    meta["optimizer"] = json.dumps(optimiser)


def _nan_weight(tensors, meta):
    key = next(k for k in tensors if k.startswith("student.") and tensors[k].is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))


@pytest.mark.parametrize(
    "edit, reason",
    [(_wrong_shape, "optimiser state"), (_wrong_dtype, "optimiser state"), (_bad_group, "optimiser state"),
     (_nan_weight, "holds NaN or infinity")],  # fmt: skip
    ids=["shape", "dtype", "group", "nan-weight"],
)
def test_an_edited_optimiser_state_is_refused_and_the_run_left_as_it_was(
    tiny_run, shared_data, tmp_path, capsys, edit, reason
):
    run = copy_run(tiny_run, tmp_path / "run", link=("model.safetensors", "best.safetensors", "probes.safetensors"))
    resave(tiny_run / "resume.safetensors", run / "resume.safetensors", edit)
    record = (run / "run.json").read_text()
    status, err = run_cli(capsys, "pretrain", "--out", run, "--resume", "--steps", "4", "--quiet")
    assert status == 2 and reason in err
    assert (run / "run.json").read_text() == record  # not "running", not "failed": the run was not touched
    assert saved_step(run / "resume.safetensors") == 3


# --- 7: a full disk ---------------------------------------------------------------------------------------------------------
def test_a_full_disk_fails_the_run_in_one_line_and_keeps_the_last_checkpoint(shared_data, tmp_path, capsys):
    ct = shared_data / "example_ct_sm.nii.gz"
    run = tmp_path / "run"
    assert run_cli(capsys, "pretrain", ct, "--out", run, *TINY, "--steps", "2", "--save-every", "1")[0] == 0
    before = (run / "resume.safetensors").read_bytes()
    with file_size_limit(1 << 20):  # run.json and metrics fit, a checkpoint does not
        status, err = run_cli(capsys, "pretrain", "--out", run, "--resume", "--steps", "3", "--quiet")
    assert status == 2 and "resume.safetensors: File too large; the checkpoint of step 2 is kept" in err
    info = json.loads((run / "run.json").read_text())
    assert info["status"].startswith("failed: cannot write") and info["resumed_at"] == [2]
    assert (run / "resume.safetensors").read_bytes() == before and saved_step(run / "model.safetensors") == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporaries, no lock


def test_a_crash_inside_a_step_marks_the_run_failed(shared_data, tmp_path, monkeypatch):
    """Not only our own errors: whatever ends a job, run.json must not keep saying "running"."""
    from napari_dagman.core.training import loop

    real = loop.optimizer_step

    def crash(task, optimizer, params, step, *args, **kwargs):
        if step == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(task, optimizer, params, step, *args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", crash)
    from napari_dagman.core.config import PretrainConfig

    config = PretrainConfig(images=[str(shared_data / "example_ct_sm.nii.gz")], out=str(tmp_path / "run"),
                            preset="tiny", roi=32, spacing=4.0, steps=3, batch_size=1, save_every=1)  # fmt: skip
    with pytest.raises(RuntimeError):
        consume(run_pretraining(config))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert saved_step(tmp_path / "run" / "resume.safetensors") == 1
    assert not (tmp_path / "run" / LOCK_FILE).exists()


# --- 8, 13: one job per run folder; a killed job's lock, temporaries and run.json -------------------------------------------
def test_a_lock_is_exclusive_and_names_its_holder(tmp_path):
    from napari_dagman.core.checkpoint import RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire("napari-dagman pretrain --out here")
    with pytest.raises(DagmanInputError) as info:
        second.acquire()
    message = str(info.value)
    assert f"in use by another job (process {os.getpid()} on " in message
    assert message.endswith(": napari-dagman pretrain --out here); wait for it to end or choose another --out")
    first.release()
    second.acquire()
    assert second.held and not first.held
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def _wait_for(condition, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_a_second_job_on_one_run_folder_is_refused_and_a_killed_ones_lock_is_taken_over(
    shared_data, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = ["pretrain", str(shared_data / "example_ct_sm.nii.gz"), "--out", str(run), *TINY,
            "--steps", "2000", "--save-every", "1", "--preview-every", "0", "--probe-every", "0", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "napari_dagman.cli", *argv], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: saved_step(run / "resume.safetensors") is not None, 240, proc)
        for extra in ([], ["--resume"]):
            status, err = run_cli(capsys, *argv, *extra)
            assert status == 2 and f"is in use by another job (process {proc.pid} on " in err
        assert json.loads((run / "run.json").read_text())["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    saved = saved_step(run / "resume.safetensors")
    # what a kill during a save leaves (named as now, and as by earlier versions)
    leftovers = [run / ".resume.k1ll3d00.tmp.safetensors", run / ".model.safetensors.k1ll3d01.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"")
    assert (run / LOCK_FILE).exists()  # the dead job's lock file: its lock went with it

    status = main(["pretrain", "--out", str(run), "--resume", "--steps", str(saved + 1), "--quiet"])
    err = capsys.readouterr().err
    assert status == 0
    assert f"the previous job in {run} was interrupted without finishing; its last save is step {saved}" in err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["interruptions"][0]["saved_step"] == saved
    assert not any(p.exists() for p in leftovers) and not (run / LOCK_FILE).exists()


# --- 13: predict checks the reference's organs before inference ------------------------------------------------------------
def test_predict_refuses_a_reference_without_the_runs_organs_before_inference(
    ft_run, shared_data, tmp_path, capsys, monkeypatch
):
    from napari_dagman.core.segmentation import jobs

    def no_inference(*args, **kwargs):
        raise AssertionError("the inference ran before the reference was checked")

    monkeypatch.setattr(jobs, "run_prediction", no_inference)
    seg = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    other = seg.with_array(np.where(np.isin(seg.array, ORGANS), 0, seg.array).astype(np.uint8))
    write_volume(other, tmp_path / "other.nii.gz")
    out = tmp_path / "pred.nii.gz"
    status, err = run_cli(capsys, "predict", shared_data / "example_ct.nii.gz", "--checkpoint", ft_run,
                          "--out", out, "--reference", tmp_path / "other.nii.gz")  # fmt: skip
    assert status == 2 and "the reference label map holds none of the organs the run segments (liver (5)" in err
    assert not out.exists()
