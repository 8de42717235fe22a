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


class CollapseMonitor:
    """Says once when the teacher's outputs have collapsed for ``patience`` consecutive checks.

    Collapsed = every output on one prototype (``prototypes_in_use`` 1 over at least 8 outputs) or every output
    uniform (``sample_entropy`` above ``uniform``). Short tiny runs on one CT reach a sample entropy of 0.96-0.99
    with tens of prototypes in use and a teacher-student KL of 0.4-0.5 nats, which is learning, not collapse;
    hence the strict 0.999.
    """

    def __init__(self, patience: int = 20, uniform: float = 0.999) -> None:
        self.patience, self.uniform = patience, uniform
        self.streak = 0
        self.reported = False
        self.kind = ""

    def update(self, stats: dict[str, float], outputs: int, step: int) -> str | None:
        """Feed one step's `output_statistics`; returns a warning the first time collapse persists."""
        kind = ""
        if outputs >= 8 and stats["prototypes_in_use"] <= 1:
            kind = "every output falls on one prototype"
        elif stats["sample_entropy"] >= self.uniform:
            kind = "every output is near uniform"
        if not kind:
            self.streak, self.kind = 0, ""
            return None
        self.streak = self.streak + 1 if kind == self.kind or not self.kind else 1
        self.kind = kind
        if self.streak >= self.patience and not self.reported:
            self.reported = True
            return (
                f"the teacher's outputs look collapsed at step {step}: {kind} for {self.streak} steps "
                f"(batch entropy {stats['batch_entropy']:.3f}, {int(stats['prototypes_in_use'])} prototypes in "
                "use). Distillation no longer teaches anything; try a lower --lr, a higher --center-momentum "
                "or a lower --teacher-temp-final"
            )
        return None
