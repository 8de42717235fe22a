"""MiM, MIRAM and CASS: the invariants each paper's method rests on, and every viewer on their run folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_dagman.cli import main
from napari_dagman.core.checkpoint import RunFolder
from napari_dagman.core.config import FinetuneConfig, PretrainConfig
from napari_dagman.core.masking import masked_count
from napari_dagman.core.methods.losses import alignment_loss, masked_cell_mse
from napari_dagman.core.methods.registry import REGISTRY
from napari_dagman.core.models.encoder import upsample_mask
from napari_dagman.core.segmentation import run_finetuning
from napari_dagman.core.training import DistContext, PretrainTask, build_method, consume, resolve_config
from napari_dagman.core.volume import Volume


def method_for(name: str, roi: int = 64, dims: int = 3, **options):
    config = resolve_config(
        PretrainConfig.from_dict({"method": name, "preset": "tiny", "roi": roi, "dims": dims, "steps": 10, **options}), 1
    )
    return build_method(config)


def test_all_seven_methods_are_registered(capsys):
    assert {"dagman", "attmask", "smit", "simmim", "mim", "miram", "cass"} <= set(REGISTRY)
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name} " in listed for name in ("mim", "miram", "cass"))


# --- MiM ------------------------------------------------------------------------------------------------------
def test_mim_levels_nest_and_hide_their_configured_ratios():
    m = method_for("mim", samples_mid=4, samples_fine=4)
    cells = 64  # 4 x 4 x 4 cells of 16 voxels at ROI 64
    for seed in range(20):
        plan = m.plan(2, torch.Generator().manual_seed(seed))
        assert plan.octants.flatten(1).sum(1).tolist() == [masked_count(8, 0.5)] * 2
        assert plan.mid_cells.flatten(1).sum(1).tolist() == [masked_count(cells, 0.6)] * 8
        assert plan.fine_cells.flatten(1).sum(1).tolist() == [masked_count(cells, 0.5)] * 32
        # every middle volume is an octant the coarse level hid, every fine patch a cell its middle volume hid
        for b in range(2):
            assert bool(plan.octants[b].flatten()[plan.chosen[b]].all())
        hidden = torch.gather(plan.mid_cells.flatten(1), 1, plan.fine_choice)
        assert bool(hidden.all())


def test_mim_coarse_cells_are_spatial_cubes_not_raster_runs():
    m = method_for("mim")
    octants = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    octants[0, 0, 0, 1] = True  # the octant at z 0, y 0, x 1 (raster index 1)
    cells = upsample_mask(octants, 64 // 2 // 16, 3)[0]  # the coarse level's hidden cells (4 x 4 x 4)
    expected = torch.zeros(4, 4, 4, dtype=torch.bool)
    expected[0:2, 0:2, 2:4] = True  # a cube: two cells a side in the octant's corner
    assert torch.equal(cells, expected)
    raster = torch.zeros(64, dtype=torch.bool)
    raster[8:16] = True  # what grouping 8 consecutive raster-order cells would hide
    assert not torch.equal(cells.flatten(), raster)
    # and the level map of a step: each hidden octant is one cube of the region, nothing else is at level 1+
    plan = m.plan(1, torch.Generator().manual_seed(3))
    level = m.level_map(plan)
    for index in range(8):
        z, y, x = np.unravel_index(index, (2, 2, 2))
        block = level[z * 64 : (z + 1) * 64, y * 64 : (y + 1) * 64, x * 64 : (x + 1) * 64]
        assert bool((block > 0).all()) == bool(plan.octants[0].flatten()[index])
        assert bool((block == 0).all()) == (not bool(plan.octants[0].flatten()[index]))


def test_mim_alignment_gradient_does_not_reach_the_parent_level():
    m = method_for("mim", roi=32, samples_mid=2, samples_fine=1)
    views = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    levels = m.run(views, m.plan(1, torch.Generator().manual_seed(0)))
    for level in (levels.coarse, levels.mid, levels.fine):
        level.features.retain_grad()
    levels.align_coarse_mid.backward(retain_graph=True)
    assert levels.coarse.features.grad is None or float(levels.coarse.features.grad.abs().sum()) == 0.0
    assert float(levels.mid.features.grad.abs().sum()) > 0  # the child side moves
    m.zero_grad()
    levels.mid.features.grad = None
    levels.align_mid_fine.backward()
    assert levels.mid.features.grad is None or float(levels.mid.features.grad.abs().sum()) == 0.0
    assert float(levels.fine.features.grad.abs().sum()) > 0


# --- MIRAM ------------------------------------------------------------------------------------------------------
def cube_volume() -> Volume:
    """Soft tissue with a bright cube off the centre: where it lands tells whether two grids agree."""
    array = np.full((40, 40, 40), 40.0, np.float32)
    array[17:27, 11:19, 20:31] = 240.0
    return Volume(array, (3.0, 3.0, 3.0), (10.0, -20.0, 5.0))


def test_miram_high_res_target_is_twice_finer_and_on_the_same_region():
    config = PretrainConfig.from_dict(
        # without augmentation: rotations resample both grids, so the bright cube's centre would move by up to
        # a millimetre (tests/core/test_views.py checks that the target repeats the views' draws)
        {"method": "miram", "preset": "tiny", "roi": 32, "spacing": 4.0, "steps": 2, "batch_size": 2, "out": "x",
         "augment": False}
    )
    task = PretrainTask(config, [cube_volume()])
    task.prepare(RunFolder("unused"), resume=False)
    task.build(torch.device("cpu"), DistContext())
    for step in range(3):
        batch = task.sampler.sample(step)
        views, crops = batch.views, batch.crops
        fine = task.sampler.high_res_views(crops, batch.seeds)
        assert views.shape == (2, 1, 32, 32, 32) and fine.shape == (2, 1, 64, 64, 64)
        lr, hr = task.prepared[0], task.high_res[0]
        for b, crop in enumerate(crops):
            bright_lr, bright_hr = views[b, 0] > 0.8, fine[b, 0] > 0.8
            if bright_lr.sum() < 8:
                continue
            centre_lr = lr.index_to_physical(np.asarray(crop.start) + np.argwhere(bright_lr).mean(0))
            centre_hr = hr.index_to_physical(2 * np.asarray(crop.start) + np.argwhere(bright_hr).mean(0))
            np.testing.assert_allclose(centre_lr, centre_hr, atol=1.0)  # a quarter of a 4 mm voxel


def test_miram_losses_ignore_visible_regions():
    m = method_for("miram", roi=32)
    views = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(2))
    cells = m.choose_mask(1, 5, None, (), torch.Generator().manual_seed(9))  # the step's first draw
    visible_hr = ~upsample_mask(cells, 32, 3)[:, None]
    base = m.forward_step(views, 5, torch.Generator().manual_seed(9), high_res=target).terms
    changed = target.clone()
    changed[visible_hr] = 0.0
    assert m.forward_step(views, 5, torch.Generator().manual_seed(9), high_res=changed).terms == base
    changed = target.clone()
    changed[~visible_hr] = 0.0
    assert m.forward_step(views, 5, torch.Generator().manual_seed(9), high_res=changed).terms["reconstruction_high"] != (
        base["reconstruction_high"]
    )
    # the shared loss itself: errors on visible cells do not count
    pred = torch.zeros(1, 1, 32, 32, 32)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    noisy = pred.clone()
    noisy[0, 0, 16:, 16:, 16:] = 5.0  # a visible cell only
    assert float(masked_cell_mse(views, pred, mask, 16)) == float(masked_cell_mse(views, noisy, mask, 16))


# --- CASS ------------------------------------------------------------------------------------------------------
def test_cass_trains_both_networks_with_a_symmetric_loss():
    m = method_for("cass", roi=32, cnn_depth=10, cnn_width=0.25)
    out = m.forward_step(torch.rand(2, 1, 32, 32, 32), 0, torch.Generator().manual_seed(0))
    out.loss.backward()
    for network in ("transformer", "cnn", "transformer_head", "cnn_head"):
        total = sum(float(p.grad.abs().sum()) for p in m.network(network).parameters() if p.grad is not None)
        assert total > 0, network
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    assert float(alignment_loss(a, b)) == pytest.approx(float(alignment_loss(b, a)))
    assert float(alignment_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment_loss(a, -a)) == pytest.approx(4.0, abs=1e-5)
    encoders = {e.name: e for e in m.published_encoders()}
    assert encoders["cnn"].kind == "resnet" and encoders["transformer"].class_attention_trained


# --- every viewer on every new method's run folder ------------------------------------------------------------------
SMALL = {
    "mim": ["--samples-mid", "1", "--samples-fine", "1"],
    "miram": [],
    "cass": ["--cnn-depth", "10", "--cnn-width", "0.25"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SMALL))
def test_attention_embed_and_finetune_work_on_each_new_method(method, shared_data, tmp_path):
    ct = str(shared_data / "example_ct.nii.gz")
    run = tmp_path / method
    args = ["--preset", "tiny", "--roi", "32", "--spacing", "4", "--steps", "2", "--batch-size", "1", "--quiet"]
    assert main(["pretrain", ct, "--out", str(run), "--method", method, *args, *SMALL[method]]) == 0
    att = tmp_path / "att"
    assert main(["attention", ct, "--checkpoint", str(run), "--out", str(att), "--quiet"]) == 0
    names = {p.name for p in att.iterdir()}
    expected = {"mim": "picture_levels.nii.gz", "miram": "picture_reconstruction_x2.nii.gz", "cass": "attention_mean.nii.gz"}
    assert expected[method] in names
    if method != "cass":  # the class attention is not trained: nothing is presented as attention
        assert not any(n.startswith("attention_") for n in names)
        assert json.loads((att / "head_diversity.json").read_text())["crop"] is None
    emb = tmp_path / "emb"
    assert main(["embed", ct, "--checkpoint", str(run), "--out", str(emb), "--method", "pca", "--patch", "8", "--stride", "8", "--quiet"]) == 0
    config = FinetuneConfig(
        images=[ct],
        segmentations=[str(shared_data / "example_seg_fast_force_split.nii.gz")],
        out=str(tmp_path / "seg"),
        organs=[5],
        init=str(run),
        roi=64,
        steps=1,
        batch_size=1,
        val_split="none",
    )
    report = consume(run_finetuning(config)).summary["init"]
    assert report["method"] == method and report["which"] == {"mim": "encoder", "miram": "encoder", "cass": "transformer"}[method]


@pytest.mark.parametrize("shape", [(2, 1, 32, 48, 16), (3, 1, 32, 16)])
def test_unpatchify_inverts_patchify_in_2d_and_3d(shape):
    from napari_dagman.core.methods.losses import patchify, unpatchify

    x = torch.randn(shape)
    cells = patchify(x, 16)
    assert cells.shape == (shape[0], x[0, 0].numel() // 16 ** (len(shape) - 2), 16 ** (len(shape) - 2))
    assert torch.equal(unpatchify(cells, x.shape, 16), x)
