"""Mask strategies on a grid of mask cells (16 voxels a side by default), as one registry.

Every strategy returns a boolean tensor (B, *grid) with True where a cell is hidden from the student. The number
of hidden cells is exact: ``masked_count(N, ratio) = floor(ratio * N + 0.5)`` of the ``N`` cells per sample
(attention-hint then reveals ``hint_count`` of them again, as AttMask-Hints does).

Randomness comes only from the ``generator`` argument, so a mask is a pure function of its inputs and the
generator's seed (exact resume, reproducible previews). Ties in attention are broken at random (seeded), never
by cell order, so a coarse attention map does not bias the boundary of the mask towards one corner.

Attention strategies can be told which cells the attention did not see (``unseen``: the cells a noisy teacher
dropped from its input). Those cells are not ranked: they receive their share of the budget,
``round(ratio * |unseen|)``, at random, and the rest of the budget goes to the most (or least) attended seen
cells. Whether a cell is hidden then does not depend on whether the teacher dropped it (docs/methods.md).

Adding a strategy = one function and one `register_mask_strategy` call; config validation, the methods, the CLI
and the attention explorer read `MASK_STRATEGIES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from napari_dagman.core.errors import DagmanInputError


# --- counts -------------------------------------------------------------------------------------------------
def masked_count(num_cells: int, ratio: float) -> int:
    """Number of cells a strategy hides for a ratio (rounded half up)."""
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise DagmanInputError(f"mask ratio must be within [0, 1], got {ratio}")
    return int(math.floor(ratio * num_cells + 0.5))


def hint_count(num_cells: int, ratio: float, hint_fraction: float) -> int:
    """Number of hidden top-attended cells that attention-hint reveals: ``hint_fraction * ratio * N``."""
    return int(math.floor(hint_fraction * ratio * num_cells + 0.5))


def _flat_to_grid(flat: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    return flat.reshape(flat.shape[0], *grid)


def rank_cells(
    scores: torch.Tensor, descending: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Cell indices of a flat (N,) score vector in order, equal scores in a random (seeded) order."""
    n = scores.shape[0]
    perm = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = scores.float().cpu()[perm].argsort(descending=descending, stable=True)
    return perm[order]


# --- the strategies -------------------------------------------------------------------------------------------
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


def _budget(n: int, k: int, unseen: int, ratio: float) -> tuple[int, int]:
    """Split ``k`` hidden cells into (ranked among seen cells, drawn at random among unseen cells)."""
    k_unseen = min(k, unseen, int(math.floor(ratio * unseen + 0.5)))
    k_seen = k - k_unseen
    if k_seen > n - unseen:  # more than the seen cells can hold: the rest goes to the unseen ones
        k_unseen += k_seen - (n - unseen)
        k_seen = n - unseen
    return k_seen, k_unseen


def attention_mask(
    attention: torch.Tensor,
    ratio: float,
    mode: str = "high",
    *,
    generator: torch.Generator | None = None,
    unseen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hide the ``masked_count`` most (``"high"``) or least (``"low"``) attended cells (AttMask).

    ``attention`` is (B, *grid) (already averaged over heads). Equal attention values are ranked in a random
    order drawn from ``generator`` (cell order without one). ``unseen`` (B, *grid): cells the attention did
    not see; they are hidden at random with the same ratio and the rest of the budget is ranked over the others.
    """
    if mode not in ("high", "low"):
        raise DagmanInputError(f"attention mask mode must be 'high' or 'low', got {mode!r}")
    batch, grid = attention.shape[0], attention.shape[1:]
    flat_att = attention.reshape(batch, -1).float().cpu()
    n = flat_att.shape[1]
    k = masked_count(n, ratio)
    flat_unseen = (
        torch.zeros(batch, n, dtype=torch.bool) if unseen is None else unseen.reshape(batch, n).bool().cpu()
    )
    flat = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        seen_idx = (~flat_unseen[b]).nonzero().squeeze(1)
        unseen_idx = flat_unseen[b].nonzero().squeeze(1)
        k_seen, k_unseen = _budget(n, k, len(unseen_idx), ratio)
        order = rank_cells(flat_att[b, seen_idx], descending=(mode == "high"), generator=generator)
        flat[b, seen_idx[order[:k_seen]]] = True
        if k_unseen:
            pick = torch.randperm(len(unseen_idx), generator=generator)[:k_unseen]
            flat[b, unseen_idx[pick]] = True
    return _flat_to_grid(flat, grid)


def hint_mask(
    attention: torch.Tensor,
    ratio: float,
    *,
    hint_fraction: float = 0.1,
    hint_pool: float = 0.1,
    generator: torch.Generator | None = None,
    unseen: torch.Tensor | None = None,
) -> torch.Tensor:
    """AttMask-Hints: hide the most attended cells, then reveal a few of the very top ones at random.

    ``hint_count(N, ratio, hint_fraction)`` cells are revealed, drawn uniformly among the hidden cells that are
    also in the top ``hint_pool`` fraction of attention (at least as many cells as are revealed). Unseen cells
    are never hints (their attention is unknown).
    """
    mask = attention_mask(attention, ratio, "high", generator=generator, unseen=unseen)
    batch = attention.shape[0]
    flat_mask = mask.reshape(batch, -1)
    n = flat_mask.shape[1]
    reveal = min(hint_count(n, ratio, hint_fraction), int(flat_mask.sum(dim=1).min()))
    if reveal == 0:
        return mask
    pool = max(reveal, int(math.ceil(hint_pool * n)))
    flat_att = attention.reshape(batch, -1).float().cpu()
    flat_unseen = None if unseen is None else unseen.reshape(batch, -1).bool().cpu()
    for b in range(batch):
        order = rank_cells(flat_att[b], descending=True, generator=generator)
        if flat_unseen is not None:
            order = order[~flat_unseen[b, order]]
        top = order[:pool]
        top = top[flat_mask[b, top]]
        chosen = top[torch.randperm(len(top), generator=generator)[:reveal]]
        flat_mask[b, chosen] = False
    return mask


# --- the registry -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskRequest:
    """Everything a strategy may use to draw the masks of one batch."""

    batch: int
    grid: tuple[int, ...]
    ratio: float
    generator: torch.Generator | None = None
    attention: torch.Tensor | None = None  # (B, *grid), averaged over heads
    unseen: torch.Tensor | None = None  # (B, *grid) cells the attention did not see
    hint_fraction: float = 0.1
    hint_pool: float = 0.1


@dataclass(frozen=True)
class MaskStrategy:
    """A named mask strategy: its function, whether it needs an attention map, and a one-line description."""

    name: str
    description: str
    draw: Callable[[MaskRequest], torch.Tensor]
    needs_attention: bool = False


MASK_STRATEGIES: dict[str, MaskStrategy] = {}


def register_mask_strategy(strategy: MaskStrategy) -> MaskStrategy:
    if strategy.name in MASK_STRATEGIES:
        raise ValueError(f"mask strategy '{strategy.name}' is registered twice")
    MASK_STRATEGIES[strategy.name] = strategy
    return strategy


register_mask_strategy(
    MaskStrategy(
        "random",
        "cells drawn uniformly at random (SimMIM, SMIT)",
        lambda r: random_mask(r.batch, r.grid, r.ratio, r.generator),
    )
)
register_mask_strategy(
    MaskStrategy(
        "block",
        "random boxes of random aspect (BEiT / iBOT block-wise masking)",
        lambda r: block_mask(r.batch, r.grid, r.ratio, r.generator),
    )
)
register_mask_strategy(
    MaskStrategy(
        "attention-high",
        "the most attended cells (AttMask-High; DAGMaN with a noisy teacher)",
        lambda r: attention_mask(r.attention, r.ratio, "high", generator=r.generator, unseen=r.unseen),
        needs_attention=True,
    )
)
register_mask_strategy(
    MaskStrategy(
        "attention-low",
        "the least attended cells (AttMask-Low, the ablation that hides background)",
        lambda r: attention_mask(r.attention, r.ratio, "low", generator=r.generator, unseen=r.unseen),
        needs_attention=True,
    )
)
register_mask_strategy(
    MaskStrategy(
        "attention-hint",
        "the most attended cells, with a few of the very top ones shown again as hints (AttMask-Hints)",
        lambda r: hint_mask(
            r.attention,
            r.ratio,
            hint_fraction=r.hint_fraction,
            hint_pool=r.hint_pool,
            generator=r.generator,
            unseen=r.unseen,
        ),
        needs_attention=True,
    )
)


def strategy_names() -> tuple[str, ...]:
    return tuple(MASK_STRATEGIES)


def attention_strategies() -> frozenset[str]:
    return frozenset(name for name, s in MASK_STRATEGIES.items() if s.needs_attention)


def get_strategy(name: str) -> MaskStrategy:
    try:
        return MASK_STRATEGIES[name]
    except KeyError:
        raise DagmanInputError(
            f"unknown mask strategy '{name}'; choose one of {', '.join(MASK_STRATEGIES)}"
        ) from None


def make_mask(
    strategy: str,
    *,
    batch: int,
    grid: Sequence[int],
    ratio: float,
    attention: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    unseen: torch.Tensor | None = None,
    hint_fraction: float = 0.1,
    hint_pool: float = 0.1,
) -> torch.Tensor:
    """Draw the masks of one batch with a registered strategy."""
    spec = get_strategy(strategy)
    grid = tuple(int(g) for g in grid)
    if spec.needs_attention:
        if attention is None:
            raise DagmanInputError(f"mask strategy '{strategy}' needs an attention map")
        if tuple(attention.shape[1:]) != grid:
            raise DagmanInputError(
                f"attention grid {tuple(attention.shape[1:])} does not match mask grid {grid}"
            )
    masked_count(math.prod(grid), ratio)  # validates the ratio for every strategy
    request = MaskRequest(batch, grid, ratio, generator, attention, unseen, hint_fraction, hint_pool)
    return spec.draw(request)


@dataclass(frozen=True)
class MaskRecipe:
    """How a run hides cells: the strategy, the ratio, its per-image jitter, the share of images masked at all and
    the hint settings. Training (`MaskedMethod.choose_mask`) and the explorer's previews draw through the same
    `draw_masks`, so a preview shows the masks the run drew, not the defaults of another method."""

    strategy: str = "random"
    ratio: float = 0.6
    jitter: float = 0.0
    masking_prob: float = 1.0
    hint_fraction: float = 0.1
    hint_pool: float = 0.1

    @classmethod
    def from_options(cls, options: object) -> MaskRecipe:
        """The recipe of a method's `MaskingOptions` (any object with those fields)."""
        return cls(
            strategy=str(getattr(options, "mask_strategy", "random")),
            ratio=float(getattr(options, "mask_ratio", 0.6)),
            jitter=float(getattr(options, "mask_ratio_jitter", 0.0)),
            masking_prob=float(getattr(options, "masking_prob", 1.0)),
            hint_fraction=float(getattr(options, "hint_fraction", 0.1)),
            hint_pool=float(getattr(options, "hint_pool", 0.1)),
        )

    def describe(self) -> str:
        """E.g. "attention-high, ratio 0.3 +- 0.2, half of the images masked"."""
        text = f"{self.strategy}, ratio {self.ratio:g}" + (f" +- {self.jitter:g}" if self.jitter else "")
        if self.masking_prob < 1.0:
            share = "half" if abs(self.masking_prob - 0.5) < 1e-9 else f"{self.masking_prob:.0%}"
            text += f", {share} of the images masked"
        return text


def draw_masks(
    recipe: MaskRecipe,
    *,
    batch: int,
    grid: Sequence[int],
    attention: torch.Tensor | None,
    generator: torch.Generator,
    unseen: torch.Tensor | None = None,
) -> torch.Tensor:
    """A batch of masks as the recipe draws them: ``attention`` is (B, *grid) on the cells (or None for strategies
    that need none). With ``masking_prob`` < 1 an image is left whole with that chance, and with ``jitter`` each
    image draws its ratio from ``ratio +- jitter`` (AttMask / iBOT); otherwise one call draws the batch."""
    common = {"hint_fraction": recipe.hint_fraction, "hint_pool": recipe.hint_pool}
    if recipe.masking_prob >= 1.0 and recipe.jitter == 0.0:
        return make_mask(
            recipe.strategy,
            batch=batch,
            grid=grid,
            ratio=recipe.ratio,
            attention=attention,
            generator=generator,
            unseen=unseen,
            **common,
        )
    masks = []
    for b in range(batch):
        masked = float(torch.rand((), generator=generator)) < recipe.masking_prob
        ratio = recipe.ratio + (2.0 * float(torch.rand((), generator=generator)) - 1.0) * recipe.jitter
        if not masked:
            masks.append(torch.zeros(1, *grid, dtype=torch.bool))
            continue
        masks.append(
            make_mask(
                recipe.strategy,
                batch=1,
                grid=grid,
                ratio=min(1.0, max(0.0, ratio)),
                attention=None if attention is None else attention[b : b + 1],
                generator=generator,
                unseen=None if unseen is None else unseen[b : b + 1],
                **common,
            )
        )
    return torch.cat(masks)


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
