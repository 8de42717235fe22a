"""Prediction over a cohort (issue 26): one model load, a file per case, one table and a summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from tests.helpers import run_cli


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


def test_a_cohort_needs_an_output_folder(shared_data, ft_run, tmp_path, capsys):
    (tmp_path / "cts").mkdir()
    (tmp_path / "cts" / "a.nii.gz").symlink_to(shared_data / "example_ct_sm.nii.gz")
    status, err = run_cli(capsys, "predict", tmp_path / "cts", "--checkpoint", ft_run, "--out", tmp_path / "x.nii.gz")
    assert status == 2 and "--out must be a folder" in err
