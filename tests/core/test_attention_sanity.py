"""Sanity checks of attention maps: flatness, model randomisation, intensity (core.attention.sanity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dagman.core.attention.sanity import (
    WindowAttention,
    attention_sanity,
    body_normalised_entropy,
    head_diversity_floor,
    intensity_correlation,
    normalised_entropy,
    peak_x_uniform,
    randomisation_check,
    volume_windows,
)
from napari_dagman.core.embeddings.features import random_init_encoder
from napari_dagman.core.models.architecture import architecture_for


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_uniform_maps_have_entropy_one_and_peak_one_and_a_sharp_map_does_not():
    uniform = np.full((3, 4, 64), 1 / 64)
    assert normalised_entropy(uniform) == pytest.approx(np.ones(4))
    assert peak_x_uniform(uniform) == pytest.approx(np.ones(4))
    sharp = uniform.copy()
    sharp[:, 0] = _softmax(np.where(np.arange(64) < 4, 3.0, 0.0))[None]
    entropy = normalised_entropy(sharp)
    assert entropy[0] < 0.9 and entropy[1:] == pytest.approx(np.ones(3))
    assert peak_x_uniform(sharp)[0] > 4.0


def test_attention_to_the_body_only_is_not_mistaken_for_structure_inside_it():
    """A map that ignores padding but is uniform over the body is flat where it matters."""
    intensity = np.where(np.arange(64) < 32, 0.5, 0.0)[None].repeat(2, 0)
    attention = np.where(intensity > 0, 1 / 32, 0.0)[:, None, :].repeat(4, 1)
    wa = WindowAttention(attention, intensity)
    assert normalised_entropy(attention).mean() == pytest.approx(np.log(32) / np.log(64))
    assert body_normalised_entropy(wa) == pytest.approx(np.ones(4))


def test_a_map_made_of_intensity_correlates_with_it():
    rng = np.random.default_rng(0)
    intensity = rng.uniform(0.05, 1.0, (5, 64))
    follows = _softmax(2.0 * intensity)[:, None, :].repeat(4, 1)
    assert intensity_correlation(WindowAttention(follows, intensity)) > 0.99
    dark = _softmax(-2.0 * intensity)[:, None, :].repeat(4, 1)
    assert intensity_correlation(WindowAttention(dark, intensity)) < -0.99
    unrelated = _softmax(rng.normal(0, 1, (5, 4, 64)))
    assert abs(intensity_correlation(WindowAttention(unrelated, intensity))) < 0.2


def test_the_randomisation_check_tells_a_sharp_pattern_from_random_networks():
    rng = np.random.default_rng(1)
    random = [_softmax(rng.normal(0, 0.05, (6, 4, 64))) for _ in range(5)]
    sharp = _softmax(np.where(np.arange(64) % 8 == 0, 4.0, 0.0))[None, None].repeat(6, 0).repeat(4, 1)
    check = randomisation_check(sharp, random)
    assert check["beyond_random"] and check["randomisation_distance"] > 10 * check["random_init_spread"]
    one_more = _softmax(rng.normal(0, 0.05, (6, 4, 64)))
    assert not randomisation_check(one_more, random)["beyond_random"]


@pytest.mark.slow
def test_a_random_network_is_within_the_spread_and_a_network_with_sharp_class_attention_is_not():
    arch = architecture_for("tiny", 3)
    array = np.random.default_rng(2).uniform(0, 1, (64, 96, 96)).astype(np.float32)
    windows = volume_windows(array, 64, 3, 32)
    random = attention_sanity(random_init_encoder(arch, 7), windows, random_seeds=(0, 1, 2))
    assert not random["mean"]["beyond_random"] and random["mean"]["normalised_entropy"] > 0.99
    sharp = random_init_encoder(arch, 8)
    block = sharp.class_attention.blocks[-1]
    with torch.no_grad():  # keys follow the tokens, the query is large: the softmax picks a few tokens
        block.q.bias.fill_(3.0)
        block.kv.weight[: block.kv.out_features // 2].normal_(0, 1.0)
    trained = attention_sanity(sharp, windows, random_seeds=(0, 1, 2))
    assert trained["mean"]["beyond_random"]
    assert trained["mean"]["normalised_entropy"] < random["mean"]["normalised_entropy"] - 0.05
    assert set(trained["heads"]) == {"0", "1", "2", "3"}


def test_a_map_with_one_percent_noise_is_flat_and_a_fourfold_peak_on_an_organ_is_not():
    from napari_dagman.core.attention.sanity import FLAT_BAND, flat_heads, is_flat

    rng = np.random.default_rng(3)
    ripple = 1.0 + 0.01 * rng.standard_normal((8, 16, 16))
    assert is_flat(ripple)
    organ = np.ones((8, 16, 16))
    organ[2:5, 4:9, 4:9] = 4.0  # an organ of 75 tokens at four times its share
    assert not is_flat(organ / organ.mean())
    assert is_flat(np.full(10, FLAT_BAND)) and not is_flat(np.full(10, FLAT_BAND * 1.01))
    att = np.stack([_softmax(0.01 * rng.standard_normal(64)), _softmax(np.where(np.arange(64) < 6, 2.0, 0.0))])
    assert flat_heads(att[None]) == [True, False]


def test_flat_heads_with_unlike_ripples_are_not_called_diverse_and_heads_on_different_organs_are():
    """Centred diversity compares shapes: near-uniform heads whose 1 % ripples happen to be unrelated score high on
    it, yet a user sees four identical flat maps, so they must not be reported as more diverse than random heads."""
    rng = np.random.default_rng(0)
    tokens = 512

    def heads(scale: float, n_heads: int = 4, windows: int = 2) -> np.ndarray:
        att = 1.0 + scale * rng.standard_normal((windows, n_heads, tokens))
        att = np.clip(att, 1e-3, None)
        return att / att.sum(-1, keepdims=True)

    random_nets = [heads(0.003) for _ in range(3)]  # random networks: flat, tiny unrelated ripples
    flat = heads(0.01)  # flat heads, more ripple than random ones: centred diversity alone would call it diverse
    result = head_diversity_floor(flat, random_nets)
    assert result["diversity"] > 0.5
    assert not result["diversity_above_chance"] and not result["js_above_chance"]
    organs = np.full((2, 4, tokens), 1.0)
    for h in range(4):  # each head looks at its own organ: a sixteenfold peak on 32 tokens
        organs[:, h, h * 32 : (h + 1) * 32] = 16.0
    organs /= organs.sum(-1, keepdims=True)
    result = head_diversity_floor(organs, random_nets)
    assert result["js_above_chance"] and result["diversity_above_chance"]
