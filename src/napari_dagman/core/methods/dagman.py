"""DAGMaN and its co-distillation relatives (SMIT, AttMask), one implementation read next to the papers.

Per step, for the two views x_1, x_2 of each crop (methods.md section 1.3):

1. The EMA teacher sees each view, made *noisy* (DAGMaN/SMART: patch dropout of the teacher's input; or Gaussian
   feature noise; ``none`` for the SMIT/AttMask ablations), and returns global logits, patch logits and its
   semantic class attention over the stage-3 tokens. One teacher pass serves both the targets and the mask.
2. The mask: the ``mask_ratio`` most attended cells (attention-high; low and hint variants too), or random
   masks (SMIT, and every method during the mask warm-up, when the teacher's attention is still noise).
3. The student sees the masked views (mask token at the hidden tokens) and returns the same outputs plus a
   reconstruction.
4. Loss = w_global * cross-view global distillation + w_patch * masked-patch distillation
   + w_rec * L1 on the hidden voxels (weights 0.1 / 0.1 / 1.0 from SMIT).
5. After the optimiser step the teacher follows the student: theta_t <- m theta_t + (1 - m) theta_s with m
   on a cosine from ``ema_momentum`` to 1 over the global step.

The presets ``dagman``, ``attmask`` and ``smit`` in the registry differ only in mask strategy and teacher noise.
"""

from __future__ import annotations

import torch

from napari_dagman.core.attention import head_diversity
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.masking import random_mask
from napari_dagman.core.methods.base import SSLMethod, StepOutput
from napari_dagman.core.methods.losses import DistillationLoss, cosine_schedule, ema_update, linear_warmup
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.pretrain import PretrainNetwork


class CoDistillation(SSLMethod):
    """Masked image modelling in a teacher-student co-distillation framework on Swin + class attention."""

    def __init__(self, config: PretrainConfig, arch: Architecture) -> None:
        super().__init__(config, arch)
        self.student = PretrainNetwork(arch, heads=True, decoder=True)
        teacher = PretrainNetwork(arch, heads=True, decoder=False)
        # the teacher starts as a copy of the student (same names, so the EMA pairs parameters by name)
        teacher.load_state_dict(self.student.state_dict(), strict=False)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        self.distill = DistillationLoss(
            arch.out_dim, student_temp=config.student_temp, center_momentum=config.center_momentum
        )
        self.total_steps = int(config.steps or 1)

    # --- schedules ------------------------------------------------------------------------------------------
    def teacher_temperature(self, step: int) -> float:
        cfg = self.config
        return linear_warmup(step, cfg.teacher_temp_warmup or 0, cfg.teacher_temp, cfg.teacher_temp_final)

    def momentum(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.config.ema_momentum, 1.0)

    # --- the noisy teacher ----------------------------------------------------------------------------------
    def teacher_inputs(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor | None, float]:
        """(token mask of dropped cells or None, relative feature-noise std) for the teacher's forward pass."""
        cfg = self.config
        if cfg.teacher_noise == "input-dropout" and cfg.noise_rate > 0:
            dropped = random_mask(batch, self.cells, cfg.noise_rate, generator)
            return self.token_mask(dropped), 0.0
        if cfg.teacher_noise == "gaussian" and cfg.noise_rate > 0:
            return None, cfg.noise_rate
        return None, 0.0

    # --- one step -------------------------------------------------------------------------------------------
    def forward_step(self, views: torch.Tensor, step: int, generator: torch.Generator) -> StepOutput:
        cfg = self.config
        batch = views.shape[0]
        device = views.device
        teacher_temp = self.teacher_temperature(step)

        dropped, noise_std = self.teacher_inputs(batch, generator)
        with torch.no_grad():
            t_out = self.teacher(views, None if dropped is None else dropped.to(device), noise_std, generator)
        attention = t_out.encoder.attention.detach()
        grid = t_out.encoder.grid

        cell_mask = self.choose_mask(batch, step, attention, grid, generator)
        s_out = self.student(views, self.token_mask(cell_mask).to(device))

        loss_global = self.distill.global_loss(t_out.global_logits, s_out.global_logits, 2, teacher_temp)
        token_mask = self.stage_token_mask(cell_mask).to(device)
        loss_patch = self.distill.patch_loss(t_out.patch_logits, s_out.patch_logits, token_mask, teacher_temp)
        loss_rec = self.reconstruction_loss(views, s_out.reconstruction, cell_mask)
        loss = cfg.w_global * loss_global + cfg.w_patch * loss_patch + cfg.w_rec * loss_rec
        global_kl = loss_global.item() - self.distill.teacher_entropy(t_out.global_logits, teacher_temp)
        patch_kl = loss_patch.item() - self.distill.teacher_entropy(
            t_out.patch_logits, teacher_temp, token_mask
        )
        self.distill.update_centers(t_out.global_logits, t_out.patch_logits)

        diversity = head_diversity(attention)
        return StepOutput(
            loss=loss,
            terms={
                "global": loss_global.item(),
                "patch": loss_patch.item(),
                "reconstruction": loss_rec.item(),
            },
            mask=cell_mask,
            attention=attention,
            grid=grid,
            reconstruction=s_out.reconstruction.detach(),
            extras={
                "teacher_temp": teacher_temp,
                "head_diversity": diversity["diversity"],
                "head_entropy": diversity["entropy_mean"],
                "global_kl": global_kl,
                "patch_kl": patch_kl,
            },
        )

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        m = self.momentum(step)
        ema_update(self.teacher, self.student_network, m)
        return {"momentum": m}
