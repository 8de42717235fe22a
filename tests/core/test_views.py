"""Views worth learning from: per-view augmentation (MONAI), regions, local crops, and exact repetition."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from napari_dagman.core.augment import Augmentation, AugmentSettings, view_seed
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.data import PreparedVolume, ViewSampler
from napari_dagman.core.methods.losses import DistillationLoss
from napari_dagman.core.training import consume, run_pretraining


def _volume(shape=(80, 96, 96), seed=0) -> PreparedVolume:
    rng = np.random.default_rng(seed)
    array = rng.random(shape, dtype=np.float32)
    return PreparedVolume(array, (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), np.eye(3), "v", "h")


def test_each_view_gets_its_own_draw_and_the_same_seed_repeats_it():
    aug = Augmentation(AugmentSettings(), dims=3)
    crop = np.linspace(0, 1, 32**3, dtype=np.float32).reshape(1, 32, 32, 32)
    a = aug.apply(crop, view_seed(0, 5, 0, 0, 0))
    b = aug.apply(crop, view_seed(0, 5, 0, 0, 1))  # the second view of the same sample
    assert a.shape == crop.shape and a.dtype == np.float32
    assert not np.allclose(a, b)  # two views, two draws
    assert not np.allclose(a, crop)  # the intensity scale/shift is always drawn
    np.testing.assert_array_equal(a, aug.apply(crop, view_seed(0, 5, 0, 0, 0)))  # same seed, same view


def test_views_drawn_inside_a_bf16_step_are_the_fp32_views():
    """The sampler runs inside the step's bf16 autocast: the affine must neither fail nor lose precision."""
    aug = Augmentation(AugmentSettings(rotate=10.0, zoom=0.1), dims=3)
    crop = np.linspace(0, 1, 32**3, dtype=np.float32).reshape(1, 32, 32, 32)
    seeds = [view_seed(0, 3, 0, 0, k) for k in range(6)]  # the affine is drawn in half the views
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = [aug.apply(crop, seed) for seed in seeds]
    for seed, view in zip(seeds, inside, strict=True):
        np.testing.assert_array_equal(view, aug.apply(crop, seed))


def test_a_sample_pairs_two_differently_augmented_views_of_one_region():
    volume = _volume()
    aug = Augmentation(AugmentSettings(), dims=3)
    plain = ViewSampler([volume], roi=32, dims=3, batch_size=2, seed=3, region_scale=1.0)
    same = plain.sample(0)
    # region 1 x ROI: both views are the same crop (the old behaviour without augmentation)
    np.testing.assert_array_equal(same.views[0], same.views[2])
    augmented = ViewSampler([volume], roi=32, dims=3, batch_size=2, seed=3, region_scale=1.0, augmentation=aug)
    batch = augmented.sample(0)
    assert batch.crops[0].start == batch.crops[2].start  # same place...
    assert not np.allclose(batch.views[0], batch.views[2])  # ...different draws
    np.testing.assert_array_equal(batch.views, augmented.sample(0).views)  # a pure function of (seed, step)
    wide = ViewSampler([volume], roi=32, dims=3, batch_size=8, seed=3, region_scale=2.0)
    starts = wide.sample(1).crops
    assert any(a.start != b.start for a, b in zip(starts[:8], starts[8:], strict=True))
    for a, b in zip(starts[:8], starts[8:], strict=True):  # both views inside one region of 64 voxels
        assert all(abs(p - q) <= 64 - 32 for p, q in zip(a.start, b.start, strict=True))


def test_local_crops_come_from_the_sample_region_and_are_smaller():
    sampler = ViewSampler([_volume()], roi=64, dims=3, batch_size=2, seed=0, region_scale=1.0, local_views=3, local_roi=32)
    batch = sampler.sample(4)
    assert batch.local.shape == (6, 1, 32, 32, 32)
    for k, crop in enumerate(batch.local_crops):
        view = batch.crops[k % 2]  # local crop k belongs to sample k % 2
        assert all(v <= c <= v + 32 for c, v in zip(crop.start, view.start, strict=True))


def test_high_resolution_targets_repeat_the_views_geometry():
    """MIRAM: the finer crop of a view gets the same flip and intensity change as the view (not its noise)."""
    low = _volume((64, 64, 64))
    fine = np.repeat(np.repeat(np.repeat(low.array, 2, 0), 2, 1), 2, 2)
    high = PreparedVolume(fine, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3), "v", "h")
    settings = AugmentSettings(noise=0.0, blur=0.0, rotate=0.0, zoom=0.0, flip=1.0)
    sampler = ViewSampler(
        [low], roi=32, dims=3, batch_size=2, seed=0, views=1, augmentation=Augmentation(settings, 3),
        high_res=[high], high_res_factor=2,
    )
    batch = sampler.sample(0)
    target = sampler.high_res_views(batch.crops, batch.seeds)
    pooled = target.reshape(2, 1, 32, 2, 32, 2, 32, 2).mean(axis=(3, 5, 7))
    np.testing.assert_allclose(pooled, batch.views, atol=1e-5)
    unaugmented = sampler.high_res_views(batch.crops)  # without the seeds: the raw crop, not flipped
    assert not np.allclose(unaugmented, target)


def test_local_crops_join_the_global_term_as_students_of_both_teacher_views():
    loss = DistillationLoss(16, student_temp=0.1, center_momentum=0.9)
    g = torch.Generator().manual_seed(0)
    teacher, student, local = (torch.randn(n, 16, generator=g) for n in (4, 4, 6))  # B = 2, 2 views, 3 locals
    t = torch.softmax(teacher / 0.04, -1).chunk(2)
    s = torch.log_softmax(student / 0.1, -1).chunk(2)
    ls = torch.log_softmax(local / 0.1, -1).split(2)
    pairs = [(t[0], s[1]), (t[1], s[0])] + [(t[q], crop) for q in range(2) for crop in ls]
    expected = sum(torch.sum(-a * b, -1).mean() for a, b in pairs) / len(pairs)
    torch.testing.assert_close(loss.global_loss(teacher, student, 2, 0.04, local=local), expected)
    without = sum(torch.sum(-a * b, -1).mean() for a, b in pairs[:2]) / 2
    torch.testing.assert_close(loss.global_loss(teacher, student, 2, 0.04), without)


@pytest.mark.slow
def test_an_augmented_seeded_run_repeats_bit_for_bit(tmp_path):
    from napari_dagman.core.phantom import make_phantom

    ct, _ = make_phantom()

    def run(out, **more):
        config = PretrainConfig(
            out=str(out), preset="tiny", roi=64, spacing=4.0, steps=3, batch_size=1, preview_every=0,
            probe_every=0, threads=1, precision="fp32", options={"local_crops": 2}, **more,
        )
        consume(run_pretraining(config, [ct]))
        assert not [t for t in threading.enumerate() if t.name.startswith("napari-dagman-loader")]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        from napari_dagman.core.checkpoint import load_tensors

        return rows, load_tensors(out / "model.safetensors")[0]

    rows_a, weights_a = run(tmp_path / "a")  # the next step's views drawn ahead by the loader thread
    rows_b, weights_b = run(tmp_path / "b", loader_thread=False)  # each step's drawn when it starts
    for a, b in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in a.items() if k not in ("time", "seconds")} == {
            k: v for k, v in b.items() if k not in ("time", "seconds")
        }
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
