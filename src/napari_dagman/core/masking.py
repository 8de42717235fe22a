"""Mask generators on a grid of mask cells (16 voxels a side by default).

Every generator returns a boolean tensor (B, *grid) with True where a cell is hidden from the student. The
number of hidden cells is exact: ``masked_count(N, ratio) = floor(ratio * N + 0.5)`` of the ``N`` cells per
sample (attention-hint then reveals ``hint_count`` of them again, as AttMask-Hints does).

Randomness comes only from the ``generator`` argument, so a mask is a pure function of its inputs and the
generator's seed (exact resume, reproducible previews).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from napari_dagman.core.config import MASK_STRATEGIES as STRATEGIES
from napari_dagman.core.errors import DagmanInputError

ATTENTION_STRATEGIES: frozenset[str] = frozenset({"attention-high", "attention-low", "attention-hint"})


def masked_count(num_cells: int, ratio: float) -> int:
    """Number of cells a strategy hides for a ratio (rounded half up)."""
    if not 0.0 <= ratio <= 1.0:
        raise DagmanInputError(f"mask ratio must be within [0, 1], got {ratio}")
    return int(math.floor(ratio * num_cells + 0.5))


def hint_count(num_cells: int, ratio: float, hint_fraction: float) -> int:
    """Number of hidden top-attended cells that attention-hint reveals: ``hint_fraction * ratio * N``."""
    return int(math.floor(hint_fraction * ratio * num_cells + 0.5))


def _flat_to_grid(flat: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    return flat.reshape(flat.shape[0], *grid)


def random_mask(
    batch: int, grid: Sequence[int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hide ``masked_count`` cells drawn uniformly without replacement (SimMIM / SMIT)."""
    n = math.prod(grid)
    k = masked_count(n, ratio)
    noise = torch.rand(batch, n, generator=generator)
    order = noise.argsort(dim=1)
    flat = torch.zeros(batch, n, dtype=torch.bool)
    flat.scatter_(1, order[:, :k], True)
    return _flat_to_grid(flat, grid)


def block_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
    *,
    min_cells: int = 2,
    max_aspect: float = 3.0,
) -> torch.Tensor:
    """BEiT/iBOT-style block-wise masking: random boxes of random aspect until the count is reached.

    Boxes are added while fewer than ``masked_count`` cells are hidden; the surplus of the last box is then
    given back at random, so the count is exact.
    """
    dims = len(grid)
    n = math.prod(grid)
    k = masked_count(n, ratio)
    out = torch.zeros(batch, *grid, dtype=torch.bool)

    def rand() -> float:
        return float(torch.rand((), generator=generator))

    for b in range(batch):
        mask = out[b]
        attempts = 0
        while int(mask.sum()) < k and attempts < 100 * n:
            attempts += 1
            remaining = k - int(mask.sum())
            volume = min_cells + rand() * max(0.0, remaining - min_cells)
            volume = max(1.0, volume)
            log_aspects = [(rand() * 2 - 1) * math.log(max_aspect) for _ in range(dims)]
            mean_log = sum(log_aspects) / dims
            sides = [
                max(1, min(g, round(volume ** (1 / dims) * math.exp(a - mean_log))))
                for g, a in zip(grid, log_aspects, strict=True)
            ]
            starts = [int(rand() * (g - s + 1)) for g, s in zip(grid, sides, strict=True)]
            box = tuple(slice(st, st + s) for st, s in zip(starts, sides, strict=True))
            mask[box] = True
        flat = mask.reshape(-1)
        count = int(flat.sum())
        if count > k:  # give back the surplus at random
            hidden = flat.nonzero().squeeze(1)
            drop = hidden[torch.randperm(len(hidden), generator=generator)[: count - k]]
            flat[drop] = False
        elif count < k:  # pathological grids: top up at random
            shown = (~flat).nonzero().squeeze(1)
            flat[shown[torch.randperm(len(shown), generator=generator)[: k - count]]] = True
    return out


def attention_mask(attention: torch.Tensor, ratio: float, mode: str = "high") -> torch.Tensor:
    """Hide the ``masked_count`` most (``"high"``) or least (``"low"``) attended cells (AttMask).

    ``attention`` is (B, *grid) (already averaged over heads). Ties are broken by cell order.
    """
    if mode not in ("high", "low"):
        raise DagmanInputError(f"attention mask mode must be 'high' or 'low', got {mode!r}")
    batch, grid = attention.shape[0], attention.shape[1:]
    flat_att = attention.reshape(batch, -1).float()
    n = flat_att.shape[1]
    k = masked_count(n, ratio)
    order = flat_att.argsort(dim=1, descending=(mode == "high"), stable=True)
    flat = torch.zeros(batch, n, dtype=torch.bool, device=attention.device)
    flat.scatter_(1, order[:, :k], True)
    return _flat_to_grid(flat, grid)


def hint_mask(
    attention: torch.Tensor,
    ratio: float,
    *,
    hint_fraction: float = 0.1,
    hint_pool: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """AttMask-Hints: hide the most attended cells, then reveal a few of the very top ones at random.

    ``hint_count(N, ratio, hint_fraction)`` cells are revealed, drawn uniformly among the hidden cells that are
    also in the top ``hint_pool`` fraction of attention (at least as many cells as are revealed).
    """
    mask = attention_mask(attention, ratio, "high")
    batch = attention.shape[0]
    flat_mask = mask.reshape(batch, -1)
    n = flat_mask.shape[1]
    reveal = min(hint_count(n, ratio, hint_fraction), int(flat_mask.sum(dim=1).min()))
    if reveal == 0:
        return mask
    pool = max(reveal, int(math.ceil(hint_pool * n)))
    order = attention.reshape(batch, -1).float().argsort(dim=1, descending=True, stable=True)
    for b in range(batch):
        top = order[b, :pool]
        top = top[flat_mask[b, top]]
        chosen = top[torch.randperm(len(top), generator=generator)[:reveal]]
        flat_mask[b, chosen] = False
    return mask


def make_mask(
    strategy: str,
    *,
    batch: int,
    grid: Sequence[int],
    ratio: float,
    attention: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    hint_fraction: float = 0.1,
    hint_pool: float = 0.1,
) -> torch.Tensor:
    """Dispatch on a strategy name (see `STRATEGIES`)."""
    if strategy == "random":
        return random_mask(batch, grid, ratio, generator)
    if strategy == "block":
        return block_mask(batch, grid, ratio, generator)
    if strategy in ATTENTION_STRATEGIES:
        if attention is None:
            raise DagmanInputError(f"mask strategy '{strategy}' needs an attention map")
        if tuple(attention.shape[1:]) != tuple(grid):
            raise DagmanInputError(
                f"attention grid {tuple(attention.shape[1:])} does not match mask grid {tuple(grid)}"
            )
        if strategy == "attention-hint":
            return hint_mask(
                attention, ratio, hint_fraction=hint_fraction, hint_pool=hint_pool, generator=generator
            )
        return attention_mask(attention, ratio, "high" if strategy == "attention-high" else "low")
    raise DagmanInputError(f"unknown mask strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")


def attention_to_cells(attention: torch.Tensor, cells: Sequence[int]) -> torch.Tensor:
    """Resample a (B, *token_grid) attention map onto the mask-cell grid (area average or nearest)."""
    grid = tuple(attention.shape[1:])
    if grid == tuple(cells):
        return attention
    x = attention.unsqueeze(1).float()
    if all(g % c == 0 for g, c in zip(grid, cells, strict=True)):
        out = (
            torch.nn.functional.adaptive_avg_pool3d(x, cells)
            if len(grid) == 3
            else torch.nn.functional.adaptive_avg_pool2d(x, cells)
        )
    else:
        out = torch.nn.functional.interpolate(x, size=tuple(cells), mode="nearest")
    return out.squeeze(1)
