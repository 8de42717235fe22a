"""The method contract: a method defined outside the package (tests/toy_method.py) is one file + one registry
entry, and every part of the platform serves it: the CLI, its own options, the training loop (two trained modules
and an EMA module), exact resume, checkpoints, and downstream jobs reading its published encoder by name."""

from __future__ import annotations

import json

import pytest
import torch
from tests.toy_method import TOY, ToyMethod

from napari_dagman.cli import main
from napari_dagman.core.checkpoint import load_pretrained_encoder, load_tensors
from napari_dagman.core.config import FinetuneConfig, PretrainConfig
from napari_dagman.core.events import CancelToken, StepEvent
from napari_dagman.core.methods.registry import REGISTRY
from napari_dagman.core.segmentation import run_finetuning
from napari_dagman.core.training import build_method, consume, resolve_config, run_pretraining


def toy_config(shared_data, out, **extra) -> PretrainConfig:
    return PretrainConfig.from_dict(
        {
            "images": [str(shared_data / "example_ct.nii.gz")],
            "out": str(out),
            "method": "toy",
            "preset": "tiny",
            "roi": 32,
            "spacing": 4.0,
            "steps": 4,
            "batch_size": 1,
            "preview_every": 0,
            "save_every": 1,
            "seed": 5,
            **extra,
        }
    )


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_the_toy_is_listed_with_its_own_options(capsys):
    assert REGISTRY["toy"] is TOY
    assert main(["methods"]) == 0
    assert "toy " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--method", "toy", "--help"])
    help_text = capsys.readouterr().out
    assert "--toy-scale" in help_text and "toy options" in help_text
    assert "--noise-rate" not in help_text  # another method's option is not offered
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])  # the default method's options, not the toy's
    assert "--toy-scale" not in capsys.readouterr().out


def test_the_toy_trains_from_the_cli_and_updates_both_modules(shared_data, tmp_path):
    out = tmp_path / "toy"
    code = main(
        [
            "pretrain", str(shared_data / "example_ct.nii.gz"), "--out", str(out), "--method", "toy",
            "--toy-scale", "0.7", "--preset", "tiny", "--roi", "32", "--spacing", "4", "--steps", "3",
            "--batch-size", "1", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["toy"]["toy_scale"] == 0.7 and saved["preferred_encoder"] == "online"
    assert set(saved["encoders"]) == {"online", "target"}
    # the seeded initialisation, rebuilt: every module the method declares has moved
    initial = build_method(resolve_config(PretrainConfig.from_dict(saved | {"out": None}, strict=False), 1))
    assert isinstance(initial, ToyMethod)
    trained, meta = load_tensors(out / "model.safetensors")
    for module in ("online", "predictor", "target"):
        state = initial.network(module).state_dict()
        moved = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, trained[f"{module}.{k}"])]
        assert moved, module
    assert json.loads(meta["capabilities"])["trains_class_attention"] is False
    _, resume_meta = load_tensors(out / "resume.safetensors")
    # the optimiser covers both trained modules and never the EMA one
    groups = json.loads(resume_meta["optimizer"])["param_groups"]
    n_trained = sum(1 for m in ("online", "predictor") for p in initial.network(m).parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trained


def test_the_toy_resumes_exactly(shared_data, tmp_path):
    full = tmp_path / "full"
    consume(run_pretraining(toy_config(shared_data, full)))
    part = tmp_path / "part"
    token = CancelToken()
    for event in run_pretraining(toy_config(shared_data, part), cancel=token):
        if isinstance(event, StepEvent) and event.step == 2:
            token.cancel()
    assert sorted(losses(part)) == [1, 2]
    consume(run_pretraining(toy_config(shared_data, part), resume=True))
    assert losses(part) == losses(full)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("toy") / "run"
    consume(run_pretraining(toy_config(shared_data, out, steps=2)))
    return out


def test_downstream_jobs_read_the_toys_published_encoder(toy_run, shared_data, tmp_path):
    encoder = load_pretrained_encoder(toy_run)
    assert encoder.which == "online" and not encoder.trains_class_attention
    assert load_pretrained_encoder(toy_run, "target").which == "target"
    # organ clusters from the CLI on the run's preferred encoder
    out = tmp_path / "emb"
    ct = str(shared_data / "example_ct.nii.gz")
    assert main(["embed", ct, "--checkpoint", str(toy_run), "--out", str(out), "--method", "pca", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["which"] == "online"
    # segmentation fine-tuning starts from it
    config = FinetuneConfig(
        images=[ct],
        segmentations=[str(shared_data / "example_seg_fast_force_split.nii.gz")],
        out=str(tmp_path / "seg"),
        organs=[5],
        init=str(toy_run),
        roi=64,
        steps=1,
        batch_size=1,
        val_split="none",
    )
    finished = consume(run_finetuning(config))
    report = finished.summary["init"]
    assert report["which"] == "online" and report["method"] == "toy" and report["tensors_loaded"] > 0
