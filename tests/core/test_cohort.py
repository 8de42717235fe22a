"""Prediction over a cohort (issue 26): one model load, a file per case, one table and a summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from tests.helpers import job_result, run_cli


def test_predict_a_cohort_folder_loads_the_model_once_and_writes_one_table(
    shared_data, ft_run, tmp_path, capsys, monkeypatch
):
    from napari_dagman.core.io import read_volume
    from napari_dagman.core.segmentation import jobs, model

    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    (images / "abd01_0000.nii.gz").symlink_to(shared_data / "example_ct_sm.nii.gz")
    (images / "abd02_0000.nii.gz").symlink_to(shared_data / "example_ct_sm.nii.gz")
    (labels / "abd01.nii.gz").symlink_to(shared_data / "example_seg.nii.gz")  # abd02 has no reference
    loads = []
    real = model.load_segmenter

    def counted(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "load_segmenter", counted)
    out = tmp_path / "predictions"
    status, err = run_cli(
        capsys, "predict", images, "--checkpoint", ft_run, "--out", out, "--reference", labels, "--quiet"
    )
    assert status == 0, err
    assert len(loads) == 1  # four small cases took 465 s when the model was loaded per case
    assert "no reference" in err and "abd02" in err
    for case in ("abd01", "abd02"):
        prediction = read_volume(out / f"{case}.nii.gz")
        assert prediction.shape == read_volume(shared_data / "example_ct_sm.nii.gz").shape
    table = pd.read_csv(out / "cohort.csv")
    assert set(table["case"]) == {"abd01", "abd02"}
    assert np.isfinite(table.loc[table["case"] == "abd01", "dice"]).all()
    assert table.loc[table["case"] == "abd02", "dice"].isna().all()  # no reference: volumes only
    summary = json.loads((out / "cohort_summary.json").read_text())
    assert summary["cases"] == 2 and summary["failed"] == {}
    liver = summary["organs"]["liver"]
    assert liver["scored"] == 1 and liver["worst"][0]["case"] == "abd01"
    assert liver["mean_dice"] == round(float(table.loc[(table["case"] == "abd01") & (table["organ"] == "liver"), "dice"].iloc[0]), 4)

    # the results dock reads the folder back: one row per case, the scored case first, each case's files
    from napari_dagman.core.segmentation.cohort import cohort_case_job, read_cohort

    cohort = read_cohort(out)
    assert list(cohort.cases["case"]) == ["abd01", "abd02"] and np.isnan(cohort.cases["mean_dice"].iloc[1])
    scored = table[(table["case"] == "abd01") & table["dice"].notna()]
    assert cohort.cases["mean_dice"].iloc[0] == pytest.approx(scored["dice"].mean())
    assert cohort.cases["worst_organ"].iloc[0] == scored.sort_values("dice")["organ"].iloc[0]
    assert cohort.files["abd02"]["reference"] is None
    case, _ = job_result(cohort_case_job("abd01", cohort.files["abd01"]))
    assert case.image.shape == case.results.prediction.shape == case.results.reference.shape
    assert case.results.disagreement is not None
    again = case.results.table.set_index("organ")["dice"]
    for row in scored.itertuples():  # the table the dock shows is the table predict wrote
        assert again[row.organ] == pytest.approx(row.dice, abs=1e-6)
    unscored, _ = job_result(cohort_case_job("abd02", cohort.files["abd02"]))
    assert unscored.results.reference is None and unscored.results.disagreement is None


def test_a_folder_without_a_cohort_is_refused_in_one_line(tmp_path):
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.segmentation.cohort import read_cohort

    with pytest.raises(DagmanInputError, match="is not a cohort folder: it has no cohort.csv"):
        read_cohort(tmp_path)


def test_a_cohort_needs_an_output_folder(shared_data, ft_run, tmp_path, capsys):
    (tmp_path / "cts").mkdir()
    (tmp_path / "cts" / "a.nii.gz").symlink_to(shared_data / "example_ct_sm.nii.gz")
    status, err = run_cli(capsys, "predict", tmp_path / "cts", "--checkpoint", ft_run, "--out", tmp_path / "x.nii.gz")
    assert status == 2 and "--out must be a folder" in err


def test_finetune_on_a_totalsegmentator_case_folder_trains_its_organs_by_their_mask_names(
    shared_data, tmp_path, capsys
):
    """Issue 26: `finetune` read no dataset layout; a TotalSegmentator case is a CT and one mask per organ."""
    from napari_dagman.core.io import read_volume, write_volume

    case = tmp_path / "s0001"
    (case / "segmentations").mkdir(parents=True)
    (case / "ct.nii.gz").symlink_to(shared_data / "example_ct.nii.gz")
    seg = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    for name, value in (("liver", 5), ("spleen", 1)):
        write_volume(seg.with_array((seg.array == value).astype(np.uint8)), case / "segmentations" / f"{name}.nii.gz")
    status, err = run_cli(
        capsys, "finetune", case, "--out", tmp_path / "run", "--preset", "tiny", "--roi", "64", "--spacing", "6",
        "--steps", "1", "--val-every", "1", "--labels", "liver,spleen", "--quiet",
    )  # fmt: skip
    assert status == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    # TotalSegmentator's ids for its own mask names (liver 5, spleen 1), named by the masks, not guessed
    assert config["classes"] == {"ids": [5, 1], "names": ["liver", "spleen"]}
    assert config["segmentations"] == [str(case / "segmentations")]
