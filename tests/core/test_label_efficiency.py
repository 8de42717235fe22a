"""Label efficiency of fine-tuning (issue 25): the k-piece draw, the one-command grid, reuse and refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import run_cli

from napari_dagman.core.config import FinetuneConfig
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.segmentation.data import Case, split_cases
from napari_dagman.core.segmentation.efficiency import Arm, arm_config, check_grid, parse_numbers


def _case(name: str, depth: int = 60, organ: tuple[int, int] = (10, 60)) -> Case:
    """A 60-slice case whose organ (class 1) fills slices ``organ[0]`` to ``organ[1] - 1``."""
    classes = np.zeros((depth, 8, 8), dtype=np.int16)
    classes[organ[0] : organ[1], 2:6, 2:6] = 1
    return Case(np.zeros((depth, 8, 8), np.float32), classes, (3.0, 3.0, 3.0), (0.0,) * 3, name, name, [1])


def _slices(split) -> set[tuple[int, int]]:
    return {(p.case, z) for p in split.train for z in range(p.z0, p.z1)}


def _config(**changes) -> FinetuneConfig:
    base = {"val_split": "slab", "val_fraction": 0.2, "val_position": 0.5, "val_gap_mm": 6.0, "seed": 0}
    return FinetuneConfig(**{**base, **changes})


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_slab_budget_is_nested_exact_and_leaves_validation_alone(seed):
    cases = [_case("a"), _case("b", organ=(20, 50))]
    full = split_cases(cases, _config(seed=seed))
    held = {(p.case, z) for p in full.val for z in range(p.z0 - 2, p.z1 + 2)}  # the slab and its 2-slice gaps
    labelled = {(c, z) for c, z in _slices(full) if cases[c].classes[z].any()}
    previous: set[tuple[int, int]] = set()
    for k in (1, 2, 4, 8):
        split = split_cases(cases, _config(seed=seed, train_pieces=k, train_slabs=4))
        chosen = _slices(split)
        assert [(p.case, p.z0, p.z1) for p in split.val] == [(p.case, p.z0, p.z1) for p in full.val]
        assert previous <= chosen and not chosen & held and chosen <= labelled
        # k of the 8 labelled slabs (4 per case): k named pieces, 3 to 9 slices each (34 and 14 slices a case)
        assert f"label budget: {k} of 8 labelled slabs" in split.description
        assert split.description.split("drawn by seed")[1].count(" z ") == k
        assert 3 * k <= len(chosen) <= 9 * k
        previous = chosen
    assert previous == labelled  # every slab at the full budget


def test_case_budget_draws_training_cases_only_and_both_inits_get_the_same():
    cases = [_case(f"c{i}") for i in range(6)]
    draws = []
    for k in (1, 2, 3, 4):
        split = split_cases(cases, _config(val_split="cases", val_cases=2, train_pieces=k, seed=3))
        assert [p.case for p in split.val] == [4, 5]
        draws.append({p.case for p in split.train})
        assert len(draws[-1]) == k and draws[-1] <= {0, 1, 2, 3}
    assert draws[0] < draws[1] < draws[2] < draws[3]
    # the draw depends on the seed, not on the init: the arms of one seed train on the same pieces
    base = _config(val_split="cases", val_cases=2, init="runs/pretrained", out="grid", steps=5)
    arms = [arm_config(base, Arm(2, init, 3), Path("grid"), {"preset": "tiny"}) for init in ("pretrained", "scratch")]
    assert [a.train_pieces for a in arms] == [2, 2] and [a.seed for a in arms] == [3, 3]
    assert arms[0].init == "runs/pretrained" and arms[1].init is None and arms[1].preset == "tiny"
    splits = [split_cases(cases, a) for a in arms]
    assert splits[0].to_dict() == splits[1].to_dict()


def test_budget_larger_than_the_pieces_is_refused():
    with pytest.raises(DagmanInputError, match="more than the 4 training case"):
        split_cases([_case(f"c{i}") for i in range(5)], _config(val_split="cases", train_pieces=5))
    with pytest.raises(DagmanInputError, match="fewer than --train-slabs 40"):
        split_cases([_case("a")], _config(train_pieces=1, train_slabs=40))
    config = _config(init="run", out="grid", images=["a.nii.gz"], segmentations=["a_seg.nii.gz"])
    with pytest.raises(DagmanInputError, match="1 to 4"):
        check_grid(config, [1, 5], [0])
    with pytest.raises(DagmanInputError, match="--init"):
        check_grid(config.replace(init=None), [1], [0])
    with pytest.raises(DagmanInputError, match="whole numbers"):
        parse_numbers("1,two", "--label-efficiency")


def _grid_args(shared_data: Path, tiny_run: Path, out: Path, budgets: str = "1,2") -> list:
    return [
        "finetune", shared_data / "example_ct.nii.gz", shared_data / "example_seg_fast_force_split.nii.gz",
        "--init", tiny_run, "--out", out, "--labels", "5,1,2,3", "--roi", "64", "--spacing", "6",
        "--steps", "2", "--val-every", "2", "--batch-size", "1", "--val-fraction", "0.25", "--val-position", "0.75",
        "--train-slabs", "2", "--device", "cpu", "--threads", "1", "--quiet",
        "--label-efficiency", budgets, "--seeds", "0",
    ]  # fmt: skip


def test_cli_grid_writes_the_tables_and_reuses_finished_runs(shared_data, tiny_run, tmp_path, capsys):
    out = tmp_path / "grid"
    status, err = run_cli(capsys, *_grid_args(shared_data, tiny_run, out))
    assert status == 0, err
    with open(out / "label_efficiency.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["budget"], r["init"], r["seed"]) for r in rows] == [
        ("1", "pretrained", "0"), ("1", "scratch", "0"), ("2", "pretrained", "0"), ("2", "scratch", "0"),
    ]  # fmt: skip
    assert {"mean_dice", "liver", "spleen", "kidney_right", "kidney_left"} <= set(rows[0])
    result = json.loads((out / "label_efficiency.json").read_text())
    assert len(result["rows"]) == 4 and [c["budget"] for c in result["curves"]] == [1, 1, 2, 2]
    assert [p["budget"] for p in result["pretrained_minus_scratch"]] == [1, 2]
    assert all(len(p["per_seed"]) == 1 for p in result["pretrained_minus_scratch"])
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    configs = {a: json.loads((out / a / "k1_seed0" / "config.json").read_text()) for a in ("pretrained", "scratch")}
    assert configs["pretrained"]["split"] == configs["scratch"]["split"]  # same pieces, same validation
    assert configs["scratch"]["init"] is None and configs["scratch"]["preset"] == configs["pretrained"]["preset"]
    assert configs["pretrained"]["train_pieces"] == 1 and "label budget: 1 of 2" in configs["pretrained"]["split"]["description"]
    k2 = json.loads((out / "pretrained" / "k2_seed0" / "config.json").read_text())["split"]
    assert k2["val"] == configs["pretrained"]["split"]["val"]
    assert {tuple(p) for p in configs["pretrained"]["split"]["train"]} <= {tuple(p) for p in k2["train"]}

    # run again: every arm is read back, none trained (their metrics are not touched)
    metrics = sorted(out.glob("*/*/metrics.jsonl"))
    stamps = [m.stat().st_mtime_ns for m in metrics]
    status, err = run_cli(capsys, *_grid_args(shared_data, tiny_run, out))
    assert status == 0, err
    assert err.count("finished before, reused") == 4
    assert [m.stat().st_mtime_ns for m in metrics] == stamps
    assert json.loads((out / "label_efficiency.json").read_text())["rows"][0]["reused"] is True


@pytest.mark.parametrize(
    ("budgets", "extra", "message"),
    [("1,3", [], "label budgets must be 1 to 2"), ("1,x", [], "whole numbers"), ("1", ["--resume"], "leave out --resume")],
)
def test_cli_bad_grid_exits_2_before_training(shared_data, tiny_run, tmp_path, capsys, budgets, extra, message):
    out = tmp_path / "grid"
    status, err = run_cli(capsys, *_grid_args(shared_data, tiny_run, out, budgets), *extra)
    assert status == 2 and message in err
    assert not out.exists()


def test_cli_grid_without_init_exits_2(shared_data, tmp_path, capsys):
    args = _grid_args(shared_data, Path("unused"), tmp_path / "grid")
    i = args.index("--init")
    status, err = run_cli(capsys, *args[:i], *args[i + 2 :])
    assert status == 2 and "--init" in err and not (tmp_path / "grid").exists()
