"""Dataset inputs (issue 26): MSD / nnU-Net dataset.json, TotalSegmentator case folders, list files and plain
folders become cases, paired with their label maps; what is left out is said once, what cannot be used is refused
in one line that names the file or row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_dagman.core.datasets import Case, find_cases, read_case_labels
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import read_volume, write_volume
from napari_dagman.core.volume import Volume

SPACING = (2.0, 2.0, 2.0)


def _ct(path, seed=0):
    """A tiny CT: int16 HU values in -1000..1000, many distinct ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(-1000, 1000, (8, 8, 8)).astype(np.int16)
    write_volume(Volume(array, spacing=SPACING), path)
    return path


def _seg(path, ids=(1, 2)):
    """A tiny label map, uint8, one 2-slice block per id (no names written: they must come from elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((8, 8, 8), np.uint8)
    for k, i in enumerate(ids):
        array[2 * k : 2 * k + 2, 2:6, 2:6] = i
    write_volume(Volume(array, spacing=SPACING), path)
    return path


def _mask(path, where, spacing=SPACING):
    """A binary TotalSegmentator-style mask, 1 inside ``where`` (a tuple of slices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((8, 8, 8), np.uint8)
    array[where] = 1
    write_volume(Volume(array, spacing=spacing), path)
    return path


def _ts_case(folder, masks):
    _ct(folder / "ct.nii.gz")
    for name, where in masks.items():
        _mask(folder / "segmentations" / f"{name}.nii.gz", where)
    return folder


def _nnunet(root, channels=("CT",)):
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }))
    for k, case in enumerate(("a", "b")):
        for c in range(len(channels)):
            _ct(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", seed=k)
        _seg(root / "labelsTr" / f"{case}.nii.gz")
    return root


# --- MSD / nnU-Net ----------------------------------------------------------------------------------------
def test_an_nnunet_dataset_pairs_its_cases_named_from_its_dataset_json(tmp_path):
    root = _nnunet(tmp_path / "Dataset001_Abdomen")
    for source in (root, root / "dataset.json"):
        cohort = find_cases([source], labels=True)
        assert cohort.kind == "nnunet" and cohort.notes == []
        assert [c.name for c in cohort.cases] == ["a", "b"]
        assert cohort.cases[0].image == str(root / "imagesTr" / "a_0000.nii.gz")
        assert cohort.cases[1].labels == str(root / "labelsTr" / "b.nii.gz")
        assert cohort.cases[0].label_names == {1: "liver", 2: "spleen"}
    labels = read_case_labels(cohort.cases[0])
    assert labels.metadata["label_names"] == {1: "liver", 2: "spleen"}
    assert sorted(np.unique(labels.array)) == [0, 1, 2]
    images = find_cases(root)  # pretraining: images only
    assert [(c.name, c.labels, c.label_names) for c in images.cases] == [("a", None, None), ("b", None, None)]
    _ct(root / "imagesTs" / "c_0000.nii.gz")
    assert [c.name for c in find_cases([root], split="test").cases] == ["c"]


def test_an_nnunet_dataset_of_several_channels_uses_channel_0_and_says_so(tmp_path):
    root = _nnunet(tmp_path / "Dataset002_Two", channels=("CT", "PET"))
    cohort = find_cases([root], labels=True)
    assert [c.image.rsplit("/", 1)[1] for c in cohort.cases] == ["a_0000.nii.gz", "b_0000.nii.gz"]
    (note,) = cohort.notes
    assert "channel 0 (CT)" in note and "dataset.json" in note


def test_an_nnunet_label_map_that_is_not_there_is_refused_by_name(tmp_path):
    root = _nnunet(tmp_path / "Dataset003")
    (root / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DagmanInputError, match=r"labelsTr/b\.nii\.gz.*dataset\.json.*does not exist"):
        find_cases([root], labels=True)
    assert len(find_cases([root]).cases) == 2  # images only: no label map needed


def test_an_msd_dataset_lists_its_cases(tmp_path):
    root = tmp_path / "Task03_Liver"
    _ct(root / "imagesTr" / "liver_1.nii.gz")
    _seg(root / "labelsTr" / "liver_1.nii.gz", ids=(1,))
    _ct(root / "imagesTs" / "liver_9.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"}],
        "test": ["./imagesTs/liver_9.nii.gz"],
    }))
    cohort = find_cases([root / "dataset.json"], labels=True)
    assert cohort.kind == "msd"
    (case,) = cohort.cases
    assert case == Case("liver_1", str(root / "imagesTr/liver_1.nii.gz"), str(root / "labelsTr/liver_1.nii.gz"),
                        {1: "liver"})
    assert [c.name for c in find_cases([root], split="test").cases] == ["liver_9"]
    with pytest.raises(DagmanInputError, match=r"test item 1 \(liver_9.nii.gz\) has no label map"):
        find_cases([root], labels=True, split="test")
    (root / "imagesTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(DagmanInputError, match=r"imagesTr/liver_1\.nii\.gz .*Task03_Liver/dataset\.json\) does"):
        find_cases([root])


def test_a_case_s_dataset_names_replace_the_file_s_and_the_unnamed_note_is_said_again(tmp_path):
    path = _seg(tmp_path / "a" / "b" / "c" / "seg.nii.gz", ids=(1, 2, 3))  # no names of its own, no dataset.json
    case = Case("c", str(tmp_path / "ct.nii.gz"), str(path), {1: "liver", 2: "spleen"})
    labels = read_case_labels(case)
    assert labels.metadata["label_names"] == {1: "liver", 2: "spleen"}
    (note,) = labels.metadata["notes"]
    assert "no names for label(s) 3 " in note  # not 1, 2, 3: those two are named now
    assert hash(case) == hash(Case("c", case.image, case.labels))  # a case is hashable, its table aside


# --- TotalSegmentator -------------------------------------------------------------------------------------
def test_a_totalsegmentator_case_merges_its_masks_with_their_ids_and_names(tmp_path):
    case_dir = _ts_case(tmp_path / "s0001", {
        "liver": np.s_[0:4, 0:4, 0:4],
        "spleen": np.s_[5:7, 5:7, 5:7],
        "tumour": np.s_[3:5, 0:2, 0:2],  # 1x2x2 = 4 voxels inside the liver
        "aorta": np.s_[0:0],  # empty: skipped
    })
    cohort = find_cases([case_dir], labels=True)
    assert cohort.kind == "totalsegmentator"
    (case,) = cohort.cases
    assert (case.name, case.image) == ("s0001", str(case_dir / "ct.nii.gz"))
    assert case.labels == str(case_dir / "segmentations")
    assert case.label_names == {1: "spleen", 5: "liver", 52: "aorta", 118: "tumour"}  # TotalSegmentator v2 ids
    labels = read_case_labels(case)
    array = labels.array
    assert labels.metadata["label_names"][5] == "liver" and labels.metadata["label_names"][118] == "tumour"
    assert np.count_nonzero(array == 5) == 64 - 4 and np.count_nonzero(array == 1) == 8
    assert np.count_nonzero(array == 118) == 8 and np.all(array[3, 0:2, 0:2] == 118)  # the later id wins
    assert np.count_nonzero(array == 52) == 0
    notes = labels.metadata["notes"]
    assert any("4 voxels lie in more than one mask" in n for n in notes)
    assert any("skipped 1 empty masks: aorta.nii.gz" in n for n in notes)
    # given the CT as read, the same map, on its grid
    again = read_case_labels(case, image=read_volume(case.image))
    assert np.array_equal(again.array, array) and again.same_grid(read_volume(case.image))


def test_a_mask_on_another_grid_is_refused_by_name(tmp_path):
    case_dir = _ts_case(tmp_path / "s0001", {"liver": np.s_[0:4]})
    _mask(case_dir / "segmentations" / "spleen.nii.gz", np.s_[5:7], spacing=(3.0, 3.0, 3.0))
    (case,) = find_cases([case_dir], labels=True).cases
    with pytest.raises(DagmanInputError, match=r"mask .*spleen\.nii\.gz is not on the grid of the CT"):
        read_case_labels(case)


def test_a_folder_of_totalsegmentator_cases_gives_one_case_each_with_one_id_per_organ(tmp_path):
    _ts_case(tmp_path / "ts" / "s0001", {"liver": np.s_[0:2], "aa_extra": np.s_[4:6]})
    _ts_case(tmp_path / "ts" / "s0002", {"liver": np.s_[0:2], "zz_extra": np.s_[4:6]})
    cohort = find_cases([tmp_path / "ts"], labels=True)
    assert cohort.kind == "totalsegmentator"
    assert [c.name for c in cohort.cases] == ["s0001", "s0002"]
    assert cohort.cases[0].label_names == {5: "liver", 118: "aa_extra"}
    assert cohort.cases[1].label_names == {5: "liver", 119: "zz_extra"}  # not 118: that is aa_extra's
    assert sorted(np.unique(read_case_labels(cohort.cases[1]).array)) == [0, 5, 119]
    images = find_cases([tmp_path / "ts"])
    assert [(c.image.rsplit("/", 2)[1:], c.labels) for c in images.cases] == [
        (["s0001", "ct.nii.gz"], None), (["s0002", "ct.nii.gz"], None)
    ]


# --- list files -------------------------------------------------------------------------------------------
def test_a_csv_list_gives_its_rows_and_refuses_a_bad_row_by_number(tmp_path):
    _ct(tmp_path / "data" / "a.nii.gz")
    _seg(tmp_path / "data" / "a_seg.nii.gz")
    _ct(tmp_path / "data" / "b.nii.gz", seed=1)
    _seg(tmp_path / "data" / "b_seg.nii.gz")
    good = tmp_path / "lists" / "cases.csv"
    good.parent.mkdir()
    good.write_text(
        "name,image,label\npatient1,../data/a.nii.gz,../data/a_seg.nii.gz\n,../data/b.nii.gz,../data/b_seg.nii.gz\n"
    )
    cohort = find_cases([good], labels=True)
    assert cohort.kind == "list"
    assert [c.name for c in cohort.cases] == ["patient1", "b"]
    assert read_volume(cohort.cases[1].labels).shape == (8, 8, 8)  # relative to the list file
    bad = tmp_path / "lists" / "bad.csv"
    bad.write_text(  # ';' as Excel writes where ',' is the decimal mark
        "image;labels\n../data/a.nii.gz;../data/a_seg.nii.gz\n../data/missing.nii.gz;../data/b_seg.nii.gz\n"
    )
    with pytest.raises(DagmanInputError, match=r"bad\.csv, row 3: image .*missing\.nii\.gz does not exist"):
        find_cases([bad], labels=True)
    unsafe = tmp_path / "lists" / "unsafe.json"
    unsafe.write_text(json.dumps([{"image": "../data/a.nii.gz", "name": "../escape"}]))
    with pytest.raises(DagmanInputError, match=r"'\.\./escape' .* is not a plain file name"):
        find_cases([unsafe])


# --- plain folders ----------------------------------------------------------------------------------------
def test_a_plain_folder_is_searched_recursively_and_pairs_by_name(tmp_path):
    root = tmp_path / "scans"
    _ct(root / "one" / "case.nii.gz")
    _seg(root / "one" / "case_seg.nii.gz")
    _ct(root / "two" / "deeper" / "deep.nii.gz", seed=1)
    _ct(root / ".hidden" / "secret.nii.gz", seed=2)
    (root / "series").mkdir()
    (root / "series" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # a DICOM series folder...
    _ct(root / "series" / "inner" / "not_searched.nii.gz")  # ...is not searched further
    (root / "notes.txt").write_text("not a volume")
    cohort = find_cases([root])
    assert cohort.kind == "folder"
    assert [c.name for c in cohort.cases] == ["case", "series", "deep"]  # in path order
    assert cohort.notes == ["left out 1 label maps: one/case_seg.nii.gz"]
    _seg(root / "series_label.nii.gz")  # a label map beside a series folder is named after the folder
    with pytest.raises(DagmanInputError, match=r"deeper/deep\.nii\.gz has no label map: looked for"):
        find_cases([root], labels=True)
    _seg(root / "two" / "deeper" / "deep_mask.nii.gz")
    pairs = find_cases([root], labels=True)
    assert {c.name: c.labels.rsplit("/", 1)[1] for c in pairs.cases} == {
        "case": "case_seg.nii.gz", "deep": "deep_mask.nii.gz", "series": "series_label.nii.gz"
    }


def test_images_and_labels_folders_pair_by_case_name_and_an_image_alone_is_refused(tmp_path):
    root = tmp_path / "set"
    _ct(root / "imagesTr" / "a_0000.nii.gz")
    _ct(root / "imagesTr" / "b_0000.nii.gz", seed=1)
    _seg(root / "labelsTr" / "a.nii.gz")
    assert [c.name for c in find_cases([root]).cases] == ["a", "b"]
    assert find_cases([root]).notes == ["left out 1 label maps: labelsTr/a.nii.gz"]
    with pytest.raises(DagmanInputError, match=r"imagesTr/b_0000\.nii\.gz has no label map"):
        find_cases([root], labels=True)
    _seg(root / "labelsTr" / "b.nii.gz")
    for source in (root, root / "imagesTr"):  # the image folder alone: its label folder is beside it
        assert [c.labels.rsplit("/", 2)[1:] for c in find_cases([source], labels=True).cases] == [
            ["labelsTr", "a.nii.gz"], ["labelsTr", "b.nii.gz"]
        ]


def test_two_cases_of_one_name_are_refused_naming_both(tmp_path):
    first, second = _ct(tmp_path / "x" / "ct.nii.gz"), _ct(tmp_path / "y" / "ct.nii.gz", seed=1)
    with pytest.raises(DagmanInputError, match=r"two cases are named 'ct': .*x/ct\.nii\.gz and .*y/ct\.nii\.gz"):
        find_cases([first, second])
    # found in one folder (TotalSegmentator's and many hospitals' layout): named by their path below it
    assert sorted(c.name for c in find_cases([tmp_path]).cases) == ["x_ct", "y_ct"]
    assert [c.name for c in find_cases([first]).cases] == ["ct"]


def test_a_missing_path_an_empty_folder_and_a_lone_label_map_are_refused(tmp_path):
    with pytest.raises(DagmanInputError, match=r"nowhere\.nii\.gz does not exist"):
        find_cases([tmp_path / "nowhere.nii.gz"])
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    _ct(tmp_path / "empty" / ".hidden" / "x.nii.gz")
    with pytest.raises(DagmanInputError, match=r"empty holds no cases: looked for CT volumes"):
        find_cases([tmp_path / "empty"])
    _ct(tmp_path / "one" / "scan.nii.gz")
    _seg(tmp_path / "one" / "scan_seg.nii.gz")
    cohort = find_cases([tmp_path / "one" / "scan.nii.gz"], labels=True)  # one file: its label map beside it
    assert cohort.kind == "files" and cohort.cases[0].labels.endswith("scan_seg.nii.gz")
    with pytest.raises(DagmanInputError, match=r"no cases found .*scan_seg\.nii\.gz taken as the label map"):
        find_cases([tmp_path / "one" / "scan_seg.nii.gz"], labels=True)


# --- real data --------------------------------------------------------------------------------------------
def test_the_real_ct_and_its_totalsegmentator_map_pair_with_header_names(tmp_path, shared_data):
    root = tmp_path / "abdomen"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "abd_0000.nii.gz").symlink_to(shared_data / "example_ct_sm.nii.gz")
    (root / "labelsTr" / "abd.nii.gz").symlink_to(shared_data / "example_seg.nii.gz")
    cohort = find_cases([root], labels=True)
    (case,) = cohort.cases
    assert case.name == "abd" and case.label_names is None  # no dataset: the label file's own names
    labels = read_case_labels(case)
    assert labels.shape == (30, 101, 122)
    assert labels.metadata["label_names"][5] == "liver"  # from the NIfTI header's label table
    assert 5 in np.unique(labels.array)
