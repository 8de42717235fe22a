"""Invariants of the mask generators: exact counts, top-attended cells, hints, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from napari_dagman.core.masking import (
    attention_mask,
    attention_to_cells,
    block_mask,
    hint_count,
    hint_mask,
    make_mask,
    masked_count,
    random_mask,
)

GRIDS = [(4, 4, 4), (6, 6, 6), (7, 7), (2, 2, 2)]
RATIOS = [0.0, 0.3, 0.6, 0.75, 1.0]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_masked_count_for_every_strategy(grid, ratio):
    n = math.prod(grid)
    k = masked_count(n, ratio)
    assert k == int(math.floor(ratio * n + 0.5))
    gen = torch.Generator().manual_seed(1)
    attention = torch.rand(3, *grid, generator=gen)
    for strategy in ("random", "block", "attention-high", "attention-low"):
        mask = make_mask(strategy, batch=3, grid=grid, ratio=ratio, attention=attention, generator=gen)
        assert mask.shape == (3, *grid) and mask.dtype == torch.bool
        assert mask.flatten(1).sum(1).tolist() == [k, k, k], strategy


def test_attention_high_hides_exactly_the_most_attended_cells():
    gen = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 4, 4, 4, generator=gen)
    mask = attention_mask(attention, 0.6, "high")
    k = masked_count(64, 0.6)
    for b in range(2):
        flat = attention[b].flatten()
        top = set(flat.argsort(descending=True)[:k].tolist())
        assert set(mask[b].flatten().nonzero().squeeze(1).tolist()) == top
        # every hidden cell is attended at least as much as every visible one
        assert flat[mask[b].flatten()].min() >= flat[~mask[b].flatten()].max()
    low = attention_mask(attention, 0.6, "low")
    assert all(
        attention[b].flatten()[low[b].flatten()].max() <= attention[b].flatten()[~low[b].flatten()].min()
        for b in range(2)
    )


def test_hints_reveal_the_stated_fraction_from_the_top_pool():
    gen = torch.Generator().manual_seed(3)
    attention = torch.rand(4, 6, 6, 6, generator=gen)
    n, ratio, fraction, pool = 216, 0.6, 0.1, 0.1
    high = attention_mask(attention, ratio, "high")
    hinted = hint_mask(attention, ratio, hint_fraction=fraction, hint_pool=pool, generator=gen)
    reveal = hint_count(n, ratio, fraction)
    assert reveal == round(0.1 * 0.6 * 216)  # 13 cells
    top_pool = math.ceil(pool * n)
    for b in range(4):
        revealed = (high[b] & ~hinted[b]).flatten()
        assert int(revealed.sum()) == reveal
        assert not (hinted[b] & ~high[b]).any()  # hints only un-hide, never hide
        ranks = attention[b].flatten().argsort(descending=True).argsort()
        assert ranks[revealed].max() < top_pool  # revealed cells come from the top 10 % of attention
        assert int(hinted[b].sum()) == masked_count(n, ratio) - reveal


def test_masks_are_reproducible_from_the_generator_seed():
    def draw(seed, fn):
        return fn(torch.Generator().manual_seed(seed))

    for fn in (lambda g: random_mask(2, (4, 4, 4), 0.6, g), lambda g: block_mask(2, (6, 6, 6), 0.4, g)):
        assert torch.equal(draw(5, fn), draw(5, fn))
        assert not torch.equal(draw(5, fn), draw(6, fn))


def test_block_masks_are_blocky():
    """Block masks hide contiguous boxes: far fewer hidden/visible boundaries than random masks."""
    gen = torch.Generator().manual_seed(0)

    def boundaries(mask):
        m = mask.float()
        return sum(float((m.diff(dim=d) != 0).sum()) for d in range(1, m.ndim))

    block = block_mask(8, (8, 8, 8), 0.4, gen)
    rand = random_mask(8, (8, 8, 8), 0.4, gen)
    assert boundaries(block) < 0.6 * boundaries(rand)


def test_attention_to_cells_pools_tokens_into_larger_cells():
    att = torch.arange(64, dtype=torch.float32).reshape(1, 4, 4, 4)
    cells = attention_to_cells(att, (2, 2, 2))
    assert cells.shape == (1, 2, 2, 2)
    assert cells[0, 0, 0, 0] == att[0, :2, :2, :2].mean()
    assert torch.equal(attention_to_cells(att, (4, 4, 4)), att)


def test_bad_strategy_and_ratio():
    from napari_dagman.core.errors import DagmanInputError

    with pytest.raises(DagmanInputError, match="unknown mask strategy"):
        make_mask("checkerboard", batch=1, grid=(2, 2), ratio=0.5)
    with pytest.raises(DagmanInputError, match="needs an attention map"):
        make_mask("attention-high", batch=1, grid=(2, 2), ratio=0.5)
    with pytest.raises(DagmanInputError, match="within"):
        masked_count(10, 1.5)
