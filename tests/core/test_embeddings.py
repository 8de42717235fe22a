"""Organ clusters core: patch geometry, pooling, organ purity, controls, cache, projections, metrics, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tests.helpers import read_only_folder

from napari_dagman.cli import main
from napari_dagman.core.config import EmbedConfig
from napari_dagman.core.embeddings import (
    EmbeddingCache,
    analyse,
    box_counts,
    build_table,
    cluster_features,
    embed_volume,
    grid_starts,
    load_encoder,
    patch_organs,
    pool_patches,
    project,
    projection_key,
    quality_metrics,
    random_init_encoder,
    run_embedding,
    selection_mask,
    slab_splits,
)
from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.events import CancelToken, LogEvent, ProgressEvent
from napari_dagman.core.io import read_volume, write_volume
from napari_dagman.core.volume import Volume


def finish(generator):
    """Run a job generator to its end: (events, returned value)."""
    events = []
    while True:
        try:
            events.append(next(generator))
        except StopIteration as stop:
            return events, stop.value


def crop(volume: Volume, start, size) -> Volume:
    """A sub-volume with the geometry of where it lies."""
    region = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    origin = tuple(volume.index_to_physical(np.asarray(start, float)))
    return Volume(
        volume.array[region].copy(), volume.spacing, origin, volume.direction, dict(volume.metadata)
    )


@pytest.fixture(scope="module")
def ct_pair(shared_data):
    """The real CT and its label map, cropped to the upper abdomen (liver, colon, kidneys, spleen, muscles)."""
    image = read_volume(shared_data / "example_ct.nii.gz")
    labels = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    start, size = (52, 10, 14), (60, 80, 100)
    return crop(image, start, size), crop(labels, start, size)


@pytest.fixture(scope="module")
def small_pair(ct_pair):
    """A 129 mm cube of it around the liver: one 32^3 encoder window at the tiny run's 4 mm (fast)."""
    image, labels = ct_pair
    return crop(image, (17, 10, 6), (43, 43, 43)), crop(labels, (17, 10, 6), (43, 43, 43))


@pytest.fixture(scope="module")
def pretrained(tiny_run):
    return load_encoder(EmbedConfig(checkpoint=str(tiny_run)))


def test_patch_centres_follow_the_image_geometry(pretrained):
    # 2 mm voxels, an origin off zero; the run resamples to 4 mm: a patch of 8 run voxels is 16 source voxels
    volume = Volume(np.zeros((40, 36, 48), np.int16), (2.0, 2.0, 2.0), (10.0, -20.0, 30.0))
    config = EmbedConfig(features="position", patch=8, stride=4, cache=False)
    _, emb = finish(embed_volume(volume, pretrained, config))
    assert emb.patch == (8, 8, 8) and np.allclose(emb.patch_mm, 32.0)
    first = np.flatnonzero((emb.starts == 0).all(axis=1))[0]
    # the first patch covers source voxels 0..15 on each axis: its centre is source index 7.5
    assert np.allclose(emb.centres_index()[first], 7.5)
    assert np.allclose(emb.centres_mm()[first], np.array([10.0, -20.0, 30.0]) + 2.0 * 7.5)
    # physical and voxel centres agree with the image's own geometry for every patch
    assert np.allclose(volume.index_to_physical(emb.centres_index()), emb.centres_mm())
    assert np.allclose(emb.features, emb.centres_mm(), atol=1e-4)  # position control = the centres
    table = build_table(emb)
    assert np.allclose(table[["z_mm", "y_mm", "x_mm"]].to_numpy(), emb.centres_mm())
    assert np.allclose(table[["z_index", "y_index", "x_index"]].to_numpy(), emb.centres_index())
    # the selection of that patch lights up exactly those 16^3 source voxels
    mask = selection_mask(emb, [first])
    assert mask.sum() == 16**3 and mask[:16, :16, :16].all()


def test_real_ct_centres_are_physical_lps(ct_pair, pretrained):
    image, _ = ct_pair
    _, emb = finish(embed_volume(image, pretrained, EmbedConfig(features="position", cache=False)))
    table = build_table(emb)
    index = table[["z_index", "y_index", "x_index"]].to_numpy()
    mm = table[["z_mm", "y_mm", "x_mm"]].to_numpy()
    assert np.allclose(image.index_to_physical(index), mm)
    lo, hi = image.physical_extent()
    assert (mm > lo).all() and (mm < hi).all()


def test_pooling_is_the_mean_over_the_patch():
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(5, 6, 6, 6)).astype(np.float32)  # tokens of 2 voxels
    starts = np.array([[1, 0, 3], [0, 0, 0], [5, 2, 1]])
    pooled = pool_patches(fmap, (2, 2, 2), starts, (3, 4, 5))
    voxels = fmap.repeat(2, 1).repeat(2, 2).repeat(2, 3)  # the token map at voxel resolution
    for start, row in zip(starts, pooled, strict=True):
        z, y, x = start
        assert np.allclose(row, voxels[:, z : z + 3, y : y + 4, x : x + 5].mean(axis=(1, 2, 3)), atol=1e-5)


def test_box_counts_and_purity_match_a_direct_count():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(20, 18, 22)).astype(np.uint8)
    labels[5:15, 4:12, 6:18] = 7
    starts = grid_starts(labels.shape, (6, 5, 7), (3, 4, 5))
    counts = box_counts(labels, starts, (6, 5, 7))
    for start, row in zip(starts, counts, strict=True):
        z, y, x = start
        direct = np.bincount(labels[z : z + 6, y : y + 5, x : x + 7].ravel(), minlength=8)
        assert np.array_equal(row, direct)
    organ, purity = patch_organs(labels, starts, (6, 5, 7))
    assert np.array_equal(organ, counts.argmax(1)) and np.allclose(purity, counts.max(1) / 210)


def test_purity_counts_match_the_published_patch_counts(shared_data):
    """shared/data/README.md: the seg at 1.5 mm (nearest, same origin and axes) tiled with 32^3 patches."""
    image = sitk.ReadImage(str(shared_data / "example_seg_fast_force_split.nii.gz"))
    size = [int(round(n * s / 1.5)) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    resampled = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(), (1.5,) * 3,
        image.GetDirection(), 0, image.GetPixelID(),
    )  # fmt: skip
    labels = sitk.GetArrayFromImage(resampled)
    expected = {32: (294, {5: 7, 20: 8, 21: 2, 81: 4}, 32), 16: (2002, {5: 57, 20: 57, 21: 24, 86: 15}, None)}
    for stride, (n_patches, per_organ, single) in expected.items():
        starts = grid_starts(labels.shape, (32,) * 3, (stride,) * 3)
        organ, purity = patch_organs(labels, starts, (32,) * 3)
        good = organ[(organ > 0) & (purity >= 0.5)]
        assert len(starts) == n_patches
        for label, count in per_organ.items():
            assert (good == label).sum() == count
        if single is not None:
            assert len(good) == single


def test_encoder_features_tokens_and_controls(small_pair, pretrained):
    image, labels = small_pair
    base = EmbedConfig(patch=8, stride=4, overlap=0.0, cache=False)
    events, emb = finish(embed_volume(image, pretrained, base, labels=labels))
    assert any(isinstance(e, ProgressEvent) for e in events)
    # 8-voxel patches inside 16-voxel stage-3 tokens share features: said, not hidden
    assert any(isinstance(e, LogEvent) and "smaller than stage 3's tokens" in e.message for e in events)
    assert emb.features.shape == (len(emb.starts), pretrained.arch.stage_channels(3)) == (7**3, 96)
    assert np.isfinite(emb.features).all() and emb.has_labels
    assert {"liver", "colon"} <= set(emb.organ_labels())

    _, tokens = finish(embed_volume(image, pretrained, base.replace(pooling="token", stage=2)))
    assert len(tokens) == 4**3 and tokens.patch == (8, 8, 8)  # 32 voxels at 4 mm / 8-voxel tokens
    assert tokens.features.shape[1] == pretrained.arch.stage_channels(2)

    arch = pretrained.arch
    same = random_init_encoder(arch, 0).state_dict(), random_init_encoder(arch, 0).state_dict()
    other = random_init_encoder(arch, 1).state_dict()
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    assert not all(torch.equal(same[0][k], other[k]) for k in other)
    _, untrained = finish(embed_volume(image, pretrained, base.replace(features="random-init")))
    assert untrained.features.shape == emb.features.shape
    assert not np.allclose(untrained.features, emb.features)

    _, hist = finish(embed_volume(image, pretrained, base.replace(features="intensity", hist_bins=16)))
    assert hist.features.shape == (len(emb), 16) and np.allclose(hist.features.sum(1), 1.0)
    assert np.array_equal(hist.starts, emb.starts)  # every control on exactly the same patches


def test_organ_sampling_reaches_small_organs(ct_pair, pretrained):
    image, labels = ct_pair
    config = EmbedConfig(features="position", sampling="organs", per_organ=3, patch=4, cache=False)
    _, emb = finish(embed_volume(image, pretrained, config, labels=labels))
    grid = finish(embed_volume(image, pretrained, config.replace(sampling="grid"), labels=labels))[1]
    small = {n for n, p in zip(grid.organ_labels(), grid.purity, strict=True) if p >= 0.5}
    sampled = set(emb.organ_labels())
    assert len(sampled - small - {"background"}) >= 3  # organs no lattice patch is made of
    assert (emb.sampled == 1).all() and emb.purity.mean() > 0.5
    with pytest.raises(DagmanInputError, match="label map"):
        finish(embed_volume(image, pretrained, config))


def test_cache_hit_returns_identical_results(small_pair, pretrained, tmp_path):
    image, labels = small_pair
    config = EmbedConfig(patch=8, stride=4, overlap=0.0, method="pca", cache_dir=str(tmp_path))
    events_a, first = finish(run_embedding(config, image, labels, pretrained=pretrained))
    events_b, second = finish(run_embedding(config, image, labels, pretrained=pretrained))
    assert not any("cache" in getattr(e, "message", "") for e in events_a)
    assert any(isinstance(e, LogEvent) and "cache" in e.message for e in events_b)
    assert not any(isinstance(e, ProgressEvent) for e in events_b)  # no encoder pass at all
    a, b = first.embeddings, second.embeddings
    for name in ("features", "starts", "organ_id", "purity", "sampled"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.organ_names == b.organ_names and a.key == b.key
    assert np.array_equal(first.projection, second.projection)
    assert first.table.equals(second.table)
    # a setting that changes the features is another entry; one that does not (batch size) is the same
    assert (
        finish(run_embedding(config.replace(stage=2), image, labels, pretrained=pretrained))[1].embeddings.key
        != a.key
    )
    assert (
        finish(run_embedding(config.replace(batch_size=4), image, labels, pretrained=pretrained))[
            1
        ].embeddings.key
        == a.key
    )
    # a damaged entry is recomputed, not trusted
    (tmp_path / f"{a.key}.npz").write_bytes(b"broken")
    assert EmbeddingCache(tmp_path).load(a.key) is None


def flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_damaged_cache_entries_are_recomputed(small_pair, pretrained, tmp_path):
    """A cut .npz or a broken .json (full disk, killed process, copied half) is a miss, then written again."""
    image, labels = small_pair
    config = EmbedConfig(features="position", patch=8, stride=4, method="pca", cache_dir=str(tmp_path))
    _, first = finish(run_embedding(config, image, labels, pretrained=pretrained))
    key = first.embeddings.key
    npz, meta = tmp_path / f"{key}.npz", tmp_path / f"{key}.json"
    projection = tmp_path / f"{projection_key(key, config)}.npz"
    damages = {
        "cut npz": lambda: npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2]),
        "flipped byte": lambda: npz.write_bytes(flip_byte(npz.read_bytes(), 200)),
        "cut json": lambda: meta.write_text('{"version": 1, "patch": [8, 8'),
        "json list": lambda: meta.write_text("[]"),
        "cut projection": lambda: projection.write_bytes(projection.read_bytes()[:100]),
    }
    for what, damage in damages.items():
        damage()
        events, again = finish(run_embedding(config, image, labels, pretrained=pretrained))
        hit = any("loaded from the cache" in getattr(e, "message", "") for e in events)
        assert hit == (what == "cut projection"), what  # a damaged projection alone keeps the embeddings
        assert np.array_equal(again.embeddings.features, first.embeddings.features), what
        assert np.array_equal(again.projection, first.projection), what
        # written again: the next run finds a whole entry
        assert EmbeddingCache(tmp_path).load(key) is not None, what
        assert EmbeddingCache(tmp_path).load_array(projection_key(key, config)) is not None, what


def test_read_only_cache_folder_warns_once_and_computes(small_pair, pretrained):
    image, _ = small_pair
    with read_only_folder() as folder:
        config = EmbedConfig(features="position", patch=8, stride=4, method="pca", cache_dir=str(folder))
        runs = [finish(run_embedding(config, image, pretrained=pretrained)) for _ in range(2)]
        assert list(folder.iterdir()) == []
    warnings = [e for events, _ in runs for e in events if isinstance(e, LogEvent) and e.level == "warning"]
    assert len(warnings) == 1, warnings
    assert "not cached" in warnings[0].message and str(folder) in warnings[0].message
    assert "\n" not in warnings[0].message
    assert np.array_equal(runs[0][1].projection, runs[1][1].projection)


def test_cancel_raises_job_cancelled_like_every_job(small_pair, pretrained):
    from napari_dagman.core.events import JobCancelled

    image, _ = small_pair
    token = CancelToken()
    token.cancel()
    with pytest.raises(JobCancelled):
        finish(run_embedding(EmbedConfig(cache=False), image, pretrained=pretrained, cancel=token))


def test_projections_and_clusters_are_seeded():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (60, 12)), rng.normal(4, 1, (60, 12))])
    a, b = project(features, "pca", seed=3), project(features, "pca", seed=3)
    assert a.shape == (120, 2) and np.array_equal(a, b)
    tsne = project(features[::2], "tsne", seed=3)  # 1000 iterations: one call only
    assert tsne.shape == (60, 2) and np.isfinite(tsne).all()
    clusters = cluster_features(features, "kmeans", k=2, seed=0)
    assert len(set(clusters[:60])) == 1 and len(set(clusters[60:])) == 1 and clusters[0] != clusters[-1]
    dense = cluster_features(features, "hdbscan", min_cluster_size=10)
    assert dense.shape == (120,) and dense.max() >= 1
    with pytest.raises(DagmanInputError):
        project(features[:2], "pca")


@pytest.mark.slow
def test_umap_is_reproducible_unless_fast():
    """The one real UMAP test (numba compiles on the first call: 15-60 s)."""
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (150, 20)), rng.normal(3, 1, (150, 20))])
    a = project(features, "umap", seed=0)
    b = project(features, "umap", seed=0)
    assert a.shape == (300, 2) and np.array_equal(a, b)
    fast = project(features, "umap", fast=True)
    assert fast.shape == (300, 2) and np.isfinite(fast).all()


def test_slab_split_keeps_a_gap_between_train_and_test():
    z = np.random.default_rng(0).uniform(0, 300, 500)
    fold, splits = slab_splits(z, 5, gap=48.0)
    assert len(splits) == 5 and set(fold) == set(range(5))
    for test, train in splits:
        assert test.any() and train.any() and not (test & train).any()
        distance = np.abs(z[test][:, None] - z[train][None, :])
        assert distance.min() >= 48.0


def test_quality_metrics_separate_good_from_useless_features():
    rng = np.random.default_rng(0)
    organ = np.repeat([1, 2, 3, 0], 60)
    z = np.tile(np.linspace(0, 400, 60), 4)  # every organ spans the whole z range
    purity = np.full(len(organ), 0.9, np.float32)
    purity[:5] = 0.2  # impure patches are left out
    good = np.eye(4)[organ] * 5 + rng.normal(0, 0.3, (len(organ), 4))
    q = quality_metrics(good, organ, purity, z, patch_mm=30.0, organ_names={1: "a", 2: "b", 3: "c"})
    m = q.metrics
    assert m["evaluated_patches"] == 175 and m["organs"] == {"a": 55, "b": 60, "c": 60}
    assert m["nmi"] > 0.95 and m["ari"] > 0.95 and m["silhouette"] > 0.5 and m["knn_accuracy"] > 0.95
    assert not q.evaluated[:5].any() and not q.evaluated[180:].any()  # impure and background
    assert (q.slab[q.evaluated] >= 0).all() and (q.prediction[q.evaluated] >= 0).all()
    noise = rng.normal(0, 1, good.shape)
    m = quality_metrics(noise, organ, purity, z, patch_mm=30.0).metrics
    assert m["nmi"] < 0.2 and m["knn_accuracy"] < 0.6
    few = quality_metrics(noise, np.ones(len(organ), int), purity, z, patch_mm=30.0).metrics
    assert "note" in few and "nmi" not in few


def test_bad_inputs_give_clear_messages(ct_pair, pretrained, tmp_path):
    image, labels = ct_pair
    config = EmbedConfig(features="position", cache=False)
    other_grid = Volume(labels.array[:, :40], labels.spacing, labels.origin, labels.direction)
    with pytest.raises(DagmanInputError, match="not on the image grid"):
        finish(embed_volume(image, pretrained, config, labels=other_grid))
    # asked for explicitly, labels on another grid are resampled (nearest)
    _, emb = finish(embed_volume(image, pretrained, config.replace(resample_labels=True), labels=other_grid))
    assert emb.has_labels
    small = Volume(np.zeros((20, 20, 20), np.int16), (3.0, 3.0, 3.0))
    with pytest.raises(DagmanInputError, match="smaller than one patch"):
        finish(embed_volume(small, pretrained, EmbedConfig(cache=False)))
    (tmp_path / "empty").mkdir()
    for folder, reason in ((tmp_path / "empty", "no config.json"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(CheckpointError, match=f"cannot use .* as an encoder: .*{reason}"):
            load_encoder(EmbedConfig(checkpoint=str(folder)))
    with pytest.raises(DagmanInputError, match="token pooling"):
        EmbedConfig(pooling="token", sampling="both").validate()


def test_analyse_without_labels_has_no_metrics(ct_pair, pretrained):
    image, _ = ct_pair
    _, emb = finish(embed_volume(image, pretrained, EmbedConfig(features="intensity", cache=False)))
    _, result = finish(analyse(emb, EmbedConfig(method="pca", clusters=3)))
    assert result.metrics is None and "organ" not in result.table.columns
    assert set(result.table["cluster"]) == {0, 1, 2}
    assert {"pca_0", "pca_1", "x_mm", "z_index"} <= set(result.table.columns)


def test_cli_embed_writes_table_metrics_and_png(small_pair, tiny_run, tmp_path, capsys):
    image, labels = small_pair
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(labels, tmp_path / "seg.nii.gz", label_names=labels.metadata.get("label_names"))
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "ct.nii.gz"), "--checkpoint", str(tiny_run), "--out", str(out)]
    flags = ["--labels", str(tmp_path / "seg.nii.gz"), "--stage", "2", "--patch", "8", "--stride", "4",
             "--method", "pca", "--min-patches", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    assert main(args + flags) == 0
    printed = capsys.readouterr().out
    assert "NMI" in printed and "k-NN" in printed
    import pandas as pd

    table = pd.read_csv(out / "patches.csv")
    assert {"x_mm", "y_mm", "z_mm", "organ_id", "organ", "purity", "pca_0", "pca_1", "cluster"} <= set(table)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"nmi", "ari", "silhouette", "knn_accuracy"} <= set(metrics)
    assert (out / "scatter.png").stat().st_size > 1000
    assert EmbedConfig.load(out / "config.json").patch == 8

    # bad input: one line on stderr, exit status 2
    assert main(["embed", str(tmp_path / "ct.nii.gz"), "--checkpoint", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot use" in err[0]


# --- a probe that can score ---------------------------------------------------------------------------------------
def test_the_probe_never_scores_a_patch_whose_organ_is_absent_from_its_training_slabs():
    """Organ 3 lives only in the lowest slab: its patches cannot be named by a classifier trained on the other
    slabs, so they are left out (and counted), not scored as errors."""
    from napari_dagman.core.embeddings.metrics import quality_metrics

    rng = np.random.default_rng(0)
    z = np.repeat(np.arange(10) * 10.0, 30)  # 10 rows of centres, 30 patches each, 100 mm
    organ = np.where(z < 20, 3, np.where(np.arange(len(z)) % 2 == 0, 1, 2))
    features = np.eye(4)[organ] * 5 + rng.normal(0, 0.1, (len(z), 4))  # perfectly separable
    q = quality_metrics(features, organ, np.ones(len(z)), z, patch_mm=10.0, slabs=5, gap_mm=5.0, knn=3)
    lowest = q.slab == 0
    assert np.all(q.prediction[organ == 3] == -1)  # never scored
    assert q.metrics["knn_unseen_organ"] == int((organ == 3).sum())
    assert q.metrics["knn_scored"] == int(((organ != 3) & (q.slab >= 0)).sum())
    assert "3" not in q.metrics["scored_organs"] and "1" in q.metrics["scored_organs"]
    # separable features score perfectly on what can be scored (the old count of errors gave 2/3 here)
    assert q.metrics["knn_balanced_accuracy"] == pytest.approx(1.0)
    assert q.metrics["linear_balanced_accuracy"] == pytest.approx(1.0)
    assert lowest.any()


def test_left_and_right_merge_into_one_organ_when_asked():
    from napari_dagman.core.embeddings.metrics import merge_side_pairs, quality_metrics, side_free_name

    assert side_free_name("kidney_left") == "kidney" and side_free_name("rib_right_7") == "rib_7"
    assert side_free_name("liver") == "liver"
    ids, names = merge_side_pairs(np.array([2, 3, 5, 0]), {2: "kidney_right", 3: "kidney_left", 5: "liver"})
    assert ids.tolist() == [2, 2, 5, 0] and names == {2: "kidney", 5: "liver"}
    rng = np.random.default_rng(1)
    z = np.repeat(np.arange(10) * 10.0, 20)
    organ = np.where(np.arange(len(z)) % 3 == 0, 5, np.where(np.arange(len(z)) % 3 == 1, 2, 3))
    kidney = organ != 5
    features = np.stack([kidney * 5.0, (~kidney) * 5.0], axis=1) + rng.normal(0, 0.1, (len(z), 2))
    names = {2: "kidney_right", 3: "kidney_left", 5: "liver"}
    apart = quality_metrics(features, organ, np.ones(len(z)), z, patch_mm=10.0, organ_names=names, gap_mm=5.0)
    merged = quality_metrics(
        features, organ, np.ones(len(z)), z, patch_mm=10.0, organ_names=names, gap_mm=5.0, merge_sides=True
    )
    assert set(merged.metrics["organs"]) == {"kidney", "liver"}
    assert merged.metrics["linear_balanced_accuracy"] == pytest.approx(1.0)
    assert apart.metrics["linear_balanced_accuracy"] < 0.9  # the sides cannot be told apart by these features


def test_a_held_out_slab_trains_outside_it_and_scores_inside_it():
    from napari_dagman.core.embeddings.metrics import held_out_split, quality_metrics

    z = np.repeat(np.arange(20) * 5.0, 10)  # 0..95 mm
    fold, [(test, train)] = held_out_split(z, 40.0, 55.0, gap=10.0)
    assert set(z[test]) == {40.0, 45.0, 50.0, 55.0}
    assert z[train].max() == 95.0 and not np.any((z[train] >= 30.0) & (z[train] <= 65.0))
    organ = np.where(np.arange(len(z)) % 2 == 0, 1, 2)
    features = np.eye(3)[organ] * 4 + np.random.default_rng(0).normal(0, 0.1, (len(z), 3))
    q = quality_metrics(
        features, organ, np.ones(len(z)), z, patch_mm=10.0, gap_mm=10.0, test_slab_mm=(55.0, 40.0)
    )
    assert q.metrics["knn_scored"] == int(test.sum())  # only the slab is scored
    assert np.all(q.prediction[~test] == -1)
    assert q.metrics["linear_balanced_accuracy"] == pytest.approx(1.0)
    assert q.metrics["settings"]["test_slab_mm"] == [55.0, 40.0]
    with pytest.raises(Exception, match="two numbers"):
        EmbedConfig(test_slab=[1.0]).validate()


def test_too_few_organ_patches_says_what_to_change():
    """A chest CT at 48 mm patches left 452 of 504 patches background and the dock said only "not enough organ
    patches" (issue 27): the reading names the count, the patch size and what to try."""
    from napari_dagman.core.embeddings.metrics import metrics_reading, quality_metrics

    rng = np.random.default_rng(0)
    organ = np.zeros(60, np.int64)
    organ[:6] = 5  # one organ with enough patches, the rest background
    quality = quality_metrics(
        rng.normal(size=(60, 8)), organ, np.ones(60), np.linspace(0, 300, 60), patch_mm=48.0, organ_names={5: "liver"}
    )
    reading = metrics_reading(quality.metrics)
    assert "54 of 60 patches of 48 mm" in reading and "24 mm" in reading and "organ sampling" in reading


def test_organs_without_a_scored_patch_are_named_with_their_thickness_and_a_patch_size_that_fits():
    """Issue 27: 48 mm patches lost the aorta, the pulmonary artery and T12 without a word."""
    from napari_dagman.core.embeddings.patches import missing_organs_note, organ_thickness_mm

    labels = np.zeros((40, 40, 40), np.int64)
    labels[4:36, 4:36, 4:24] = 1  # a liver: 20 voxels (40 mm) thick
    labels[4:36, 28:32, 28:32] = 2  # an aorta: a 4-voxel (8 mm) tube
    labels[10:14, 30:34, 34:38] = 3  # a small organ with no name
    spacing = (2.0, 2.0, 2.0)
    thickness = organ_thickness_mm(labels, spacing)
    assert thickness[1] == pytest.approx(40.0, abs=4.1) and thickness[2] == pytest.approx(8.0, abs=4.1)
    names = {1: "liver", 2: "aorta"}
    missing, note = missing_organs_note(labels, spacing, names, {"liver"}, patch_mm=48.0, min_purity=0.5)
    assert set(missing) == {"aorta", "3"} and missing["aorta"] == pytest.approx(thickness[2], abs=0.1)
    assert "2 organ(s)" in note and "aorta" in note and "48 mm" in note and "patches of about 8 mm" in note
    assert missing_organs_note(labels, spacing, names, {"liver", "aorta", "3"}, 48.0, 0.5) == ({}, "")
