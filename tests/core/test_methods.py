"""The self-supervised methods: each runs, the teacher is an EMA without gradients, the noise touches only
the teacher's input, and the loss terms look where they should."""

from __future__ import annotations

import pytest
import torch

from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.methods.losses import DistillationLoss, cosine_schedule, ema_update, masked_l1
from napari_dagman.core.methods.registry import REGISTRY
from napari_dagman.core.training import build_method, resolve_config


def make(method: str, dims: int = 3, roi: int = 32, **overrides) -> object:
    config = resolve_config(
        PretrainConfig.from_dict(
            {
                "method": method,
                "preset": "tiny",
                "dims": dims,
                "roi": roi,
                "steps": 10,
                "mask_warmup_steps": 0,
                **overrides,
            }
        ),
        1,
    )
    return build_method(config)


def views(dims: int = 3, roi: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2 * batch, 1, *(roi,) * dims, generator=g)


# the methods that read two masked views of one ROI; MiM, MIRAM and CASS read other inputs (regions twice the
# ROI, high-resolution targets, a CNN's view) and have their own step tests in test_seed_methods.py
TWO_VIEW_MASKED = ["dagman", "attmask", "smit", "simmim"]


@pytest.mark.parametrize("method", TWO_VIEW_MASKED)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_two_view_masked_method_runs_a_step_with_finite_losses(method, dims):
    roi = 64 if dims == 2 else 32
    m = make(method, dims=dims, roi=roi)
    out = m.forward_step(views(dims, roi), step=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.terms.values())
    out.loss.backward()
    grads = [p.grad for p in m.network("student").parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    cells = roi // 16
    assert out.mask.shape == (4, *(cells,) * dims)
    if REGISTRY[method].capabilities.has_teacher:
        assert set(out.terms) == {"global", "patch", "reconstruction"}
        assert out.attention.shape[:2] == (4, 4)
    else:
        assert set(out.terms) == {"reconstruction"}


def test_teacher_has_no_gradient_and_follows_the_ema_formula():
    m = make("dagman")
    out = m.forward_step(views(), step=0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters())
    # change the student, then check theta_t <- m theta_t + (1 - m) theta_s for every shared parameter
    with torch.no_grad():
        for p in m.network("student").parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before = {k: v.clone() for k, v in m.teacher.named_parameters()}
    student = dict(m.network("student").named_parameters())
    momentum = m.after_optimizer_step(4)["momentum"]
    # 10 steps: the default memory is a tenth of the run, one step (momentum 0 at step 0), cosine to 1
    assert m.options.ema_momentum == 0.0
    assert momentum == pytest.approx(cosine_schedule(4, 10, 0.0, 1.0))
    for name, p in m.teacher.named_parameters():
        torch.testing.assert_close(p, momentum * before[name] + (1 - momentum) * student[name])
    assert set(dict(m.teacher.named_parameters())) <= set(
        student
    )  # the teacher mirrors the student (no decoder)


def test_momentum_schedule_uses_the_global_step():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)


def _spy(module, calls):
    original = module.forward

    def forward(x, token_mask=None, noise_std=0.0, generator=None, **kwargs):
        calls.append(
            {
                "x": x.clone(),
                "token_mask": None if token_mask is None else token_mask.clone(),
                "noise_std": noise_std,
            }
        )
        return original(x, token_mask, noise_std, generator, **kwargs)

    module.forward = forward


def test_teacher_noise_changes_only_the_teacher_input():
    torch.manual_seed(0)
    results = {}
    for noise in ("none", "input-dropout"):
        m = make("dagman", roi=64, teacher_noise=noise, noise_rate=0.25, mask_strategy="random")
        t_calls, s_calls = [], []
        _spy(m.teacher, t_calls)
        _spy(m.student, s_calls)
        m.forward_step(views(roi=64, batch=1), step=0, generator=torch.Generator().manual_seed(7))
        results[noise] = (t_calls[0], s_calls[0])
    (t_none, s_none), (t_drop, s_drop) = results["none"], results["input-dropout"]
    assert torch.equal(t_none["x"], t_drop["x"])  # the same views reach the teacher
    assert t_none["token_mask"] is None
    # input dropout hides exactly noise_rate of the teacher's cells (64 cells of 16 voxels at ROI 64)
    cells = t_drop["token_mask"][:, ::8, ::8, ::8]
    assert cells.flatten(1).sum(1).tolist() == [16, 16]
    assert torch.equal(s_none["x"], s_drop["x"])  # the student input is untouched by the noise option


def test_gaussian_feature_noise_reaches_the_teacher():
    m = make("dagman", teacher_noise="gaussian", noise_rate=0.1)
    calls = []
    _spy(m.teacher, calls)
    m.forward_step(views(), step=0, generator=torch.Generator().manual_seed(0))
    assert calls[0]["noise_std"] == pytest.approx(0.1) and calls[0]["token_mask"] is None


def test_attention_methods_mask_the_teachers_top_cells_after_the_warm_up():
    # AttMask's own recipe masks half the images at a jittered ratio; here every image at one ratio
    m = make("attmask", roi=64, mask_warmup_steps=5, masking_prob=1.0, mask_ratio_jitter=0.0, mask_ratio=0.6)
    calls = []
    _spy(m.teacher, calls)
    gen = torch.Generator().manual_seed(0)
    out = m.forward_step(views(roi=64, batch=1), step=6, generator=gen)
    att = out.attention.mean(1).reshape(2, *out.grid)
    for b in range(2):
        hidden = out.mask[b].flatten()
        assert att[b].flatten()[hidden].min() >= att[b].flatten()[~hidden].max()
    # during the warm-up the same method draws random masks instead
    warm = m.forward_step(views(roi=64, batch=1), step=1, generator=torch.Generator().manual_seed(0))
    att_w = warm.attention.mean(1).reshape(2, *warm.grid)
    tops = [
        att_w[b].flatten()[warm.mask[b].flatten()].min() >= att_w[b].flatten()[~warm.mask[b].flatten()].max()
        for b in range(2)
    ]
    assert not all(tops)


def test_patch_loss_ignores_visible_tokens_and_global_loss_is_cross_view():
    loss = DistillationLoss(8)
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    base = loss.patch_loss(t, s, mask, 0.04)
    s2 = s.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), 8, generator=g)
    assert torch.equal(base, loss.patch_loss(t, s2, mask, 0.04))
    s2[mask] += 1.0
    assert not torch.equal(base, loss.patch_loss(t, s2, mask, 0.04))
    # global: teacher view 1 supervises student view 2 and vice versa, never the same view
    tg, sg = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)  # 2 views x batch 2
    swapped_same = sg.clone()
    swapped_same[:2] = torch.randn(2, 8, generator=g)  # change student view 1 only
    a = loss.global_loss(tg, sg, 2, 0.04)
    b = loss.global_loss(tg, swapped_same, 2, 0.04)
    tg2 = tg.clone()
    tg2[:2] = torch.randn(2, 8, generator=g)  # teacher view 1 feeds student view 2 only
    c = loss.global_loss(tg2, sg, 2, 0.04)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    single_view = loss.global_loss(tg[:2], sg[:2], 1, 0.04)
    assert float(single_view) == 0.0  # one view has no cross-view pair


def test_centre_update_and_masked_l1():
    loss = DistillationLoss(4, center_momentum=0.9)
    t = torch.ones(3, 4) * 2
    loss.update_centers(t, torch.ones(3, 5, 4))
    torch.testing.assert_close(loss.center_global, torch.full((1, 4), 0.2))
    torch.testing.assert_close(loss.center_patch, torch.full((1, 1, 4), 0.1))
    x = torch.zeros(1, 1, 4, 4)
    pred = torch.ones(1, 1, 4, 4)
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2] = True
    pred[0, 0, 2:] = 100.0  # errors on visible voxels do not count
    torch.testing.assert_close(masked_l1(x, pred, m), torch.tensor(1.0), atol=1e-5, rtol=1e-5)


def test_ema_update_is_exact():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * before + 0.1 * b.weight.detach())


def test_teacher_entropy_bounds_the_cross_entropy():
    loss = DistillationLoss(16)
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    ce = float(loss.global_loss(t, s, 2, 0.07))
    h = loss.teacher_entropy(t, 0.07)
    assert 0.0 < h <= torch.log(torch.tensor(16.0)).item() + 1e-6
    assert ce >= h - 1e-5  # Gibbs: cross-entropy >= entropy, so CE - H is a KL divergence >= 0
    tp, sp = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    h_patch = loss.teacher_entropy(tp, 0.04, mask)
    assert float(loss.patch_loss(tp, sp, mask, 0.04)) >= h_patch - 1e-5
