"""How different the attention heads are, and whether self-distillation has collapsed.

DAGMaN's claim is that attention-guided masking makes the class-attention heads look at the same region, and
that a noisy teacher keeps them diverse. A measure of that must not read "diverse" just because every map is
nearly uniform, so the headline figure is centred:

* ``diversity`` = 1 - mean pairwise Pearson correlation of the heads' maps over the tokens, with negative
  correlations counted as 0 (a head that looks where another does not is as different as it can be). 0 =
  identical heads, 1 = unrelated or disjoint heads; near-uniform maps that differ in their pattern score high.
* ``js_divergence``: mean pairwise Jensen-Shannon divergence of the heads' distributions, in bits (0 = identical,
  1 = disjoint supports); it is small whenever the maps are near-uniform, whatever their pattern.
* ``entropy``: each head's entropy divided by log N (1 = uniform, 0 = a single token).
* ``cosine_diversity``: 1 - mean pairwise cosine of the raw probabilities (the figure logged before; it reads
  0.01-0.04 for near-uniform maps whatever their pattern, so it is kept only for comparison).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: below this standard deviation (relative to the mean) a head's map counts as constant (uniform)
_CONSTANT = 1e-9


def _pairs(h: int) -> torch.Tensor:
    return torch.triu(torch.ones(h, h, dtype=torch.bool), diagonal=1)


def head_correlation(attention: torch.Tensor) -> torch.Tensor:
    """(B, H, N) maps -> (B, H, H) Pearson correlations over the tokens.

    A constant map has no pattern: it correlates 1 with another constant map (identical) and 0 with any other.
    """
    a = attention.double()
    centred = a - a.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    constant = norm.squeeze(-1) <= _CONSTANT * a.abs().mean(dim=-1).clamp_min(1e-30) * math.sqrt(a.shape[-1])
    unit = centred / norm.clamp_min(1e-30)
    corr = unit @ unit.transpose(1, 2)
    both = constant.unsqueeze(2) & constant.unsqueeze(1)
    either = constant.unsqueeze(2) | constant.unsqueeze(1)
    corr = torch.where(either, both.double(), corr)
    return corr.clamp(-1.0, 1.0)


def js_divergence(attention: torch.Tensor) -> torch.Tensor:
    """(B, H, N) distributions -> (B, H, H) Jensen-Shannon divergences in bits (0..1)."""
    p = attention.double().clamp_min(0)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    pi, pj = p.unsqueeze(2), p.unsqueeze(1)  # (B, H, 1, N), (B, 1, H, N)
    m = 0.5 * (pi + pj)

    def kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * (x.clamp_min(1e-300).log() - y.clamp_min(1e-300).log()), 0.0).sum(-1)

    return (0.5 * kl(pi, m) + 0.5 * kl(pj, m)) / math.log(2.0)


def head_diversity(attention: torch.Tensor) -> dict[str, Any]:
    """Diversity figures of class-attention heads ``(B, H, N)`` (or ``(H, N)``), each head summing to 1.

    Returns ``diversity`` (centred, see the module docstring), ``correlation`` (mean pairwise Pearson, not
    clipped), ``js_divergence``, ``cosine_diversity``, ``similarity`` (the H x H correlation matrix, mean over
    the batch), per-head ``entropy``, ``entropy_mean``, ``entropy_std``, ``heads`` and ``tokens``.
    """
    a = attention.detach().double().cpu()
    if a.ndim == 2:
        a = a.unsqueeze(0)
    b, h, n = a.shape
    corr = head_correlation(a)
    unit = F.normalize(a, dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    if h > 1:
        pairs = _pairs(h)
        diversity = 1.0 - float(corr[:, pairs].clamp_min(0.0).mean())
        correlation = float(corr[:, pairs].mean())
        js = float(js_divergence(a)[:, pairs].mean())
        cosine_div = 1.0 - float(cosine[:, pairs].mean())
    else:
        diversity, correlation, js, cosine_div = 0.0, 1.0, 0.0, 0.0
    ent = -(a.clamp_min(1e-12) * a.clamp_min(1e-12).log()).sum(dim=-1) / math.log(max(n, 2))
    per_head = ent.mean(dim=0)
    return {
        "diversity": diversity,
        "correlation": correlation,
        "js_divergence": js,
        "cosine_diversity": cosine_div,
        "similarity": corr.mean(dim=0).tolist(),
        "entropy": per_head.tolist(),
        "entropy_mean": float(per_head.mean()),
        "entropy_std": float(per_head.std(unbiased=False)) if h > 1 else 0.0,
        "heads": h,
        "tokens": n,
    }


# --- collapse of self-distillation ------------------------------------------------------------------------------
def output_statistics(
    logits: torch.Tensor, center: torch.Tensor, temperature: float
) -> dict[str, float]:
    """Collapse diagnostics of teacher outputs ``(..., K)`` under centring and sharpening.

    * ``batch_entropy``: entropy of the batch-mean distribution / log K (near 0 = every output on the same
      prototypes: the "dominant dimension" collapse);
    * ``sample_entropy``: mean entropy of each output / log K (near 1 = every output uniform);
    * ``prototypes_in_use``: distinct arg-max prototypes over the batch;
    * ``center_norm``: L2 norm of the centre.
    """
    z = logits.detach().float().reshape(-1, logits.shape[-1])
    k = z.shape[-1]
    p = F.softmax((z - center.reshape(1, -1).float()) / temperature, dim=-1)
    log_k = math.log(k)

    def entropy(q: torch.Tensor) -> torch.Tensor:
        return -(q * q.clamp_min(1e-12).log()).sum(dim=-1)

    return {
        "batch_entropy": float(entropy(p.mean(dim=0))) / log_k,
        "sample_entropy": float(entropy(p).mean()) / log_k,
        "prototypes_in_use": float(torch.unique(p.argmax(dim=-1)).numel()),
        "center_norm": float(center.float().norm()),
    }


def cross_crop_cosine(tokens: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Mean cosine similarity of pairs of tokens that come from *different* crops.

    ``tokens`` is (V, N, C): V crops of N tokens (N = 1 for one pooled output per crop); ``valid`` (V, N) bool
    leaves tokens out (for example those a noisy teacher dropped, which all carry the mask token). Near 1 means
    every crop is described alike: a representation that has collapsed. One pass: the sum over ordered pairs
    from different crops is |sum of all unit vectors|^2 minus the per-crop terms.
    """
    t = F.normalize(tokens.detach().float(), dim=-1)
    if t.ndim == 2:
        t = t.unsqueeze(1)
    if valid is None:
        valid = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    w = valid.to(t.device, t.dtype)
    per_crop = (t * w.unsqueeze(-1)).sum(dim=1)  # (V, C)
    counts = w.sum(dim=1)
    total = per_crop.sum(dim=0)
    cross = float(total @ total - (per_crop * per_crop).sum())
    pairs = float(counts.sum() ** 2 - (counts**2).sum())
    return cross / pairs if pairs > 0 else float("nan")


@dataclass(frozen=True)
class CollapseRule:
    """A figure that says collapse when it stays past ``threshold`` (``above`` or below) for ``patience``
    consecutive observations (steps for a figure logged every step, probes for a probe figure)."""

    key: str
    threshold: float
    above: bool
    patience: int
    says: str

    def tripped(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold


#: What collapse looks like (docs/methods.md). Thresholds from measured runs: the collapsed default dagman of main
#: b4443b9 had a global KL under 0.01 nats from about step 300 of 600 (0.000 at the end) while healthy runs stay
#: above 0.05; random-init stage-3 tokens of different crops have a mean cosine of about 0.95 and collapsed ones
#: 0.998; CASS's and MiM's projections of different crops reached 0.9994-1.0000 when their objectives collapsed.
#: Cosines are read on the fixed probe crops: per step, two crops of homogeneous tissue are alike in any network.
COLLAPSE_RULES: tuple[CollapseRule, ...] = (
    CollapseRule("global_kl", 0.01, False, 25, "the teacher-student KL of the global term is under 0.01 nats: "
                 "distillation no longer teaches anything"),
    CollapseRule("probe_token_cosine", 0.98, True, 2, "the published encoder describes different crops alike "
                 "(stage-3 token cosine over 0.98 on the probe crops)"),
    CollapseRule("probe_output_cosine", 0.98, True, 2, "the outputs the objective compares are alike for "
                 "different crops (cosine over 0.98 on the probe crops)"),
    CollapseRule("teacher_sample_entropy", 0.999, True, 25, "every teacher target is near uniform"),
    CollapseRule("prototypes_in_use", 1.5, False, 25, "every teacher output falls on one prototype"),
)


class CollapseAlarm:
    """Says once per run when a step's figures have shown collapse (see `COLLAPSE_RULES`).

    Fed every step's logged figures (`update`); a figure a method does not log, or that a step does not carry
    (probe figures come every few steps), is not judged and does not break a streak. The message names the figure,
    its value and what to try.
    """

    def __init__(self, rules: tuple[CollapseRule, ...] = COLLAPSE_RULES, from_step: int = 0) -> None:
        self.rules = rules
        self.streaks = {rule.key: 0 for rule in rules}
        self.reported = False
        #: figures of earlier steps are not judged: at initialisation, random projections of different crops are
        #: alike (CASS's at cosine 0.99) and DINO's targets are being formed (the learning-rate warm-up)
        self.from_step = from_step

    def update(self, step: int, figures: dict[str, float]) -> str | None:
        """Feed one step's figures; returns a warning the first time a rule has held for its patience."""
        if step < self.from_step:
            return None
        for rule in self.rules:
            value = figures.get(rule.key)
            if value is None or not math.isfinite(float(value)):
                continue
            self.streaks[rule.key] = self.streaks[rule.key] + 1 if rule.tripped(float(value)) else 0
            if self.streaks[rule.key] >= rule.patience and not self.reported:
                self.reported = True
                return (
                    f"pretraining looks collapsed at step {step}: {rule.says} ({rule.key} {float(value):.4g}, "
                    f"{self.streaks[rule.key]} times in a row). Little is learnt from here on; try more varied views "
                    "(--view-region, augmentation, more volumes), a lower --lr, or see docs/methods.md"
                )
        return None
