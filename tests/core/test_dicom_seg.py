"""DICOM SEG: ``predict --out seg.dcm`` over the real DICOM series, read back with highdicom and pydicom."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk

from napari_dagman.cli import main
from napari_dagman.core.io import list_dicom_series
from napari_dagman.core.segmentation.dicom_seg import INSTALL_HINT, segment_coding

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

SCT_LIVER, SCT_KIDNEY, SCT_LEFT, SCT_RIGHT = "10200004", "64033007", "7771000", "24028007"


@pytest.fixture(scope="module")
def predictions(ft_run, shared_data, tmp_path_factory):
    """The same prediction of the DICOM series as NIfTI and as DICOM SEG, both through the CLI."""
    out = tmp_path_factory.mktemp("dicom_seg")
    series = shared_data / "example_ct_dicom"
    for name in ("seg.nii.gz", "seg.dcm"):
        argv = ["predict", str(series), "--checkpoint", str(ft_run), "--out", str(out / name), "--quiet"]
        assert main(argv) == 0
    return series, out / "seg.nii.gz", out / "seg.dcm"


def test_the_seg_references_the_series_and_holds_the_niftis_voxels(predictions):
    series, nifti_path, seg_path = predictions
    files = list(list_dicom_series(series)[0].files)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    # the shared series is de-identified: its instance UIDs live only in the files' meta headers
    instance_uids = [ds.file_meta.MediaStorageSOPInstanceUID for ds in sources]

    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    referenced = seg.get_source_image_uids()
    assert sorted(uid for _, _, uid in referenced) == sorted(instance_uids)
    assert len({series_uid for _, series_uid, _ in referenced}) == 1
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID

    # NIfTI prediction, read independently: SimpleITK finds each source slice in it by its position
    nifti = sitk.ReadImage(str(nifti_path))
    labels = sitk.GetArrayFromImage(nifti)
    assert np.allclose(nifti.GetDirection(), np.eye(3).ravel())  # the axial LPS series, rows = y, columns = x
    slices = [
        nifti.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient]) for ds in sources
    ]
    assert all(i == 0 and j == 0 for i, j, _ in slices)
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    assert list(names.values()) == [
        "spleen",
        "kidney_right",
        "kidney_left",
        "liver",
        "colon",
    ]  # organ id order
    ids = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "colon": 20}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=instance_uids, segment_numbers=list(names)
    )
    assert pixels.shape == (len(sources), 512, 512, len(names))
    present = 0
    for n, (_, _, k) in enumerate(slices):
        for s, name in enumerate(names.values()):
            expected = labels[k] == ids[name]
            np.testing.assert_array_equal(
                pixels[n, :, :, s].astype(bool), expected, err_msg=f"{name}, slice {n}"
            )
            present += int(expected.sum())
    assert present > 0  # the model labelled something: the comparison is not of empty maps


def test_segments_carry_snomed_codes_laterality_and_the_algorithm(predictions):
    seg = hd.seg.segread(predictions[2])
    by_label = {str(d.SegmentLabel): d for d in seg.SegmentSequence}
    liver = by_label["liver"]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == SCT_LIVER
    assert liver.SegmentAlgorithmType == "AUTOMATIC"
    assert liver.SegmentAlgorithmName.startswith("napari-dagman")
    kidney = by_label["kidney_left"].SegmentedPropertyTypeCodeSequence[0]
    assert (
        kidney.CodeValue == SCT_KIDNEY
        and kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == SCT_LEFT
    )


def test_organ_names_map_to_snomed_ct_or_a_generic_tissue_code():
    assert segment_coding("liver").type.value == SCT_LIVER and segment_coding("liver").modifier is None
    right = segment_coding("kidney_right")
    assert right.type.value == SCT_KIDNEY and right.modifier.value == SCT_RIGHT
    artery = segment_coding("subclavian_artery_right")  # a concept that names the side itself
    assert artery.type.meaning == "Right Subclavian Artery" and artery.modifier is None
    assert segment_coding("vertebrae_L1").type.meaning == "L1 vertebra"
    assert (
        segment_coding("rib_left_7").type.meaning == "Rib"
        and segment_coding("rib_left_7").modifier.value == SCT_LEFT
    )
    generic = segment_coding("gluteus_maximus_left")
    assert generic.generic and generic.type.meaning == "Tissue"


def test_a_seg_needs_a_dicom_series_and_highdicom_one_line_each(
    ft_run, shared_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "seg.dcm"
    nifti = str(shared_data / "example_ct_sm.nii.gz")
    assert main(["predict", nifti, "--checkpoint", str(ft_run), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DICOM series" in err and not out.exists()

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a)
    )
    series = str(shared_data / "example_ct_dicom")
    assert main(["predict", series, "--checkpoint", str(ft_run), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(INSTALL_HINT) and len(err.splitlines()) == 1


def test_a_seg_written_by_predict_reads_back_through_the_plugin_on_the_source_grid(predictions):
    """Issue 26: the plugin's reader opened its own SEG as an image of frames (values 0/255) without a word."""
    from napari_dagman.core.io import is_label_map, read_volume, read_volumes

    series, nifti_path, seg_path = predictions
    (seg,) = read_volumes(seg_path)
    nifti = read_volume(nifti_path)
    ct = read_volume(series)
    assert is_label_map(seg) and seg.shape == ct.shape == nifti.shape
    np.testing.assert_allclose(seg.spacing, ct.spacing, atol=1e-4)
    np.testing.assert_allclose(seg.origin, ct.origin, atol=1e-3)
    names = seg.metadata["label_names"]  # segment numbers in organ-id order, named by their labels
    assert list(names.values()) == ["spleen", "kidney_right", "kidney_left", "liver", "colon"]
    ids = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "colon": 20}
    expected = np.zeros_like(nifti.array)
    for number, name in names.items():
        expected[seg.array == number] = ids[name]
    np.testing.assert_array_equal(expected, nifti.array)  # voxel for voxel
    assert int((seg.array > 0).sum()) > 0


# --- coding tables ----------------------------------------------------------------------------------------------
TYPE, CATEGORY, MODIFIER = (
    "SegmentedPropertyTypeCodeSequence",
    "SegmentedPropertyCategoryCodeSequence",
    "SegmentedPropertyTypeModifierCodeSequence",
)


def write_table(path, rows):
    """A coding table in the shared column names (see `segment_codes`), of codes made up for the test."""
    columns = ["Structure"] + [f"{p}.{f}" for p in (CATEGORY, TYPE, MODIFIER) for f in FIELDS]
    lines = [",".join(columns)]
    for name, category, kind, modifier in rows:
        lines.append(",".join([name, *category, *kind, *modifier]))
    path.write_text("\n".join(lines) + "\n")
    return path


FIELDS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
GLUTEUS = ("99990001", "SCT", "Test gluteus maximus")
ANATOMY = ("123037004", "SCT", "Anatomical Structure")
LEFT = (SCT_LEFT, "SCT", "Left")


@pytest.fixture
def coding_table_env(tmp_path, monkeypatch):
    from napari_dagman.core.segmentation.segment_codes import SEGMENT_CODES_ENV

    path = write_table(tmp_path / "codes.csv", [("gluteus_maximus_left", ANATOMY, GLUTEUS, LEFT)])
    monkeypatch.setenv(SEGMENT_CODES_ENV, str(path))
    return path


def test_a_coding_table_codes_what_name_matching_left_generic(coding_table_env):
    """Issue 26: 11 of 117 TotalSegmentator classes became 'Tissue' by name matching; a table gives their codes."""
    from napari_dagman.core.segmentation.dicom_seg import coding_notes, segment_descriptions

    names = {1: "liver", 2: "gluteus_maximus_left", 3: "gluteus_medius_right"}
    by_label = {str(d.SegmentLabel): d for d in segment_descriptions([1, 2, 3], names, "a run")}
    gluteus = by_label["gluteus_maximus_left"].SegmentedPropertyTypeCodeSequence[0]
    assert (gluteus.CodeValue, gluteus.CodeMeaning) == (GLUTEUS[0], GLUTEUS[2])
    assert gluteus.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == SCT_LEFT
    # a name the table does not hold is matched as before
    assert by_label["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == SCT_LIVER
    notes = coding_notes(names)
    assert "codes.csv" in notes[0]
    assert notes[1].startswith("1 of 3 segments") and "gluteus_medius_right" in notes[1]


def test_without_a_table_the_generic_segments_are_said(monkeypatch):
    from napari_dagman.core.segmentation import segment_codes
    from napari_dagman.core.segmentation.dicom_seg import coding_notes

    monkeypatch.delenv(segment_codes.SEGMENT_CODES_ENV, raising=False)
    monkeypatch.setattr(segment_codes, "totalsegmentator_table", lambda: None)
    (note,) = coding_notes(["liver", "gluteus_maximus_left"])
    assert note.startswith("1 of 2 segments") and "'Tissue'" in note and "gluteus_maximus_left" in note


def test_an_installed_totalsegmentators_table_is_found_without_importing_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from napari_dagman.core.segmentation import segment_codes

    package = tmp_path / "totalsegmentator"
    (package / "resources").mkdir(parents=True)
    write_table(package / "resources" / "totalsegmentator_snomed_mapping.csv", [("rib_left_7", ANATOMY, GLUTEUS, LEFT)])
    monkeypatch.delenv(segment_codes.SEGMENT_CODES_ENV, raising=False)
    spec = SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr(segment_codes.importlib.util, "find_spec", lambda name: spec if name == "totalsegmentator" else None)
    path, source = segment_codes.coding_table_source()
    assert path == package / "resources" / "totalsegmentator_snomed_mapping.csv" and "TotalSegmentator" in source
    assert segment_codes.coding_table()["rib_left_7"]["type"] == GLUTEUS


def test_a_broken_coding_table_is_refused_in_one_line_before_the_inference(tmp_path, monkeypatch, shared_data):
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.io import read_volumes
    from napari_dagman.core.segmentation.dicom_seg import check_dicom_source
    from napari_dagman.core.segmentation.segment_codes import SEGMENT_CODES_ENV

    broken = tmp_path / "codes.csv"
    broken.write_text("Structure,Meaning\nliver,the liver\n")
    monkeypatch.setenv(SEGMENT_CODES_ENV, str(broken))
    (image,) = read_volumes(shared_data / "example_ct_dicom")
    with pytest.raises(DagmanInputError, match="is not a coding table: it lacks the column"):
        check_dicom_source(image)
    monkeypatch.setenv(SEGMENT_CODES_ENV, str(tmp_path / "missing.csv"))
    with pytest.raises(DagmanInputError, match="which is not a file"):
        check_dicom_source(image)
