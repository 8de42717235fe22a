"""DAGMaN and its co-distillation relatives (SMIT, AttMask), one implementation read next to the papers.

Per step, for the two views x_1, x_2 of each crop (methods.md section 1.3):

1. The EMA teacher (always in eval mode: no drop path) sees each view, made *noisy* (DAGMaN/SMART: patch
   dropout of the teacher's input; or Gaussian feature noise; ``none`` for the SMIT/AttMask ablations), and
   returns global logits, patch logits and its semantic class attention over the stage-3 tokens. Dropped cells
   carry only the mask token, so the class attention leaves their tokens out (as patch dropout removes them).
2. The mask: the most attended of the cells the teacher saw (attention-high; low and hint variants too), with
   the dropped cells' share of the budget, ``round(ratio x dropped)``, drawn at random among them, so whether
   a cell is hidden does not depend on whether the teacher dropped it; or random masks (SMIT, and every method
   during the mask warm-up, when the teacher's attention is still noise).
3. The student sees the masked views (mask token at the hidden tokens) and returns the same outputs plus a
   reconstruction.
4. Loss = w_global * cross-view global distillation + w_patch * masked-patch distillation over the hidden
   tokens the teacher saw (a dropped token's target would come from the mask token alone)
   + w_rec * L1 on the hidden voxels (weights 0.1 / 0.1 / 1.0 from SMIT).
5. After the optimiser step the teacher follows the student: theta_t <- m theta_t + (1 - m) theta_s with m
   on a cosine from ``ema_momentum`` to 1 over the global step.

The presets ``dagman``, ``attmask`` and ``smit`` in the registry differ in mask strategy, mask recipe and
teacher noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from napari_dagman.core.config import PretrainConfig, option
from napari_dagman.core.diversity import head_diversity, output_statistics
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.masking import random_mask
from napari_dagman.core.methods.base import (
    Capabilities,
    InputSpec,
    MaskedMethod,
    MaskingOptions,
    PublishedEncoder,
    StepOutput,
    fraction_of,
)
from napari_dagman.core.methods.losses import DistillationLoss, cosine_schedule, ema_update, linear_warmup
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.pretrain import PretrainNetwork

TEACHER_NOISES: tuple[str, ...] = ("none", "input-dropout", "gaussian")


@dataclass
class CoDistillationOptions(MaskingOptions):
    """Options of DAGMaN and its co-distillation relatives (presets set the mask recipe and the teacher noise)."""

    teacher_noise: str = option(
        "input-dropout",
        "noisy teacher: none, input-dropout (SMART) or gaussian feature noise",
        choices=TEACHER_NOISES,
        group="teacher",
    )
    noise_rate: float = option(
        0.2,
        "input-dropout: fraction of cells dropped; gaussian: noise std relative to the token std",
        minimum=0.0,
        maximum=0.9,
        group="teacher",
    )
    ema_momentum: float | None = option(
        None,
        "EMA teacher momentum at step 0 (cosine to 1); default from the run's length: 1 - 1 / (ema_memory x "
        "steps), at most 0.996 (DINO's value, reached at 2500 steps)",
        minimum=0.0,
        maximum=1.0,
        group="teacher",
    )
    ema_memory: float = option(
        0.1,
        "the default momentum gives the teacher a memory (time constant) of this fraction of the run, so a short "
        "run's teacher follows its student instead of staying at its initialisation",
        minimum=0.001,
        maximum=1.0,
        group="teacher",
    )
    local_crops: int = option(
        4,
        "small crops per sample that only the student sees, each taught by both teacher views through the global "
        "term (DINO/iBOT multi-crop; 0 = two views only)",
        minimum=0,
        maximum=16,
        group="views",
    )
    local_roi: int = option(
        32,
        "side of the local crops in voxels, a multiple of 32; local crops are used only when this is below the ROI",
        minimum=32,
        group="views",
    )
    teacher_temp: float = option(0.04, "teacher softmax temperature at step 0", minimum=1e-4, group="teacher")
    teacher_temp_final: float = option(
        0.07, "teacher temperature after the warm-up", minimum=1e-4, group="teacher"
    )
    teacher_temp_warmup: int | None = option(
        None,
        "steps of linear teacher-temperature warm-up (default 30% of the steps)",
        minimum=0,
        group="teacher",
    )
    freeze_last_layer_steps: int | None = option(
        None,
        "the projection heads' last layer is not updated for the first N steps (DINO/iBOT freeze it for the "
        "first epoch; default 1% of the steps)",
        minimum=0,
        group="teacher",
    )
    student_temp: float = option(0.1, "student softmax temperature", minimum=1e-4, group="teacher")
    center_momentum: float = option(
        0.9, "momentum of the teacher-output centre", minimum=0.0, maximum=1.0, group="teacher"
    )
    w_global: float = option(
        0.1, "weight of the cross-view global distillation loss (SMIT)", minimum=0.0, group="loss"
    )
    w_patch: float = option(
        0.1, "weight of the masked-patch distillation loss (SMIT)", minimum=0.0, group="loss"
    )
    w_rec: float = option(1.0, "weight of the L1 reconstruction of masked voxels", minimum=0.0, group="loss")

    def resolve(self, steps: int) -> CoDistillationOptions:
        out = super().resolve(steps)
        if out.ema_momentum is None:
            out = out.replace(ema_momentum=ema_momentum_for(steps, out.ema_memory))
        if out.teacher_temp_warmup is None:
            out = out.replace(teacher_temp_warmup=fraction_of(steps, 0.3))
        if out.freeze_last_layer_steps is None:
            out = out.replace(freeze_last_layer_steps=fraction_of(steps, 0.01))
        return out


#: DINO's starting momentum, the most a run's default gets (runs of 2500 steps and more at ema_memory 0.1).
DINO_MOMENTUM = 0.996


def ema_momentum_for(steps: int, memory: float) -> float:
    """The default starting momentum: a teacher memory of ``memory`` x the run, at most DINO's 0.996.

    An EMA with momentum m averages the student over about 1 / (1 - m) steps. DINO's 0.996 (250 steps) suits its
    hundreds of thousands of steps; over a 100-step run the teacher would follow 6 % of the student's drift and
    publish what is nearly its random initialisation (measured on main b4443b9).
    """
    return min(DINO_MOMENTUM, max(0.0, 1.0 - 1.0 / max(1.0, memory * steps)))


class CoDistillation(MaskedMethod):
    """Masked image modelling in a teacher-student co-distillation framework on Swin + class attention."""

    Options: ClassVar[type] = CoDistillationOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        trains_class_attention=True,
        has_teacher=True,
        reconstructs=True,
        previews=("attention", "mask", "unseen", "reconstruction"),
    )
    preferred_encoder: ClassVar[str] = "teacher"

    @classmethod
    def input_spec(cls, options: CoDistillationOptions, roi: int) -> InputSpec:
        """Two views, and the local crops when they are smaller than the ROI (none at ROI 32: no smaller Swin
        input exists)."""
        local = options.local_crops if options.local_roi < roi else 0
        return InputSpec(views=2, local_views=local, local_roi=options.local_roi if local else 0)

    def __init__(self, config: PretrainConfig, options: CoDistillationOptions, arch: Architecture) -> None:
        super().__init__(config, options, arch)
        self.student = PretrainNetwork(arch, heads=True, decoder=True)
        teacher = PretrainNetwork(arch, heads=True, decoder=False)
        # the teacher starts as a copy of the student (same names, so the EMA pairs parameters by name)
        teacher.load_state_dict(self.student.state_dict(), strict=False)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        self.distill = DistillationLoss(
            arch.out_dim, student_temp=options.student_temp, center_momentum=options.center_momentum
        )
        self.total_steps = int(config.steps or 1)
        if options.local_crops and options.local_roi % 32:
            raise DagmanInputError(f"local_roi must be a multiple of 32 (Swin's input), got {options.local_roi}")

    # --- the contract -----------------------------------------------------------------------------------------
    def trained_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def published_encoders(self) -> list[PublishedEncoder]:
        return [
            PublishedEncoder("teacher", "teacher.encoder", description="the EMA teacher (chose the masks)"),
            PublishedEncoder("student", "student.encoder", description="the student (saw the masked views)"),
        ]

    def attention_encoders(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher.encoder, "student": self.network("student").encoder}

    def after_backward(self, step: int) -> None:
        """The projection heads' last layer stays frozen for the first ``freeze_last_layer_steps`` steps
        (DINO's ``cancel_gradients_last_layer``)."""
        if step >= (self.options.freeze_last_layer_steps or 0):
            return
        for name, p in self.network("student").named_parameters():
            if ".last_layer." in name:
                p.grad = None

    # --- schedules ------------------------------------------------------------------------------------------
    def teacher_temperature(self, step: int) -> float:
        o = self.options
        return linear_warmup(step, o.teacher_temp_warmup or 0, o.teacher_temp, o.teacher_temp_final)

    def momentum(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.options.ema_momentum, 1.0)

    # --- the noisy teacher ----------------------------------------------------------------------------------
    def teacher_noise(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor | None, float]:
        """(cells dropped from the teacher's input (B, *cells) or None, relative feature-noise std)."""
        o = self.options
        if o.teacher_noise == "input-dropout" and o.noise_rate > 0:
            return random_mask(batch, self.cells, o.noise_rate, generator), 0.0
        if o.teacher_noise == "gaussian" and o.noise_rate > 0:
            return None, o.noise_rate
        return None, 0.0

    def teacher_pass(
        self, views: torch.Tensor, dropped: torch.Tensor | None, noise_std: float, generator: torch.Generator
    ):
        """The teacher's forward pass on (noisy) views; dropped tokens are left out of its class attention."""
        device = views.device
        with torch.no_grad():
            if dropped is None:
                return self.teacher(views, None, noise_std, generator)
            return self.teacher(
                views,
                self.token_mask(dropped).to(device),
                noise_std,
                generator,
                attention_ignore=self.stage_token_mask(dropped).to(device),
            )

    # --- one step -------------------------------------------------------------------------------------------
    def preferred(self) -> tuple[str, str]:
        o = self.options
        memory = 1.0 / max(1e-9, 1.0 - float(o.ema_momentum or 0.0))
        return (
            "teacher",
            f"the EMA teacher chose the masks and is what co-distillation publishes; its momentum starts at "
            f"{o.ema_momentum:.4f} (a memory of about {memory:.0f} of the run's {self.total_steps} steps) and rises "
            "to 1, so it follows the student",
        )

    def forward_step(
        self, views: torch.Tensor, step: int, generator: torch.Generator, local: torch.Tensor | None = None, **_: object
    ) -> StepOutput:
        cfg = self.options
        batch = views.shape[0]
        device = views.device
        teacher_temp = self.teacher_temperature(step)

        dropped, noise_std = self.teacher_noise(batch, generator)
        t_out = self.teacher_pass(views, dropped, noise_std, generator)
        attention = t_out.encoder.attention.detach()
        grid = t_out.encoder.grid

        cell_mask = self.choose_mask(batch, step, attention, grid, generator, unseen=dropped)
        s_out = self.student(views, self.token_mask(cell_mask).to(device), local=local)

        # distillation targets only from tokens the teacher saw
        seen = None if dropped is None else ~self.stage_token_mask(dropped).to(device)
        token_mask = self.stage_token_mask(cell_mask).to(device)
        target_mask = token_mask if seen is None else token_mask & seen
        loss_global = self.distill.global_loss(
            t_out.global_logits, s_out.global_logits, 2, teacher_temp, local=s_out.local_global_logits
        )
        loss_patch = self.distill.patch_loss(t_out.patch_logits, s_out.patch_logits, target_mask, teacher_temp)
        loss_rec = self.reconstruction_loss(views, s_out.reconstruction, cell_mask)
        loss = cfg.w_global * loss_global + cfg.w_patch * loss_patch + cfg.w_rec * loss_rec
        global_kl = loss_global.item() - self.distill.teacher_entropy(t_out.global_logits, teacher_temp)
        patch_kl = loss_patch.item() - self.distill.teacher_entropy(
            t_out.patch_logits, teacher_temp, target_mask
        )
        # collapse diagnostics on this step's patch targets, with the centre they were made with
        seen_patches = t_out.patch_logits if seen is None else t_out.patch_logits[seen]
        stats = output_statistics(seen_patches, self.distill.center_patch, teacher_temp)
        self.distill.update_centers(t_out.global_logits, t_out.patch_logits, seen)

        extras = {
            "teacher_temp": teacher_temp,
            "global_kl": global_kl,
            "patch_kl": patch_kl,
            # the figure logged before: 1 - mean cosine of the raw maps, on this step's (noisy) teacher input
            "teacher_cosine_diversity_noisy_input": head_diversity(attention)["cosine_diversity"],
            "teacher_batch_entropy": stats["batch_entropy"],
            "teacher_sample_entropy": stats["sample_entropy"],
            "prototypes_in_use": stats["prototypes_in_use"],
            "center_norm": stats["center_norm"],
            # the published encoder's stage-3 tokens of different crops (the teacher's, tokens it saw)
            "token_cosine": self.token_cosine(t_out.encoder.tokens, dropped),
        }
        if dropped is not None:
            hidden = cell_mask.flatten(1)
            unseen = dropped.flatten(1)
            extras["mask_dropped_overlap"] = float(
                (hidden & unseen).sum(1).float().div(unseen.sum(1).clamp_min(1)).mean()
            )
        if noise_std > 0 or dropped is not None:
            every = self.config.probe_every
            if every and (step + 1) % every == 0:  # a clean pass costs a teacher forward: only now and then
                extras["mask_clean_agreement"] = self.clean_agreement(views, step, cell_mask, generator)
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
            extras=extras,
            unseen=dropped,
        )

    def clean_agreement(
        self, views: torch.Tensor, step: int, cell_mask: torch.Tensor, generator: torch.Generator
    ) -> float:
        """Share of the hidden cells that a clean (noise-free) teacher pass would also have hidden.

        The clean mask's random parts (warm-up, jitter, masking probability, ties) come from a generator of its
        own, seeded from the step's generator: they are fresh draws, not the step's, so the figure also counts
        disagreement that comes from those draws. It is the overlap |M and M_clean| / |M_clean|, averaged over the
        images.
        """
        clean = self.teacher_pass(views, None, 0.0, generator)
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        clean_mask = self.choose_mask(
            views.shape[0], step, clean.encoder.attention.detach(), clean.encoder.grid, gen
        )
        a, b = cell_mask.flatten(1), clean_mask.flatten(1)
        return float((a & b).sum(1).float().div(b.sum(1).clamp_min(1)).mean())

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        m = self.momentum(step)
        ema_update(self.teacher, self.network("student"), m)
        return {"momentum": m}
