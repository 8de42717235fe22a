"""The recipe's smaller departures, fixed: CaiT's initialisation of the class attention (or PyTorch's, as an
option), no weight decay on learnt tokens, and the preferred encoder recorded with its reason."""

from __future__ import annotations

import pytest
import torch

from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.training.loop import parameter_groups
from napari_dagman.core.training.pretrain import build_method, resolve_config


def _method(**kwargs):
    return build_method(resolve_config(PretrainConfig(method="dagman", preset="tiny", roi=32, steps=10, **kwargs), 1))


def test_the_class_attention_starts_from_caits_initialisation():
    blocks = _method().student.encoder.class_attention.blocks
    for block in blocks:
        for layer in (block.q, block.kv, block.proj, block.mlp[0], block.mlp[2]):
            assert float(layer.weight.std()) == pytest.approx(0.02, rel=0.15)
            assert torch.all(layer.bias == 0)


def test_pytorchs_initialisation_is_an_option_and_keeps_the_teacher_a_copy():
    m = _method(class_attention_init="pytorch")
    s, t = m.student.encoder.class_attention.blocks, m.teacher.encoder.class_attention.blocks
    assert float(s[0].q.weight.std()) > 0.04  # Kaiming-uniform: 1/sqrt(3 fan_in) for 96 inputs, about 0.059
    assert all(torch.equal(a.q.weight, b.q.weight) for a, b in zip(s, t, strict=True))
    assert not torch.equal(s[0].q.weight, s[1].q.weight)  # the blocks of one encoder still differ
    again = _method(class_attention_init="pytorch").student.encoder.class_attention.blocks
    assert torch.equal(again[1].kv.weight, s[1].kv.weight)  # seeded


def test_learnt_tokens_are_not_weight_decayed():
    student = _method().student
    decay, no_decay = (group["params"] for group in parameter_groups(student, 0.05))
    tokens = [student.encoder.class_attention.cls_token, student.encoder.mask_token]
    assert student.encoder.class_attention.cls_token.ndim == 3  # a shape the 1-D rule alone missed
    assert all(any(p is t for p in no_decay) for t in tokens)
    assert not any(any(p is t for p in decay) for t in tokens)
    assert any(p is student.encoder.class_attention.blocks[0].q.weight for p in decay)


def test_the_run_records_its_preferred_encoder_and_why(tmp_path):
    from napari_dagman.core.phantom import make_phantom
    from napari_dagman.core.training import consume, run_pretraining

    ct, _ = make_phantom(shape=(40, 48, 48), spacing=(7.2, 6.7, 6.7))
    config = PretrainConfig(
        out=str(tmp_path / "run"), preset="tiny", roi=32, spacing=4.0, steps=2, batch_size=1, preview_every=0,
        probe_every=0,
    )
    consume(run_pretraining(config, [ct]))
    import json

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["preferred_encoder"] == "teacher"
    assert "EMA teacher" in saved["preferred_reason"] and "momentum starts at" in saved["preferred_reason"]
    # a config.json that records the reason is still a valid config file to start from
    assert PretrainConfig.load(tmp_path / "run" / "config.json").method == "dagman"
