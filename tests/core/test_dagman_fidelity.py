"""DAGMaN as the paper means it: the noisy teacher does not choose the mask by itself, the clean teacher is clean,
the losses pair and route what they should, and head diversity is a centred measure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.data import ViewSampler
from napari_dagman.core.diversity import head_diversity, output_statistics
from napari_dagman.core.events import LogEvent
from napari_dagman.core.masking import attention_mask, hint_mask, make_mask, masked_count, random_mask
from napari_dagman.core.methods import dagman as dagman_module
from napari_dagman.core.methods.losses import cosine_schedule
from napari_dagman.core.models.encoder import SemanticClassAttention
from napari_dagman.core.training import (
    build_method,
    consume,
    parameter_groups,
    prepare_inputs,
    resolve_config,
    run_pretraining,
)


def method_for(name: str, *, preset: str = "tiny", roi: int = 64, steps: int = 10, **overrides):
    config = resolve_config(
        PretrainConfig.from_dict(
            {"method": name, "preset": preset, "roi": roi, "steps": steps, "mask_warmup_steps": 0, **overrides}
        ),
        1,
    )
    return build_method(config)


def rand_views(batch: int = 1, roi: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(2 * batch, 1, roi, roi, roi, generator=torch.Generator().manual_seed(seed))


# --- a clean teacher is clean -----------------------------------------------------------------------------------
def test_clean_teacher_is_deterministic_in_training_mode_at_the_small_preset():
    m = method_for("attmask", preset="small", roi=32)
    assert m.arch.drop_path > 0  # the student has stochastic depth at this preset
    m.train()
    x = rand_views(roi=32)
    torch.manual_seed(0)
    with torch.no_grad():  # one pass in a few drops no residual branch at all: compare several
        teacher = [m.teacher(x).global_logits for _ in range(6)]
        student = [m.student(x).global_logits for _ in range(6)]
    assert all(torch.equal(t, teacher[0]) for t in teacher)
    # the student keeps its drop path: the check can see stochastic depth
    assert not all(torch.equal(s, student[0]) for s in student)
    assert not m.teacher.training and m.student.training


# --- the mask follows attention, not the dropout pattern --------------------------------------------------------
def test_unseen_cells_get_their_share_at_random_and_the_rest_follows_attention():
    gen = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 4, 4, 4, generator=gen)
    unseen = random_mask(3, (4, 4, 4), 0.25, gen)  # 16 of 64 cells
    for strategy in ("attention-high", "attention-low", "attention-hint"):
        mask = make_mask(
            strategy, batch=3, grid=(4, 4, 4), ratio=0.6, attention=attention, generator=gen, unseen=unseen
        )
        for b in range(3):
            hidden, un = mask[b].flatten(), unseen[b].flatten()
            assert int((hidden & un).sum()) == masked_count(16, 0.6)  # 10 of the 16 unseen cells
            if strategy == "attention-high":
                assert int(hidden.sum()) == masked_count(64, 0.6)
                att = attention[b].flatten()
                seen_hidden, seen_shown = att[hidden & ~un], att[~hidden & ~un]
                assert seen_hidden.min() >= seen_shown.max()


def test_ties_in_attention_are_broken_at_random_not_by_cell_order():
    flat = torch.ones(1, 8, 8)  # a coarse map upsampled onto the cells: every value tied
    firsts = []
    for seed in range(200):
        mask = attention_mask(flat, 0.5, "high", generator=torch.Generator().manual_seed(seed))
        assert int(mask.sum()) == 32
        firsts.append(mask[0, :4].float().mean().item())  # share of the top half that is hidden
    assert 0.4 < float(np.mean(firsts)) < 0.6  # raster-order ties would hide the top half every time
    hints = [
        hint_mask(flat, 0.5, generator=torch.Generator().manual_seed(s)) for s in range(2)
    ]  # hints draw from the same seeded order
    assert not torch.equal(hints[0], hints[1])


def _overlaps(method, views: torch.Tensor, draws: int) -> list[float]:
    """hidden & dropped / dropped over seeded draws of the training code path (teacher noise, pass, mask)."""
    out = []
    for seed in range(draws):
        gen = torch.Generator().manual_seed(seed)
        dropped, noise = method.teacher_noise(views.shape[0], gen)
        t_out = method.teacher_pass(views, dropped, noise, gen)
        mask = method.choose_mask(
            views.shape[0], 5, t_out.encoder.attention, t_out.encoder.grid, gen, unseen=dropped
        )
        hidden, un = mask.flatten(1), dropped.flatten(1)
        out.extend(((hidden & un).sum(1).float() / un.sum(1)).tolist())
    return out


def test_hidden_share_of_dropped_cells_equals_the_mask_ratio_on_real_ct(shared_data):
    config = resolve_config(
        PretrainConfig.from_dict(
            {
                "images": [str(shared_data / "example_ct.nii.gz")],
                "method": "dagman",
                "preset": "tiny",
                "roi": 64,
                "spacing": 3.0,
                "steps": 40,
                "batch_size": 1,
                "mask_warmup_steps": 0,
                "lr": 2e-3,
            }
        ),
        1,
    )
    from napari_dagman.core.io import read_volume

    prepared = prepare_inputs(config, [read_volume(shared_data / "example_ct.nii.gz")])
    sampler = ViewSampler(prepared, roi=64, dims=3, batch_size=2, seed=0)
    method = build_method(config)
    views = torch.from_numpy(sampler.sample(0).views)
    ratio = config.method_options().mask_ratio
    at_init = _overlaps(method, views, 8)
    assert abs(float(np.mean(at_init)) - ratio) <= 0.1
    # a few training steps (attention no longer uniform), then the same check
    optimizer = torch.optim.AdamW(parameter_groups(method.student, 0.05), lr=2e-3)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(4):
        batch = torch.from_numpy(sampler.sample(step).views)
        method.train()
        out = method.forward_step(batch, step, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        method.after_optimizer_step(step)
    trained = _overlaps(method, views, 8)
    assert all(abs(v - ratio) <= 0.1 for v in trained), trained


def test_class_attention_ignores_dropped_tokens():
    sca = SemanticClassAttention(16, 4)
    tokens = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0))
    ignore = torch.zeros(2, 10, dtype=torch.bool)
    ignore[:, 3:6] = True
    g1, a1 = sca(tokens, ignore)
    changed = tokens.clone()
    changed[:, 3:6] = 100.0  # what an outlier mask-token region would look like
    g2, a2 = sca(changed, ignore)
    assert torch.all(a1[:, :, 3:6] == 0)
    torch.testing.assert_close(a1.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(a1, a2)


# --- what the losses see ----------------------------------------------------------------------------------------
def _spy_calls(obj, name: str, calls: list):
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)


@pytest.mark.parametrize("method_name", ["attmask", "dagman"])
def test_patch_loss_uses_each_views_student_mask_on_seen_tokens(method_name):
    m = method_for(method_name, masking_prob=1.0, mask_ratio_jitter=0.0, mask_ratio=0.6)
    patch_calls, student_calls = [], []
    _spy_calls(m.distill, "patch_loss", patch_calls)
    _spy_calls(m.student, "forward", student_calls)
    out = m.forward_step(rand_views(batch=2), step=3, generator=torch.Generator().manual_seed(1))
    token_mask = patch_calls[0][0][2]
    student_tokens = student_calls[0][0][1]  # (2B, *token grid), mask token where hidden
    stage = m.stage_token_mask(out.mask)
    expected = stage if out.unseen is None else stage & ~m.stage_token_mask(out.unseen)
    assert torch.equal(token_mask, expected)
    assert torch.equal(student_tokens.bool(), m.token_mask(out.mask))
    if method_name == "dagman":
        assert out.unseen is not None and bool((stage & m.stage_token_mask(out.unseen)).any())
    else:
        assert out.unseen is None


def test_global_loss_pairs_each_teacher_view_with_the_other_student_view():
    m = method_for("attmask", masking_prob=1.0, mask_ratio_jitter=0.0)
    teacher_out, student_out, losses = [], [], []
    t_forward, s_forward = m.teacher.forward, m.student.forward
    m.teacher.forward = lambda *a, **k: teacher_out.append(t_forward(*a, **k)) or teacher_out[-1]
    m.student.forward = lambda *a, **k: student_out.append(s_forward(*a, **k)) or student_out[-1]
    _spy_calls(m.distill, "global_loss", losses)
    x = rand_views(batch=1)
    x[1] = torch.flip(x[1], dims=(-1,)) * 0.5  # the two views differ
    out = m.forward_step(x, step=3, generator=torch.Generator().manual_seed(2))
    import torch.nn.functional as F

    t, s = teacher_out[0].global_logits.float(), student_out[0].global_logits.float()
    temp = m.teacher_temperature(3)
    pt = F.softmax(t / temp, dim=-1)  # the centre is still 0 at a method's first step
    ls = F.log_softmax(s / m.distill.student_temp, dim=-1)
    cross = 0.5 * (-(pt[0] * ls[1]).sum() - (pt[1] * ls[0]).sum())
    same = 0.5 * (-(pt[0] * ls[0]).sum() - (pt[1] * ls[1]).sum())
    assert out.terms["global"] == pytest.approx(float(cross), rel=1e-5)
    assert abs(float(cross) - float(same)) > 1e-3  # the views differ, so the pairing is visible


def test_centre_is_updated_after_the_loss():
    m = method_for("attmask")
    with torch.no_grad():
        m.distill.center_global.fill_(0.25)
        m.distill.center_patch.fill_(-0.5)
    seen = []
    original = m.distill.global_loss

    def spy(*args, **kwargs):
        seen.append((m.distill.center_global.clone(), m.distill.center_patch.clone()))
        return original(*args, **kwargs)

    m.distill.global_loss = spy
    m.forward_step(rand_views(), step=3, generator=torch.Generator().manual_seed(0))
    assert torch.all(seen[0][0] == 0.25) and torch.all(seen[0][1] == -0.5)
    assert not torch.all(m.distill.center_global == 0.25)  # updated, but after the loss was made


def test_gaussian_feature_noise_changes_the_teachers_outputs():
    m = method_for("dagman", teacher_noise="gaussian", noise_rate=0.3)
    x = rand_views()
    clean = m.teacher_pass(x, None, 0.0, torch.Generator().manual_seed(0))
    noisy = m.teacher_pass(x, None, 0.3, torch.Generator().manual_seed(0))
    again = m.teacher_pass(x, None, 0.3, torch.Generator().manual_seed(0))
    assert (clean.global_logits - noisy.global_logits).abs().max() > 1e-3
    assert not torch.equal(clean.encoder.attention, noisy.encoder.attention)
    assert torch.equal(noisy.global_logits, again.global_logits)  # seeded: reproducible


def _grad_norms(module: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, float]:
    out = dict.fromkeys(prefixes, 0.0)
    for name, p in module.named_parameters():
        for prefix in prefixes:
            if name.startswith(prefix) and p.grad is not None:
                out[prefix] += float(p.grad.norm())
    return out


def test_each_loss_term_reaches_the_parts_it_should_and_no_others():
    parts = ("encoder.swin.", "encoder.class_attention.", "global_head.", "patch_head.", "decoder.")
    expected = {
        "global": {"encoder.swin.", "encoder.class_attention.", "global_head."},
        "patch": {"encoder.swin.", "patch_head."},
        "reconstruction": {"encoder.swin.", "decoder."},
    }
    for term, reached in expected.items():
        m = method_for("attmask", masking_prob=1.0, mask_ratio_jitter=0.0, mask_ratio=0.6)
        weights = {"global": (1.0, 0.0, 0.0), "patch": (0.0, 1.0, 0.0), "reconstruction": (0.0, 0.0, 1.0)}
        m.options = m.options.replace(**dict(zip(("w_global", "w_patch", "w_rec"), weights[term], strict=True)))
        out = m.forward_step(rand_views(), step=3, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        norms = _grad_norms(m.network("student"), parts)
        for part in parts:
            if part in reached:
                assert norms[part] > 0, (term, part)
            else:
                assert norms[part] == 0, (term, part)
    # the class attention feeds the global token only: the patch term must not reach it (checked above), and
    # the distillation terms reach it through the global head


def test_last_layer_is_frozen_for_the_configured_steps():
    m = method_for("attmask", freeze_last_layer_steps=2)
    for step, frozen in ((0, True), (1, True), (2, False)):
        m.zero_grad(set_to_none=True)
        out = m.forward_step(rand_views(), step=step, generator=torch.Generator().manual_seed(step))
        out.loss.backward()
        m.after_backward(step)
        last = [p.grad for n, p in m.network("student").named_parameters() if ".last_layer." in n and p.requires_grad]
        assert last and all((g is None) == frozen for g in last), step
        assert m.network("student").encoder.mask_token.grad is not None


def test_masking_prob_and_ratio_jitter_follow_attmasks_recipe():
    m = method_for("attmask")  # preset: ratio 0.3 +- 0.2, half the images masked
    assert (m.options.mask_ratio, m.options.mask_ratio_jitter, m.options.masking_prob) == (0.3, 0.2, 0.5)
    hidden = []
    for seed in range(60):
        mask = m.choose_mask(2, 3, None, (), torch.Generator().manual_seed(seed))
        hidden += mask.flatten(1).float().mean(1).tolist()
    hidden = np.asarray(hidden)
    masked = hidden[hidden > 0]
    assert 0.35 < (hidden == 0).mean() < 0.65  # about half the images are shown whole
    assert masked.min() >= 0.1 - 1 / 64 and masked.max() <= 0.5 + 1 / 64 and masked.std() > 0.05


# --- head diversity -------------------------------------------------------------------------------------------
def test_head_diversity_is_zero_for_identical_and_one_for_disjoint_heads():
    head = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    same = torch.stack([head] * 4)[None]
    assert head_diversity(same)["diversity"] == pytest.approx(0.0, abs=1e-9)
    disjoint = torch.zeros(1, 4, 64)
    for h in range(4):
        disjoint[0, h, h * 16 : (h + 1) * 16] = 1 / 16
    d = head_diversity(disjoint)
    assert d["diversity"] == pytest.approx(1.0) and d["js_divergence"] == pytest.approx(1.0)
    # near-uniform maps with different patterns: the centred measure sees it, the raw cosine does not
    g = torch.Generator().manual_seed(1)
    near = torch.softmax(0.05 * torch.randn(1, 4, 64, generator=g), dim=-1)
    d = head_diversity(near)
    assert d["diversity"] > 0.7 and d["cosine_diversity"] < 0.01 and d["entropy_mean"] > 0.99


# --- collapse -----------------------------------------------------------------------------------------------------
def test_output_statistics_see_every_output_on_one_prototype():
    z = torch.zeros(10, 32)
    z[:, 0] = 5.0
    stats = output_statistics(z, torch.zeros(32), 0.04)
    assert stats["prototypes_in_use"] == 1 and stats["batch_entropy"] < 0.01


def test_a_collapsed_teacher_raises_one_warning_event(shared_data, tmp_path, monkeypatch):
    def collapsed_method(config, arch=None):
        method = build_method(config, arch)
        with torch.no_grad():  # every prototype the same direction: each output uniform
            for net in (method.student, method.teacher):
                for head in (net.global_head, net.patch_head):
                    head.last_layer.parametrizations.weight.original1.fill_(1.0)
        return method

    monkeypatch.setattr("napari_dagman.core.training.pretrain.build_method", collapsed_method)
    config = PretrainConfig(
        images=[str(shared_data / "example_ct.nii.gz")], out=str(tmp_path / "run"), preset="tiny", roi=32,
        spacing=4.0, steps=36, batch_size=1, preview_every=0, probe_every=0, lr=0.0, min_lr=0.0,
        options={"local_crops": 0},
    )
    warnings = [e for e in run_pretraining(config) if isinstance(e, LogEvent) and e.level == "warning"]
    assert len(warnings) == 1 and "collapsed" in warnings[0].message


# --- schedules over the engine ---------------------------------------------------------------------------------------
def test_ema_momentum_follows_the_global_step_over_two_epochs(shared_data, tmp_path, monkeypatch):
    used = []
    original = dagman_module.ema_update

    def spy(teacher, student, momentum):
        used.append(momentum)
        return original(teacher, student, momentum)

    monkeypatch.setattr(dagman_module, "ema_update", spy)
    ct = str(shared_data / "example_ct.nii.gz")
    small = str(shared_data / "example_ct_sm.nii.gz")
    config = PretrainConfig(
        images=[ct, small], out=str(tmp_path / "run"), preset="tiny", roi=32, spacing=4.0, epochs=2,
        batch_size=1, preview_every=0, probe_every=0, options={"ema_momentum": 0.996, "local_crops": 0},
    )
    consume(run_pretraining(config))
    total = 4  # 2 volumes, batch 1: 2 steps per epoch
    assert used == pytest.approx([cosine_schedule(k, total, 0.996, 1.0) for k in range(total)])
    assert used[2] != pytest.approx(used[0])  # an epoch-local index would repeat the first epoch's values
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["momentum"] for r in rows] == pytest.approx(used)


# --- the run's probes -----------------------------------------------------------------------------------------------
def test_probe_figures_are_logged_on_fixed_crops_and_survive_resume(shared_data, tmp_path):
    out = tmp_path / "run"
    config = PretrainConfig(
        images=[str(shared_data / "example_ct.nii.gz")], out=str(out), preset="tiny", roi=32, spacing=4.0,
        steps=4, batch_size=1, preview_every=0, probe_every=2, probe_crops=3, save_every=2,
    )
    consume(run_pretraining(config))
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    probed = sorted(s for s, r in rows.items() if "probe_teacher_head_diversity" in r)
    assert probed == [1, 2, 4]
    for key in ("probe_teacher_head_diversity", "probe_student_head_js", "probe_teacher_entropy_h3"):
        assert all(np.isfinite(rows[s][key]) for s in probed)
    assert 0.0 <= rows[4]["probe_teacher_head_diversity"] <= 1.0
    assert "mask_dropped_overlap" in rows[4] and "prototypes_in_use" in rows[4]
    from napari_dagman.core.checkpoint import load_tensors

    crops, _ = load_tensors(out / "probes.safetensors")
    assert tuple(crops["crops"].shape) == (3, 1, 32, 32, 32)
    # a resumed run measures on the same crops: the figures at step 4 repeat exactly
    longer = config.replace(steps=6)
    consume(run_pretraining(longer, resume=True))
    again = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert 6 in again and again[6]["probe_teacher_head_diversity"] is not None
    assert tuple(load_tensors(out / "probes.safetensors")[0]["crops"].shape) == (3, 1, 32, 32, 32)

