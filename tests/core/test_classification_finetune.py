"""Fine-tuning the encoder with a classification head on the training loop (`classify --finetune`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tests.core.test_classification import organ_table
from tests.helpers import run_cli

FT = ["--folds", "2", "--shots", "all", "--bootstrap", "200", "--finetune", "--finetune-batch", "2", "--quiet"]


def classify(capsys, table, run, out, *extra):
    return run_cli(capsys, "classify", str(table), "--checkpoint", str(run), "--out", str(out), *FT, *extra)


def test_finetune_trains_one_resumable_run_per_fold_and_reuses_finished_ones(tmp_path, capsys, shared_data, tiny_run):
    table = organ_table(tmp_path, shared_data)
    out = tmp_path / "out"
    code, stderr = classify(capsys, table, tiny_run, out, "--finetune-steps", "4")
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    head = metrics["heads"]["finetune"]
    assert head["auc_ci95"] is None or head["auc_ci95"][0] <= head["auc"] <= head["auc_ci95"][1]
    assert sorted(np.asarray(head["confusion"]).sum(axis=1).tolist()) == [4, 4]
    assert metrics["finetune_runs"]["trained"] == 2 and metrics["finetune_runs"]["reused"] == 0
    assert {d["minus"] for d in metrics["finetune_differences"]} == {"encoder", "random-init", "intensity"}
    assert all(d["minus"] != "finetune" for d in metrics["differences"])
    predictions = pd.read_csv(out / "predictions.csv")
    first = predictions[["finetune_p_liver", "finetune_p_spleen"]].to_numpy()
    assert np.allclose(first.sum(axis=1), 1.0, atol=1e-5)
    assert set(pd.read_csv(out / "curve.csv")["features"]) == {"encoder", "random-init", "intensity", "finetune"}
    for fold in (0, 1):
        run = out / "finetune" / "shots-all" / f"fold-{fold}"
        info = json.loads((run / "run.json").read_text())
        assert info["job"] == "classify" and info["status"] == "completed" and info["steps_done"] == 4
        assert info["data"] == [{"image": str(shared_data / "example_ct.nii.gz"), "rows": 4}]
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
        trained = json.loads((run / "config.json").read_text())["train_rows"]
        tested = predictions.index[predictions["fold"] == fold].tolist()
        assert sorted(trained + tested) == list(range(8))  # the fold's test rows are never trained on

    # the same command again: nothing is trained, the saved weights give the same probabilities
    code, stderr = classify(capsys, table, tiny_run, out, "--finetune-steps", "4")
    assert code == 0, stderr
    again = json.loads((out / "metrics.json").read_text())["finetune_runs"]
    assert again["trained"] == 0 and again["reused"] == 2
    assert np.array_equal(pd.read_csv(out / "predictions.csv")[["finetune_p_liver", "finetune_p_spleen"]], first)

    # more steps: each run resumes from its checkpoint and continues its metrics
    code, stderr = classify(capsys, table, tiny_run, out, "--finetune-steps", "6")
    assert code == 0, stderr
    assert json.loads((out / "metrics.json").read_text())["finetune_runs"]["resumed"] == 2
    run = out / "finetune" / "shots-all" / "fold-0"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_a_fold_folder_that_trained_other_rows_is_refused_in_one_line(tmp_path, capsys, shared_data, tiny_run):
    table = organ_table(tmp_path, shared_data)
    out = tmp_path / "out"
    assert classify(capsys, table, tiny_run, out, "--finetune-steps", "2")[0] == 0
    code, stderr = classify(capsys, table, tiny_run, out, "--finetune-steps", "2", "--seed", "1")  # other folds
    assert code == 2
    assert "fine-tuned other rows of the table" in stderr and "Traceback" not in stderr


def test_a_cancelled_fine_tuning_resumes_to_the_uninterrupted_weights(tmp_path, shared_data, tiny_run):
    from napari_dagman.core.checkpoint import load_tensors
    from napari_dagman.core.classification import classify_job
    from napari_dagman.core.config.classify import ClassifyConfig
    from napari_dagman.core.events import CancelToken, JobCancelled, ProgressEvent

    table = organ_table(tmp_path, shared_data)
    base = dict(table=str(table), checkpoint=str(tiny_run), folds=2, shots="all", bootstrap=200, controls=False,
                finetune=True, finetune_steps=5, finetune_batch=2)  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    list(classify_job(ClassifyConfig(**base, out=str(whole))))
    cancel = CancelToken()
    with pytest.raises(JobCancelled):
        for event in classify_job(ClassifyConfig(**base, out=str(parts)), cancel):
            if isinstance(event, ProgressEvent) and event.stage == "fine-tuning" and event.done == 3:
                cancel.cancel()  # in the first fold's run, after its third step
    fold0 = "finetune/shots-all/fold-0/model.safetensors"
    assert json.loads((parts / "finetune/shots-all/fold-0/run.json").read_text())["status"] == "cancelled"
    finished = list(classify_job(ClassifyConfig(**base, out=str(parts))))[-1]
    assert finished.summary["finetune_runs"]["resumed"] == 1
    a, _ = load_tensors(whole / fold0)
    b, _ = load_tensors(parts / fold0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_head_pools_the_tokens_the_probe_pools():
    """The fine-tuned head starts from the probe's features: the same stage, the same tokens of the box."""
    from napari_dagman.core.classification.features import pool_boxes
    from napari_dagman.core.classification.finetune import BoxPooledClassifier
    from napari_dagman.core.models.architecture import architecture_for
    from napari_dagman.core.models.encoder import SwinEncoder

    torch.manual_seed(0)
    net = BoxPooledClassifier(SwinEncoder(architecture_for("tiny", 3)).eval(), stage=2, classes=2).eval()
    crop = np.random.default_rng(0).random((32, 32, 32), dtype=np.float32)
    lo, hi = np.array([3, 9, 17]), np.array([13, 20, 30])
    images, masks = net.batch([(crop, lo, hi)], torch.device("cpu"))
    with torch.no_grad():
        fmap = net.encoder(images, class_attention=False).stages[2][0].numpy()
        pooled = torch.from_numpy(pool_boxes(fmap, net.factor, lo[None], hi[None]))
        assert torch.allclose(net(images, masks), net.head(net.norm(pooled)), atol=1e-5)
        other = net.head(net.norm(torch.from_numpy(fmap.mean(axis=(1, 2, 3))[None])))
        assert not torch.allclose(net(images, masks), other, atol=1e-4)  # not the whole crop's mean
