"""The method contract, checked for every registered method and the toy defined in the tests (tests/toy_method.py):
a new method gets this coverage by being registered, without a line here.

For each: a step is finite; every trained parameter gets a gradient unless the method declares it unused
(`SSLMethod.untrained_parameters`); EMA modules get none; the encoders it publishes are in its checkpoint; a run
stopped after one step and resumed repeats the uninterrupted run exactly; and its preferred encoder is accepted
by the attention, embedding and fine-tuning jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tests.toy_method  # noqa: F401  (registers the toy)
import torch

from napari_dagman.core.checkpoint import load_tensors
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.events import CancelToken, StepEvent
from napari_dagman.core.methods.registry import method_names
from napari_dagman.core.runs import RunFolder, published
from napari_dagman.core.training import consume, run_pretraining
from napari_dagman.core.training.distributed import DistContext
from napari_dagman.core.training.pretrain import PretrainTask

METHODS = method_names()
#: the cheapest settings of each method that still exercise all of its parts (MiM: one sample per level)
CHEAP = {"mim": {"samples_mid": 1, "samples_fine": 1}, "cass": {"cnn_width": 0.25}}


@pytest.fixture(scope="module")
def phantom():
    from napari_dagman.core.phantom import make_phantom

    return make_phantom(shape=(48, 64, 64), spacing=(6.0, 5.0, 5.0))


def config(name: str, out: Path, steps: int) -> PretrainConfig:
    return PretrainConfig(
        out=str(out), method=name, preset="tiny", roi=32, spacing=4.0, steps=steps, batch_size=1, preview_every=0,
        probe_every=0, save_every=1, threads=2, precision="fp32", seed=3, options=dict(CHEAP.get(name, {})),
    )  # fmt: skip


def test_the_toy_is_among_the_methods_checked():
    assert "toy" in METHODS and {"dagman", "simmim", "mim", "miram", "cass"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_a_step_is_finite_and_reaches_every_trained_parameter(name, phantom, tmp_path):
    task = PretrainTask(config(name, tmp_path / "run", 2), [phantom[0]])
    task.prepare(RunFolder(tmp_path / "run"), resume=False)
    task.build(torch.device("cpu"), DistContext())
    result = task.step(0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.isfinite(result.loss)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.terms.values())
    result.loss.backward()
    method = task.method
    unused = method.untrained_parameters()
    assert bool(unused) <= method.find_unused_parameters  # DDP must be told about parameters with no gradient
    trained = {
        f"{module}.{p}": v for module, m in method.trained_modules().items() for p, v in m.named_parameters()
    }
    missing = [
        n for n, p in trained.items() if p.requires_grad and not n.startswith(unused) and p.grad is None
    ]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in trained.values() if p.grad is not None)
    declared = [n for n in trained if n.startswith(unused)]
    assert len(declared) == 0 or unused  # what is declared unused exists
    for module in method.ema_modules().values():
        assert all(p.grad is None for p in module.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_a_resumed_run_repeats_the_uninterrupted_one_and_publishes_its_encoders(name, phantom, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    consume(run_pretraining(config(name, straight, 2), [phantom[0]]))
    # stopped after its first step (the same 2-step schedules: EMA momentum, warm-ups), then resumed
    token = CancelToken()
    for event in run_pretraining(config(name, resumed, 2), [phantom[0]], cancel=token):
        if isinstance(event, StepEvent) and event.step == 1:
            token.cancel()
    consume(run_pretraining(config(name, resumed, 2), [phantom[0]], resume=True))

    def last(run: Path) -> dict:
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        return {k: v for k, v in row.items() if k not in ("time", "seconds")}

    assert last(straight) == last(resumed)
    a, b = load_tensors(straight / "model.safetensors")[0], load_tensors(resumed / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = published(straight)
    for encoder in info.encoders.values():  # every published encoder's weights are in the checkpoint
        assert any(k.startswith(encoder.prefix + ".") for k in a), encoder


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_the_preferred_encoder_serves_attention_embeddings_and_fine_tuning(name, phantom, tmp_path):
    from napari_dagman.core.attention import attention_job
    from napari_dagman.core.config import AttentionConfig, EmbedConfig, FinetuneConfig
    from napari_dagman.core.embeddings import run_embedding
    from napari_dagman.core.io import write_volume
    from napari_dagman.core.segmentation import run_finetuning

    ct, labels = phantom
    run = tmp_path / "run"
    consume(run_pretraining(config(name, run, 1), [ct]))
    preferred = published(run).resolve("auto")

    def finish(generator):
        try:
            while True:
                next(generator)
        except StopIteration as stop:
            return stop.value

    attention = finish(attention_job(AttentionConfig(checkpoint=str(run), scope="crop", checks=False), ct))
    assert attention.model["which"] == preferred.name
    assert (attention.maps is not None) == preferred.class_attention_trained
    embedding = finish(
        run_embedding(
            EmbedConfig(checkpoint=str(run), patch=8, stride=8, method="pca", clustering="none", cache=False),
            ct,
        )
    )
    assert embedding.embeddings.settings["which"] == preferred.name and len(embedding.embeddings) > 3
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_volume(labels, tmp_path / "labels.nii.gz")
    finetune = FinetuneConfig(
        images=[str(tmp_path / "ct.nii.gz")], segmentations=[str(tmp_path / "labels.nii.gz")], out=str(tmp_path / "ft"),
        init=str(run), steps=1, roi=64, spacing=6.0, batch_size=1, val_split="none", threads=2, organs=[5],
    )  # fmt: skip
    finished = consume(run_finetuning(finetune))
    assert finished.steps_done == 1
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["init_encoder"] in (
        "auto",
        preferred.name,
    )
