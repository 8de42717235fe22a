"""Organ names are read, never guessed (issue 26): the sidecar, the NIfTI header's label table, labels.json, an
MSD/nnU-Net dataset.json; TotalSegmentator's names only when the user says so."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from napari_dagman.core.io import read_volumes, write_volume
from napari_dagman.core.segmentation.labels import choose_organs
from napari_dagman.core.volume import Volume


def _label_map(path, ids=(1, 2, 3, 4)):
    array = np.zeros((8, 8, 8), np.uint8)
    for k, i in enumerate(ids):
        array[2 * k : 2 * k + 2, 2:6, 2:6] = i
    write_volume(Volume(array, spacing=(2.0, 2.0, 2.0)), path)  # no names given: no sidecar
    return path


@pytest.mark.parametrize(
    "labels",
    [
        {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4},  # nnU-Net v2
        {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left"},  # MSD
    ],
)
def test_a_dataset_json_names_its_organs_never_totalsegmentator(tmp_path, labels):
    root = tmp_path / "Dataset001_Abdomen"
    (root / "labelsTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "Abdomen", "labels": labels}))
    volume = read_volumes(_label_map(root / "labelsTr" / "case_001.nii.gz"))[0]
    assert volume.metadata["label_names"] == {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
    # and that is what a fine-tuning run is trained as (TotalSegmentator would have said spleen, kidney_right...)
    assert choose_organs([volume]).names == ("liver", "spleen", "kidney_right", "kidney_left")
    assert not volume.metadata.get("notes")


def test_unnamed_ids_are_called_by_their_number_and_said_once(tmp_path, monkeypatch):
    volume = read_volumes(_label_map(tmp_path / "seg.nii.gz"))[0]
    assert "label_names" not in volume.metadata
    assert choose_organs([volume]).names == ("label_1", "label_2", "label_3", "label_4")
    (note,) = volume.metadata["notes"]
    assert "no names for label(s) 1, 2, 3, 4" in note and "NAPARI_DAGMAN_TOTALSEGMENTATOR=1" in note
    # the user says it is a TotalSegmentator map: its v2 names
    monkeypatch.setenv("NAPARI_DAGMAN_TOTALSEGMENTATOR", "1")
    volume = read_volumes(tmp_path / "seg.nii.gz")[0]
    assert choose_organs([volume]).names == ("spleen", "kidney_right", "kidney_left", "gallbladder")
    assert not volume.metadata.get("notes")


def test_totalsegmentator_s_header_label_table_names_its_map_without_any_sidecar(shared_data, tmp_path):
    copy = tmp_path / "seg.nii.gz"  # alone: no labels.json beside it
    shutil.copy(shared_data / "example_seg.nii.gz", copy)
    names = read_volumes(copy)[0].metadata["label_names"]
    assert names[1] == "spleen" and names[5] == "liver" and names[117] == "costal_cartilages"
    # a sidecar beside the file wins over the header
    (tmp_path / "seg.labels.json").write_text(json.dumps({"5": "hepar"}))
    assert read_volumes(copy)[0].metadata["label_names"] == {5: "hepar"}
