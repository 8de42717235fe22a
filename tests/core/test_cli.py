"""The command line: help, version, methods, pretrain and attention, torchrun, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from napari_dagman import __version__
from napari_dagman.cli import main
from napari_dagman.core.io import read_volume
from napari_dagman.core.methods.registry import REGISTRY


def test_version_help_and_methods(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    help_text = capsys.readouterr().out
    for flag in (
        "--method",
        "--preset",
        "--dims",
        "--roi",
        "--spacing",
        "--steps",
        "--epochs",
        "--batch-size",
        "--lr",
        "--mask-ratio",
        "--teacher-noise",
        "--noise-rate",
        "--device",
        "--seed",
        "--config",
        "--resume",
    ):
        assert flag in help_text
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in REGISTRY)


def test_pretrain_config_file_and_flags_compose(shared_data, tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {"preset": "tiny", "roi": 32, "spacing": 4.0, "steps": 5, "batch_size": 1, "mask_ratio": 0.5}
        )
    )
    out = tmp_path / "run"
    code = main(
        [
            "pretrain",
            str(shared_data / "example_ct.nii.gz"),
            "--out",
            str(out),
            "--config",
            str(config),
            "--steps",
            "2",
            "--method",
            "smit",
            "--quiet",
        ]
    )
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert (
        saved["steps"] == 2
        and saved["roi"] == 32
        and saved["smit"]["mask_ratio"] == 0.5  # the method's options, stored under its name
        and saved["method"] == "smit"
    )
    assert "done: 2/2 steps" in capsys.readouterr().out


def test_one_line_errors_and_exit_status(shared_data, tmp_path, capsys):
    bad = tmp_path / "x.nii.gz"
    bad.write_text("nope")
    assert main(["pretrain", str(bad), "--out", str(tmp_path / "r"), "--preset", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot use" in err and "x.nii.gz" in err
    assert (
        main(
            ["pretrain", str(shared_data / "example_ct.nii.gz"), "--out", str(tmp_path / "r"), "--roi", "50"]
        )
        == 2
    )
    assert "multiple of 32" in capsys.readouterr().err
    assert (
        main(
            [
                "attention",
                str(shared_data / "example_ct.nii.gz"),
                "--checkpoint",
                str(tmp_path),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "not a napari-dagman run folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


def test_attention_command_writes_aligned_maps(tiny_run, shared_data, tmp_path, capsys):
    out = tmp_path / "att"
    assert (
        main(
            [
                "attention",
                str(shared_data / "example_ct.nii.gz"),
                "--checkpoint",
                str(tiny_run),
                "--out",
                str(out),
                "--quiet",
                "--on-input-grid",
                "--strategies",
                "all",
            ]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "mask_run.nii.gz",  # the run's own recipe, then every strategy on request
        "attention_mean.nii.gz",
        "attention_head0.nii.gz",
        "attention_head3.nii.gz",
        "head_diversity.json",
        "mask_attention-high.nii.gz",
        "mask_noisy-teacher.nii.gz",
        "mask_previews.png",
        "attention_mean_on_input.nii.gz",
    } <= names
    ct = read_volume(shared_data / "example_ct.nii.gz")
    mean = read_volume(out / "attention_mean.nii.gz")
    # the token grid covers the CT: its edges lie within one token (64 mm at 4 mm x 16) of the CT's edges
    lo, hi = ct.physical_extent()
    lo2, hi2 = mean.physical_extent()
    assert np.all(lo2 <= lo + 1e-3) and np.all(hi2 >= hi - 1e-3) and np.all(hi2 - hi < 64)
    assert mean.spacing == (64.0, 64.0, 64.0)
    on_grid = read_volume(out / "attention_mean_on_input.nii.gz")
    assert on_grid.same_grid(ct)
    report = json.loads((out / "head_diversity.json").read_text())
    assert 0.0 <= report["crop"]["diversity"] <= 1.0 and len(report["crop"]["entropy"]) == 4
    assert report["masked_cells"]["attention-high"] == 5 and report["masked_cells"]["random"] == 5
    # the noisy teacher's dropped cells (2 of 8 at rate 0.2) beside its mask, on the same grid; the mask hides
    # round(0.6 x 2) = 1 of them, whatever the attention of the cells it saw
    dropped = read_volume(out / "teacher_dropped.nii.gz")
    noisy = read_volume(out / "mask_noisy-teacher.nii.gz")
    assert dropped.same_grid(noisy) and int(dropped.array.sum()) == 2
    assert int((noisy.array.astype(bool) & dropped.array.astype(bool)).sum()) == 1
    assert "head diversity" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run(shared_data, tmp_path):
    torchrun = shutil.which("torchrun") or str(
        __import__("pathlib").Path(sys.executable).with_name("torchrun")
    )
    out = tmp_path / "ddp"
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
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
        "5",
        "--batch-size",
        "1",
        "--threads",
        "1",
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps_done"] == 5 and run["status"] == "completed"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]  # one writer, not two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_the_progress_bar_follows_each_stage_of_a_staged_job(capsys):
    """The demo yields its stages (of 4) and, inside one, that stage's own steps (of 30): the bar shows the stage
    and counts its steps against their own total, not '10it' against 4."""
    from napari_dagman.cli.common import drive_result
    from napari_dagman.core.events import ProgressEvent

    def job():
        yield ProgressEvent(0, 4, "pretraining")
        yield ProgressEvent(10, 30, "pretraining")
        yield ProgressEvent(4, 4, "done")
        return "report"

    assert drive_result(job(), desc="demo") == "report"
    err = capsys.readouterr().err
    assert "demo: pretraining" in err and "10/30" in err and "4/4" in err
