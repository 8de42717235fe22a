"""Classification (issue 25): the probe, its intervals, splits and draws, lesion centres, bad tables, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from tests.helpers import run_cli

from napari_dagman.core.classification.evaluate import curve_rows, run_arms
from napari_dagman.core.classification.metrics import (
    classification_metrics,
    interval,
    patient_resamples,
    weighted_auc,
    weighted_average_precision,
)
from napari_dagman.core.classification.splits import (
    check_patient_sides,
    k_shot,
    patient_folds,
    table_split,
)
from napari_dagman.core.errors import DagmanInputError


def consume(generator):
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def synthetic(n_patients: int = 30, rows_each: int = 2, shift: float = 3.0, seed: int = 0):
    """Two classes (one per patient), 5 informative and 20 noise features."""
    rng = np.random.default_rng(seed)
    patient_class = np.arange(n_patients) % 2
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], rows_each)
    y = np.repeat(patient_class, rows_each)
    x = rng.normal(size=(len(y), 25))
    x[:, :5] += shift * y[:, None]
    return x, y, patients


def probe_auc(x, y, patients, shots=("all",), draws=1, seed=0):
    splits = patient_folds(y, patients, 5, seed)
    arms = consume(run_arms({"f": x}, y, patients, splits, list(shots), classes=2, draws=draws, c=None, seed=seed))
    return arms, curve_rows(arms, y, patients, 2, 400, seed)


# --- the probe and its intervals ----------------------------------------------------------------------------------
def test_probe_separates_separable_features_and_not_shuffled_labels():
    x, y, patients = synthetic()
    _, rows = probe_auc(x, y, patients)
    assert rows[0]["mean"] > 0.95
    shuffled = np.random.default_rng(1).permutation(len(y) // 2)
    y_shuffled = np.repeat((np.arange(len(y) // 2) % 2)[shuffled], 2)  # labels shuffled by patient
    _, rows = probe_auc(x, y_shuffled, patients)
    assert 0.25 < rows[0]["mean"] < 0.75
    assert rows[0]["ci95_low"] < 0.5 < rows[0]["ci95_high"]


@pytest.mark.parametrize("with_ties", [False, True])
def test_weighted_metrics_equal_sklearn_on_repeated_rows(with_ties):
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    score = rng.normal(size=40) + y
    if with_ties:
        score = np.round(score, 0)
    weights = rng.integers(0, 4, size=(5, 40))
    for w in weights:
        rows = np.repeat(np.arange(40), w)
        auc = weighted_auc(y, score, w[None])[0]
        ap = weighted_average_precision(y, score, w[None])[0]
        assert auc == pytest.approx(roc_auc_score(y[rows], score[rows]))
        assert ap == pytest.approx(average_precision_score(y[rows], score[rows]))


def test_bootstrap_interval_covers_the_true_auc_about_95_percent():
    """Scores N(d, 1) against N(0, 1) have AUC Phi(d / sqrt 2); the patient bootstrap's interval must cover it."""
    d = 1.0
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(0)
    covered, sims = 0, 200
    for s in range(sims):
        y = np.repeat([0, 1], 40)
        score = rng.normal(size=80) + d * y
        patients = np.arange(80)
        ci = interval(weighted_auc(y, score, patient_resamples(patients, 400, s)))
        covered += ci[0] <= truth <= ci[1]
    assert 0.88 <= covered / sims <= 0.99, covered / sims


def test_metrics_of_more_classes_and_their_intervals():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    probabilities = rng.dirichlet(np.ones(3), size=60)
    probabilities[np.arange(60), y] += 1.0  # every row right
    m = classification_metrics(y, probabilities, np.arange(60), class_names=["a", "b", "c"], bootstrap=200)
    assert "auc" not in m
    assert m["balanced_accuracy"] == 1.0 and m["recall"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert np.diag(m["confusion"]).tolist() == [20, 20, 20]
    binary = classification_metrics(y[:40], probabilities[:40, :2], np.arange(40), class_names=["a", "b"])
    low, high = binary["auc_ci95"]
    assert low <= binary["auc"] <= high


# --- splits and draws -----------------------------------------------------------------------------------------------
def test_patient_folds_never_split_a_patient_and_test_every_row_once():
    rng = np.random.default_rng(0)
    patients = np.asarray([f"p{i}" for i in rng.integers(0, 25, 120)])
    y = np.asarray([hash(p) % 2 for p in patients])
    y[:4] = [0, 1, 0, 1]
    splits = patient_folds(y, patients, 5, seed=0)
    check_patient_sides(splits, patients)
    for split in splits:
        assert not set(patients[split.train]) & set(patients[split.test])
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested.tolist()) == list(range(120))


def test_a_patient_on_both_sides_of_a_table_split_is_refused():
    patients = np.asarray(["a", "a", "b", "c"])
    splits = table_split(np.asarray(["train", "test", "train", "test"]))
    with pytest.raises(DagmanInputError, match="patient a is in both"):
        check_patient_sides(splits, patients)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_shot_draws_take_exactly_k_per_class_from_distinct_patients(k):
    rng = np.random.default_rng(k)
    patients = np.repeat([f"p{i}" for i in range(20)], 3)
    y = np.repeat(np.arange(20) % 2, 3)
    train = np.arange(45)
    for draw in range(10):
        chosen = k_shot(train, y, patients, k, np.random.default_rng([draw, k]))
        assert np.bincount(y[chosen]).tolist() == [k, k]
        assert set(chosen) <= set(train)
        assert len(set(patients[chosen])) == 2 * k  # enough patients: one row each
    with pytest.raises(ValueError):
        k_shot(np.arange(4), y, patients, 9, rng)


# --- lesion centres in world millimetres ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["example_ct.nii.gz", "example_ct_dicom"])
def test_a_world_centre_lands_on_its_voxel_for_ras_and_lps_inputs(shared_data, name):
    """SimpleITK's physical points are LPS whatever the file stores (the NIfTI is RAS, the DICOM series LPS); a
    centre given as x, y, z there must land on the same voxel of the volume the plugin reads."""
    import SimpleITK as sitk

    from napari_dagman.core.classification.features import centre_index
    from napari_dagman.core.io import read_volume

    path = shared_data / name
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    raw = sitk.GetArrayFromImage(image)  # z, y, x of the file's own grid
    volume = read_volume(path)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ijk = [int(rng.integers(2, s - 2)) for s in image.GetSize()]
        x, y, z = image.TransformIndexToPhysicalPoint(ijk)
        index = np.rint(centre_index(volume, np.asarray([z, y, x]))).astype(int)
        assert volume.array[tuple(index)] == raw[ijk[2], ijk[1], ijk[0]]
        assert np.allclose(volume.index_to_physical(index), [z, y, x], atol=1e-3)


# --- the command ---------------------------------------------------------------------------------------------------
def organ_table(tmp_path: Path, shared_data: Path, per_class: int = 4) -> Path:
    """Liver and spleen centres of the shared CT as two classes (a real-data smoke case), one patient per row."""
    from napari_dagman.core.io import read_volume

    ct = shared_data / "example_ct.nii.gz"
    labels = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    rng = np.random.default_rng(0)
    rows = []
    for organ, name in ((5, "liver"), (1, "spleen")):
        inside = np.argwhere(labels.array == organ)
        for k, index in enumerate(inside[rng.choice(len(inside), per_class, replace=False)]):
            z, y, x = labels.index_to_physical(index)
            rows.append({"image": str(ct), "label": name, "x": x, "y": y, "z": z, "size": 15, "patient": f"{name}{k}"})
    table = tmp_path / "organs.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def test_classify_writes_metrics_with_intervals_predictions_and_curves(tmp_path, capsys, shared_data, tiny_run):
    from napari_dagman.cli import main
    from napari_dagman.core.embeddings import features as embedding_features

    calls = []
    original = embedding_features.stage_feature_map

    def counting(*args, **kwargs):
        calls.append(1)
        return (yield from original(*args, **kwargs))

    table = organ_table(tmp_path, shared_data)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedding_features, "stage_feature_map", counting)
        code = main([
            "classify", str(table), "--checkpoint", str(tiny_run), "--out", str(out), "--folds", "2",
            "--shots", "1,all", "--draws", "2", "--bootstrap", "200", "--quiet",
        ])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert len(calls) == 2  # one volume, the run's encoder and the random-init one: once each, not once per row
    metrics = json.loads((out / "metrics.json").read_text())
    probe = metrics["heads"]["probe"]
    assert metrics["classes"] == ["liver", "spleen"] and metrics["positive"] == "spleen"
    assert probe["auc_ci95"] is None or probe["auc_ci95"][0] <= probe["auc"] <= probe["auc_ci95"][1]
    assert set(metrics["controls"]) == {"random-init", "intensity"}
    assert sorted(np.asarray(probe["confusion"]).sum(axis=1).tolist()) == [4, 4]
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["row"].tolist() == list(range(1, 9))
    assert np.allclose(predictions[["encoder_p_liver", "encoder_p_spleen"]].sum(axis=1), 1.0, atol=1e-5)
    curve = pd.read_csv(out / "curve.csv")
    assert sorted(zip(curve["features"], curve["shots"].astype(str), strict=True)) == sorted(
        (f, s) for f in ("encoder", "random-init", "intensity") for s in ("1", "all")
    )
    assert all((out / f).stat().st_size > 1000 for f in ("curve.png", "roc.png", "pr.png"))
    assert "AUC" in stdout


def write_table(tmp_path: Path, rows: list[dict]) -> Path:
    table = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "row 2: the image nowhere.nii.gz does not exist"),
        ("outside", "row 3: the centre x 0, y -160, z 9999 mm lies outside its image"),
        ("one_row", "the class b has one row"),
        ("two_splits", "patient p1 is in both"),
        ("empty", "holds no rows"),
        ("unreadable", "row 4:"),
    ],
)
def test_bad_tables_get_one_line_and_exit_2_before_any_feature(tmp_path, capsys, shared_data, tiny_run, case, message):
    ct = str(shared_data / "example_ct.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    good = [{"image": ct, "label": lab, "patient": f"p{i}", "x": 0.0, "y": -160.0, "z": 260.0} for i, lab in
            enumerate("abab")]  # fmt: skip
    rows = {
        "missing": [good[0], {**good[1], "image": "nowhere.nii.gz"}, *good[2:]],
        "outside": [good[0], good[1], {**good[2], "z": 9999.0}, good[3]],
        "one_row": good[:3],
        "two_splits": [{**g, "split": s, "patient": "p1" if i < 2 else g["patient"]}
                       for i, (g, s) in enumerate(zip(good, ["train", "test", "test", "train"], strict=True))],
        "empty": [],
        "unreadable": [*good[:3], {**good[3], "image": str(tmp_path / "broken.nii.gz")}],
    }[case]  # fmt: skip
    table = write_table(tmp_path, rows) if rows else tmp_path / "t.csv"
    if not rows:
        table.write_text("image,label\n")
    out = tmp_path / "out"
    code, stderr = run_cli(capsys, "classify", str(table), "--checkpoint", str(tiny_run), "--out", str(out))
    assert code == 2
    assert message in stderr
    assert not (out / "metrics.json").exists()


def test_a_lesion_box_is_the_lesions_whatever_the_stage_and_pools_the_tokens_it_touches():
    """A 10 mm lesion at 3 mm with context 2 is a 7-voxel box at every stage (the intensity control reads the
    lesion, not a 48 mm token of liver), and the encoder's feature is the mean of the tokens the box touches."""
    from napari_dagman.core.classification.features import pool_boxes, row_boxes
    from napari_dagman.core.classification.table import ClassTable
    from napari_dagman.core.config.classify import ClassifyConfig
    from napari_dagman.core.data import PreparedVolume

    pv = PreparedVolume(np.zeros((64, 64, 64), np.float32), (3.0,) * 3, (0.0,) * 3, np.eye(3), "v", "")
    table = ClassTable(
        path=Path("t.csv"), images=["a"], y=np.zeros(1, int), class_names=["a", "b"], patients=np.asarray(["p"]),
        centres=np.asarray([[96.0, 96.0, 96.0]]), sizes=np.asarray([10.0]), split=None,
    )  # fmt: skip
    for token in (4, 16):
        starts, stops = row_boxes(table, [0], pv, ClassifyConfig(context=2.0), (token,) * 3)
        assert (stops - starts).tolist() == [[7, 7, 7]]
        assert starts.tolist() == [[29, 29, 29]]  # centred on voxel 32
    fmap = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    pooled = pool_boxes(fmap, (16, 16, 16), starts, stops)  # voxels 29-35 touch tokens 1 and 2 on each axis
    assert np.allclose(pooled[0], fmap[:, 1:3, 1:3, 1:3].mean(axis=(1, 2, 3)))


def test_a_row_without_a_centre_pools_the_body_of_its_volume():
    from napari_dagman.core.classification.features import row_boxes
    from napari_dagman.core.classification.table import ClassTable
    from napari_dagman.core.config.classify import ClassifyConfig
    from napari_dagman.core.data import PreparedVolume

    array = np.zeros((20, 30, 40), np.float32)
    array[3:15, 5:25, 10:31] = 0.6  # the body: everything above the HU window's floor
    pv = PreparedVolume(array, (3.0,) * 3, (0.0,) * 3, np.eye(3), "v", "")
    table = ClassTable(
        path=Path("t.csv"), images=["a", "a"], y=np.asarray([0, 1]), class_names=["a", "b"],
        patients=np.asarray(["p", "q"]), centres=None, sizes=np.full(2, np.nan), split=None,
    )  # fmt: skip
    starts, stops = row_boxes(table, [0, 1], pv, ClassifyConfig(), (16, 16, 16))
    assert starts.tolist() == [[3, 5, 10]] * 2 and stops.tolist() == [[15, 25, 31]] * 2
