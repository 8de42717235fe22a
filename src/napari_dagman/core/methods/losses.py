"""Losses and schedules shared by the self-supervised methods (written once, imported by each method)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (step ``total``), over the *global* step."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, then ``end``."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


def learning_rate(step: int, total: int, *, peak: float, warmup: int, final: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``final`` (SMIT / iBOT)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine_schedule(step - warmup, max(1, total - warmup), peak, final)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s over the parameters the teacher has (matched by name)."""
    student_params = dict(student.named_parameters())
    for name, p_t in teacher.named_parameters():
        p_t.mul_(momentum).add_(student_params[name].detach().to(p_t.dtype), alpha=1.0 - momentum)


def masked_l1(target: torch.Tensor, prediction: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """L1 over the hidden voxels only: sum(|x - x_hat| * M) / (sum(M) + 1e-5) (SimMIM / SMIT)."""
    m = voxel_mask.unsqueeze(1).to(prediction.dtype)
    return (torch.abs(target - prediction) * m).sum() / (m.sum() * target.shape[1] + 1e-5)


class DistillationLoss(nn.Module):
    """iBOT-style self-distillation: cross-view global term + masked-patch term, with centring.

    Teacher probabilities are ``softmax((z_t - c) / tau_t)``, the student's ``log_softmax(z_s / tau_s)``.
    Centres ``c`` are running means of the teacher outputs (buffers: saved with a checkpoint, so a resumed
    run continues exactly).
    """

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center_global", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, out_dim))

    def global_loss(
        self,
        teacher: torch.Tensor,
        student: torch.Tensor,
        views: int,
        teacher_temp: float,
        local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-view only: mean over pairs q != v of H(P_t(view q), P_s(view v)). Inputs (views*B, K).

        ``local`` (L*B, K) are the student's logits of L local crops per sample (DINO's multi-crop): every
        teacher view also teaches every local crop of its sample, and those pairs join the mean.
        """
        t = F.softmax((teacher.float() - self.center_global) / teacher_temp, dim=-1).chunk(views)
        s = list(F.log_softmax(student.float() / self.student_temp, dim=-1).chunk(views))
        students = [(v, view) for v, view in enumerate(s)]
        if local is not None and local.numel():
            per_sample = teacher.shape[0] // views
            locals_ = F.log_softmax(local.float() / self.student_temp, dim=-1).split(per_sample)
            students += [(-1, crop) for crop in locals_]  # a local crop is never the teacher's own view
        total, pairs = teacher.new_zeros(()).float(), 0
        for q in range(views):
            for v, student_view in students:
                if q != v:
                    total = total + torch.sum(-t[q] * student_view, dim=-1).mean()
                    pairs += 1
        return total / max(1, pairs)

    def patch_loss(
        self, teacher: torch.Tensor, student: torch.Tensor, token_mask: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Same view, hidden tokens only: mean_b [sum_i m_i H(P_t_i, P_s_i) / max(1, sum_i m_i)].

        ``teacher``/``student`` are (B, N, K); ``token_mask`` is (B, N) with 1 on hidden tokens.
        """
        t = F.softmax((teacher.float() - self.center_patch) / teacher_temp, dim=-1)
        s = F.log_softmax(student.float() / self.student_temp, dim=-1)
        per_token = torch.sum(-t * s, dim=-1)
        m = token_mask.float()
        return ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()

    @torch.no_grad()
    def teacher_entropy(
        self, teacher: torch.Tensor, teacher_temp: float, token_mask: torch.Tensor | None = None
    ) -> float:
        """Mean entropy of the teacher's target distribution: the floor of the cross-entropy terms.

        ``cross-entropy - teacher entropy`` is the KL divergence the student actually reduces; logging it
        separates learning from the rise of the cross-entropy that the teacher-temperature warm-up causes.
        Global outputs are (B, K); patch outputs (B, N, K) are averaged like `patch_loss`, over the hidden
        tokens of ``token_mask``.
        """
        center = self.center_global if token_mask is None else self.center_patch
        p = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
        if token_mask is None:
            return float(entropy.mean())
        m = token_mask.float()
        return float(((entropy * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean())

    @torch.no_grad()
    def update_centers(
        self, teacher_global: torch.Tensor, teacher_patch: torch.Tensor, seen: torch.Tensor | None = None
    ) -> None:
        """c <- m c + (1 - m) mean(z_t), averaged over all processes under DistributedDataParallel.

        Called after the step's losses, so a step's loss uses the previous centre. ``seen`` (B, N) limits the
        patch centre to the tokens the teacher saw (dropped tokens are outliers made of the mask token).
        """
        g = teacher_global.float().mean(dim=0, keepdim=True)
        if seen is None:
            p = teacher_patch.float().mean(dim=(0, 1), keepdim=True)
        else:
            w = seen.float().unsqueeze(-1)
            p = ((teacher_patch.float() * w).sum(dim=(0, 1)) / w.sum().clamp_min(1.0)).reshape(1, 1, -1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(g)
            torch.distributed.all_reduce(p)
            g, p = g / world, p / world
        self.center_global.mul_(self.center_momentum).add_(g, alpha=1 - self.center_momentum)
        self.center_patch.mul_(self.center_momentum).add_(p, alpha=1 - self.center_momentum)


def patchify(x: torch.Tensor, cell: int) -> torch.Tensor:
    """(N, 1, *grid*cell) -> (N, cells, cell**dims): the voxels of each cell, cells in raster order."""
    n, dims = x.shape[0], x.ndim - 2
    grid = [s // cell for s in x.shape[2:]]
    if dims == 3:
        gz, gy, gx = grid
        p = x.reshape(n, gz, cell, gy, cell, gx, cell).permute(0, 1, 3, 5, 2, 4, 6)
    else:
        gy, gx = grid
        p = x.reshape(n, gy, cell, gx, cell).permute(0, 1, 3, 2, 4)
    return p.reshape(n, math.prod(grid), cell**dims)


def masked_cell_mse(
    target: torch.Tensor,
    prediction: torch.Tensor,
    cell_mask: torch.Tensor,
    cell: int,
    *,
    normalise: bool = True,
) -> torch.Tensor:
    """MAE's loss on hidden cells: MSE per voxel, averaged per cell, then over the hidden cells only.

    With ``normalise`` (MAE's ``norm_pix_loss``) each target cell is standardised by its own mean and variance,
    so the loss is about structure, not about the cell's brightness. ``cell_mask`` is (N, *cells), True = hidden.
    """
    t = patchify(target.float(), cell)
    p = patchify(prediction.float(), cell)
    if normalise:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + 1e-6).sqrt()
    per_cell = ((p - t) ** 2).mean(dim=-1)
    m = cell_mask.reshape(per_cell.shape).to(per_cell.dtype)
    return (per_cell * m).sum() / m.sum().clamp_min(1.0)


def unpatchify(cells: torch.Tensor, shape: torch.Size, cell: int) -> torch.Tensor:
    """The inverse of `patchify`: (N, cells, cell**dims) back to ``shape`` (N, 1, *grid*cell)."""
    n, dims = cells.shape[0], len(shape) - 2
    grid = [s // cell for s in shape[2:]]
    if dims == 3:
        gz, gy, gx = grid
        out = cells.reshape(n, gz, gy, gx, cell, cell, cell).permute(0, 1, 4, 2, 5, 3, 6)
    else:
        gy, gx = grid
        out = cells.reshape(n, gy, gx, cell, cell).permute(0, 1, 3, 2, 4)
    return out.reshape(shape)


def denormalise_cells(prediction: torch.Tensor, target: torch.Tensor, cell: int) -> torch.Tensor:
    """A norm-pix prediction put back into intensities: each cell scaled by the target cell's std and mean
    (how MAE shows its reconstructions). Both (N, 1, *grid*cell); returns the same shape."""
    t = patchify(target.float(), cell)
    p = patchify(prediction.float(), cell) * (t.var(dim=-1, keepdim=True) + 1e-6).sqrt() + t.mean(dim=-1, keepdim=True)
    return unpatchify(p, prediction.shape, cell)


def alignment_loss(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE, 2 - 2 cos(child, parent), averaged; the caller detaches the parent side."""
    return (2.0 - 2.0 * F.cosine_similarity(child.float(), parent.float(), dim=-1)).mean()


def variance_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance term on directions: mean over dimensions of max(0, gamma - std), where std is each
    dimension's standard deviation over the batch (rows) of sqrt(D) x the L2-normalised outputs.

    Why on directions: the objectives it guards compare cosines, so what must not collapse is the direction of the
    outputs. Scaled by sqrt(D), directions spread evenly over the sphere have a standard deviation of about 1 per
    dimension; outputs that all point the same way have 0. Rows are different crops; with fewer than two rows
    there is no spread to measure and the term is 0.
    """
    if z.shape[0] < 2:
        return z.new_zeros(()).float()
    u = F.normalize(z.float(), dim=-1) * math.sqrt(z.shape[-1])
    std = torch.sqrt(u.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def predictor_agreement(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL/SimSiam's loss: 2 - 2 cos(prediction, stop-gradient(target)), averaged."""
    return alignment_loss(prediction, target.detach())
