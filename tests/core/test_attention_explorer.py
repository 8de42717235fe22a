"""The attention explorer's core: sub-token maps, attention per organ, two runs compared, and mask tiles that are
the masks training draws."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from napari_dagman.cli import main
from napari_dagman.core.attention import AttentionMaps, attention_maps, crop_preview
from napari_dagman.core.attention import maps as maps_module
from napari_dagman.core.attention.organs import attention_by_organ
from napari_dagman.core.attention.preview import RUN_MASK, PreviewRecipe, preview_figure
from napari_dagman.core.checkpoint import load_pretrained_encoder
from napari_dagman.core.io import read_volume
from napari_dagman.core.masking import masked_count
from napari_dagman.core.pictures import load_run_method
from napari_dagman.core.volume import Volume


def finish(generator):
    try:
        while True:
            next(generator)
    except StopIteration as stop:
        return stop.value


def ramp_volume(shape=(48, 48, 64), spacing=4.0) -> Volume:
    """HU rising by one per voxel along x, inside the model's HU window: its value says where a voxel is."""
    x = np.arange(shape[2], dtype=np.float32)
    array = np.broadcast_to(-150.0 + x, shape).astype(np.float32).copy()
    return Volume(array, (spacing,) * 3, (0.0, 0.0, 0.0))


def test_subtoken_maps_are_the_mean_over_shifted_token_grids(tiny_run, monkeypatch):
    """With an 'attention' equal to each token's mean intensity of a ramp, every map value says where its token
    sat: the token map holds token centres, the half-token map the centres of half-token cells."""

    def token_means(encoder, batch):  # (B, 1, *roi) -> (B, heads, *tokens): block means over 16 voxels
        pooled = torch.nn.functional.avg_pool3d(batch.float(), 16)
        return pooled.repeat(1, 4, 1, 1, 1)

    monkeypatch.setattr(maps_module, "_window_attention", token_means)
    encoder = load_pretrained_encoder(tiny_run)  # ROI 32, 4 mm, tokens of 16 voxels
    volume = ramp_volume()
    hu_to_model = lambda hu: (hu + 175.0) / 425.0  # noqa: E731 - the model's HU window
    coarse = finish(attention_maps(encoder, volume, overlap=0.0, subtoken=1))
    fine = finish(attention_maps(encoder, volume, overlap=0.0, subtoken=2))
    assert coarse.maps.shape == (4, 3, 3, 4) and fine.maps.shape == (4, 6, 6, 8)
    assert fine.scale == [32.0, 32.0, 32.0] and coarse.scale == [64.0, 64.0, 64.0]
    token_centres = hu_to_model(-150.0 + 16 * np.arange(4) + 7.5)
    np.testing.assert_allclose(coarse.maps[0, 1, 1], token_centres, atol=1e-5)
    cell_centres = hu_to_model(-150.0 + 8 * np.arange(8) + 3.5)
    # interior cells: covered by both shifts, whose tokens' centres average to the cell's own centre
    np.testing.assert_allclose(fine.maps[0, 2, 2, 1:7], cell_centres[1:7], atol=1e-5)
    # the placement puts each cell's centre where its voxels are
    assert fine.translate[2] == pytest.approx(0.0 + 4.0 * 3.5)


def test_the_token_map_of_one_window_is_the_crops_attention(tiny_run, shared_data):
    encoder = load_pretrained_encoder(tiny_run)
    ct = read_volume(shared_data / "example_ct.nii.gz")
    preview = crop_preview(encoder, ct, seed=0)
    start = np.asarray(preview.start)
    # a volume that is exactly the preview's crop: one window, at offset 0
    crop = Volume(
        preview.image * 425.0 - 175.0, tuple(preview.image_scale), tuple(preview.image_translate), ct.direction
    )
    whole = finish(attention_maps(encoder, crop, overlap=0.0, subtoken=1))
    np.testing.assert_allclose(whole.maps, preview.attention, rtol=1e-4, atol=1e-4)
    assert start.shape == (3,)


def test_a_head_inside_one_organ_is_enriched_by_one_over_its_volume_share():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 2:7, 3:8] = 5  # 75 voxels of 1000
    labels[6:9, :, :] = 1  # 300 voxels
    lab = Volume(labels, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), metadata={"label_names": {5: "liver", 1: "spleen"}})
    focused = (labels == 5).astype(np.float32)
    uniform = np.ones_like(focused)
    maps = AttentionMaps(
        maps=np.stack([focused, uniform]),
        scale=[2.0, 2.0, 2.0],
        translate=[0.0, 0.0, 0.0],
        direction=np.eye(3),
        token_size=(1, 1, 1),
        windows=1,
        diversity={},
    )
    table = attention_by_organ(maps, lab, {5: "liver", 1: "spleen"}, within=np.ones_like(labels, bool))
    row = table[(table["head"] == "0") & (table["organ"] == "liver")].iloc[0]
    assert row["attention_share"] == pytest.approx(1.0) and row["volume_share"] == pytest.approx(0.075)
    assert row["enrichment"] == pytest.approx(1 / 0.075)
    assert table[(table["head"] == "0") & (table["organ"] == "spleen")]["enrichment"].iloc[0] == 0.0
    assert np.allclose(table[table["head"] == "1"]["enrichment"], 1.0)  # a uniform head: 1 everywhere


def test_cli_writes_subtoken_maps_and_attention_by_organ(tiny_run, shared_data, tmp_path):
    out = tmp_path / "att"
    ct = str(shared_data / "example_ct.nii.gz")
    seg = str(shared_data / "example_seg_fast_force_split.nii.gz")
    args = ["attention", ct, "--checkpoint", str(tiny_run), "--out", str(out), "--subtoken", "2", "--smooth"]
    assert main([*args, "--labels", seg, "--quiet"]) == 0
    mean = read_volume(out / "attention_mean.nii.gz")
    assert mean.spacing == (32.0, 32.0, 32.0)  # half a 16-voxel token at 4 mm: what the spacing says
    assert read_volume(out / "attention_mean_smooth.nii.gz").same_grid(read_volume(ct))
    table = pd.read_csv(out / "attention_by_organ.csv")
    assert list(table.columns) == ["head", "id", "organ", "attention_share", "volume_share", "enrichment"]
    liver = table[(table["organ"] == "liver") & (table["head"] == "mean")].iloc[0]
    assert liver["enrichment"] == pytest.approx(liver["attention_share"] / liver["volume_share"], rel=1e-4)  # CSV rounds
    shares = table[table["head"] == "0"]["attention_share"]
    assert 0.0 < shares.sum() <= 1.0 + 1e-6  # organs' shares of one head add up to at most everything


def test_compare_refuses_runs_of_another_architecture(tiny_run, tiny_run_2d, shared_data, tmp_path, capsys):
    ct = str(shared_data / "example_ct.nii.gz")
    code = main(["attention", ct, "--checkpoint", str(tiny_run), "--compare", str(tiny_run_2d), "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot compare" in err and "dims" in err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_compare_writes_both_runs_and_their_difference(tiny_run, shared_data, tmp_path, capsys):
    out = tmp_path / "vs"
    ct = str(shared_data / "example_ct.nii.gz")
    assert main(["attention", ct, "--checkpoint", str(tiny_run), "--compare", str(tiny_run), "--out", str(out), "--quiet"]) == 0
    first, second = read_volume(out / "attention_mean.nii.gz"), read_volume(out / "compare" / "attention_mean.nii.gz")
    difference = read_volume(out / "attention_difference_mean.nii.gz")
    np.testing.assert_allclose(difference.array, first.array - second.array, atol=1e-6)
    assert np.allclose(difference.array, 0.0, atol=1e-6)  # a run against itself
    assert capsys.readouterr().out.count("head diversity of these maps") == 2


def test_mask_tiles_are_the_masks_training_draws_for_that_crop_and_seed(tiny_run, shared_data):
    method, _ = load_run_method(tiny_run)
    options = method.options
    encoder = load_pretrained_encoder(tiny_run)  # the teacher: the network whose attention chooses the masks
    ct = read_volume(shared_data / "example_ct.nii.gz")
    for seed in (0, 5):
        preview = crop_preview(encoder, ct, strategies="all", seed=seed)
        x = torch.from_numpy(np.ascontiguousarray(preview.image))[None, None]
        with torch.no_grad():
            clean = method.teacher(x)
        late = 10**6  # after every warm-up
        drawn = method.choose_mask(1, late, clean.encoder.attention, clean.encoder.grid, torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(drawn[0].numpy(), preview.masks[options.mask_strategy])
        gen = torch.Generator().manual_seed(seed)  # the noisy teacher, exactly as a training step runs it
        dropped, noise = method.teacher_noise(1, gen)
        t_out = method.teacher_pass(x, dropped, noise, gen)
        noisy = method.choose_mask(1, late, t_out.encoder.attention, t_out.encoder.grid, gen, unseen=dropped)
        np.testing.assert_array_equal(noisy[0].numpy(), preview.masks["noisy-teacher"])
        np.testing.assert_array_equal(noisy[0].numpy(), preview.masks[RUN_MASK])  # dagman's own recipe is this one
        np.testing.assert_array_equal(dropped[0].numpy(), preview.teacher_dropped)


def _recipe(method: str) -> PreviewRecipe:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.methods.registry import get_method

    config = PretrainConfig(method=method).to_dict()
    config["capabilities"] = get_method(method).capabilities.to_dict()
    return PreviewRecipe.of_run(config)


def test_the_cli_png_draws_attention_on_the_explorers_fixed_scale(tiny_run, shared_data):
    """A near-uniform map (a 1 % ripple) must not fill the colour map: the PNG uses the fixed 1/4-4 x-uniform
    logarithmic scale, not matplotlib's per-image stretch."""
    from matplotlib.colors import LogNorm

    encoder = load_pretrained_encoder(tiny_run)
    ct = read_volume(shared_data / "example_ct.nii.gz")
    preview = crop_preview(encoder, ct, recipe=_recipe("dagman"), seed=0)
    fig = preview_figure(preview)
    overlay = fig.axes[0].images[1]
    assert isinstance(overlay.norm, LogNorm) and (overlay.norm.vmin, overlay.norm.vmax) == (0.25, 4.0)
    shades = overlay.norm(overlay.get_array())
    assert float(shades.max() - shades.min()) < 0.05  # a flat map is one shade: the middle of the scale
    assert abs(float(shades.mean()) - 0.5) < 0.02


def test_previews_are_drawn_with_the_runs_own_recipe(tiny_run, shared_data):
    """An AttMask run hides 0.3 +- 0.2 of the cells in about half its draws; DAGMaN 0.6 in every draw."""
    encoder = load_pretrained_encoder(tiny_run)
    ct = read_volume(shared_data / "example_ct.nii.gz")
    attmask, dagman = _recipe("attmask"), _recipe("dagman")
    assert attmask.masks.masking_prob == 0.5 and attmask.masks.jitter == 0.2 and attmask.teacher_noise == "none"
    shares = {"attmask": [], "dagman": []}
    for seed in range(24):
        for name, recipe in (("attmask", attmask), ("dagman", dagman)):
            mask = crop_preview(encoder, ct, recipe=recipe, seed=seed).masks[RUN_MASK]
            shares[name].append(float(mask.mean()))
    cells = 8  # ROI 32 in cells of 16: 2 x 2 x 2
    unmasked = [s for s in shares["attmask"] if s == 0.0]
    assert 6 <= len(unmasked) <= 18  # about half of 24 draws (binomial: 12 +- 2.5 sd)
    masked = [s for s in shares["attmask"] if s > 0]
    assert all(0.1 - 1 / cells <= s <= 0.5 + 1 / cells for s in masked)  # the run's ratio within one cell
    assert all(abs(s - masked_count(cells, 0.6) / cells) < 1e-9 for s in shares["dagman"])


def test_a_method_without_a_teacher_gets_no_teacher_tiles(tiny_run, shared_data):
    encoder = load_pretrained_encoder(tiny_run)
    ct = read_volume(shared_data / "example_ct.nii.gz")
    for method in ("simmim", "miram"):
        recipe = _recipe(method)
        assert not recipe.has_teacher
        preview = crop_preview(encoder, ct, recipe=recipe, strategies="all", seed=0)
        assert "noisy-teacher" not in preview.masks and not preview.teacher_dropped.any()
        assert RUN_MASK in preview.masks and "random" in preview.masks
    mim = crop_preview(encoder, ct, recipe=_recipe("mim"), seed=0)  # MiM hides no cells of a crop: no run mask
    assert mim.masks == {}


def test_the_cli_writes_attention_stats_with_a_verdict_per_head(tiny_run, shared_data, tmp_path, capsys):
    out = tmp_path / "stats"
    ct = str(shared_data / "example_ct.nii.gz")
    assert main(["attention", ct, "--checkpoint", str(tiny_run), "--out", str(out), "--scope", "crop", "--quiet"]) == 0
    stats = json.loads((out / "attention_stats.json").read_text())
    keys = {"normalised_entropy", "peak_x_uniform", "flat", "intensity_correlation", "randomisation_distance", "random_init_spread"}
    assert set(stats["heads"]) == {"0", "1", "2", "3"}
    for entry in [*stats["heads"].values(), stats["mean"]]:
        assert keys <= set(entry)
    # three steps of training: every head flat, and the checks say so in the CLI's words
    assert all(v["flat"] for v in stats["heads"].values())
    assert not stats["mean"]["distinguishable"]
    assert not (stats["head_diversity"]["js_above_chance"] or stats["head_diversity"]["diversity_above_chance"])
    printed = capsys.readouterr().out
    assert printed.count(": flat (normalised entropy") == 5  # four heads and the mean
    assert "indistinguishable from random initialisation" in printed and "not above chance" in printed
