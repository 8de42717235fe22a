"""Reading and writing CT and label maps: real data geometry, HU, overlays, round trips, bad files."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from tests.helpers import write_dicom_series

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import (
    is_label_map,
    read_label_names,
    read_volume,
    read_volumes,
    resample_like,
    resample_to_spacing,
    write_volume,
)
from napari_dagman.core.volume import Volume, require_same_grid


def test_example_ct_geometry_and_hu(shared_data):
    ct = read_volume(shared_data / "example_ct.nii.gz")
    assert ct.shape == (112, 101, 122)  # z, y, x
    assert ct.spacing == (3.0, 3.0, 3.0)
    assert ct.array.dtype == np.int32
    assert ct.array.min() == -1207 and ct.array.max() == 3382
    assert np.percentile(ct.array, 50) == pytest.approx(-101, abs=2)
    # stored RAS-flipped (direction diag(-1,-1,1)); read into LPS: identity direction, new corner origin
    assert ct.metadata["source_orientation"] != "LPS"
    assert np.allclose(ct.direction, np.eye(3))
    assert np.allclose(ct.origin, (94.3017578, -311.319, -185.0436707), atol=1e-3)
    # the physical position of every voxel is unchanged by the reorientation
    raw = sitk.ReadImage(str(shared_data / "example_ct.nii.gz"))
    p_raw = raw.TransformIndexToPhysicalPoint((0, 0, 0))  # x, y, z
    idx = ct.physical_to_index(np.array(p_raw[::-1]))
    assert np.allclose(idx, (0, 100, 121))
    assert ct.array[0, 100, 121] == sitk.GetArrayViewFromImage(raw)[0, 0, 0]


def test_small_ct_and_its_segmentation_overlay_exactly(shared_data):
    ct = read_volume(shared_data / "example_ct.nii.gz")
    ct_sm = read_volume(shared_data / "example_ct_sm.nii.gz")
    seg = read_volume(shared_data / "example_seg.nii.gz")
    assert ct_sm.same_grid(seg)
    assert ct_sm.array.dtype == np.int16
    # example_ct_sm is slices 82..111 of example_ct voxel for voxel (its header keeps example_ct's origin)
    np.testing.assert_array_equal(ct_sm.array, ct.array[82:112])
    assert is_label_map(seg) and not is_label_map(ct_sm)
    known = {int(k) for k in json.loads((shared_data / "labels.json").read_text())}
    assert set(np.unique(seg.array).tolist()) <= known
    # anatomy check of the overlay: liver (5) is soft tissue, lungs (10, 11, 14) are air-filled
    assert 30 < np.median(ct_sm.array[seg.array == 5]) < 70
    assert np.median(ct_sm.array[np.isin(seg.array, (10, 11, 14))]) < -600
    with pytest.raises(DagmanInputError, match="not on the image grid"):
        require_same_grid(ct, seg)


def test_dicom_series_and_its_las_label_map_align_in_physical_space(shared_data):
    (series,) = read_volumes(shared_data / "example_ct_dicom")
    assert series.shape == (20, 512, 512)
    assert series.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert series.array.min() == -1024  # rescale intercept applied: Hounsfield units
    assert series.metadata["modality"] == "CT"
    assert series.metadata["series_description"] == "CT Body 3.0"
    seg = read_volume(shared_data / "example_seg_dicom.nii.gz")
    assert seg.metadata["source_orientation"] != series.metadata["source_orientation"]  # LAS vs LPS on disk
    # both read into LPS, so the grids coincide and the label map overlays without resampling
    assert seg.same_grid(series)
    np.testing.assert_array_equal(resample_like(seg, series, is_label=True).array, seg.array)
    liver = series.array[seg.array == 5]
    assert 80 < np.median(liver) < 110  # contrast-enhanced liver
    assert np.mean((liver > 0) & (liver < 200)) > 0.99  # nearly every liver voxel is soft tissue
    flipped = series.array[seg.array[:, ::-1, :] == 5]  # what an overlay ignoring LAS vs LPS would show
    assert np.mean((flipped > 0) & (flipped < 200)) < 0.8 and np.mean(flipped < -200) > 0.1


def test_single_dicom_file_reads_as_one_slice(shared_data):
    first = sorted((shared_data / "example_ct_dicom").iterdir())[0]
    vol = read_volume(first)
    assert vol.shape == (1, 512, 512)
    assert vol.metadata["modality"] == "CT"


def test_folder_with_two_series_gives_two_volumes(tmp_path):
    rng = np.random.default_rng(0)
    write_dicom_series(
        tmp_path,
        rng.normal(0, 40, (4, 16, 16)),
        uid="1.2.826.0.1.3680043.2.1125.1",
        description="arterial",
        prefix="a",
    )
    write_dicom_series(
        tmp_path,
        rng.normal(0, 40, (5, 16, 16)),
        uid="1.2.826.0.1.3680043.2.1125.2",
        description="venous",
        prefix="v",
    )
    volumes = read_volumes(tmp_path)
    assert sorted((v.metadata["name"], v.shape[0]) for v in volumes) == [("arterial", 4), ("venous", 5)]
    with pytest.raises(DagmanInputError, match="2 DICOM series"):
        read_volume(tmp_path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_label_map_round_trip_keeps_source_geometry_and_names(shared_data, tmp_path, suffix):
    src = shared_data / "example_seg.nii.gz"
    seg = read_volume(src)
    names = {5: "liver", 1: "spleen", 20: "colon"}
    out = tmp_path / f"seg{suffix}"
    written = write_volume(seg, out, label_names=names)
    assert str(out) in written and (tmp_path / "seg.labels.json").is_file()
    raw_in, raw_out = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    # the file on disk has the geometry of the source (RAS-flipped), not the in-memory LPS one
    assert raw_out.GetSize() == raw_in.GetSize()
    assert np.allclose(raw_out.GetSpacing(), raw_in.GetSpacing())
    assert np.allclose(raw_out.GetOrigin(), raw_in.GetOrigin(), atol=1e-4)
    assert np.allclose(raw_out.GetDirection(), raw_in.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(raw_out), sitk.GetArrayFromImage(raw_in))
    again = read_volume(out)
    assert again.same_grid(seg)
    np.testing.assert_array_equal(again.array, seg.array)
    assert read_label_names(out) == names
    assert again.metadata["label_names"] == names


def test_write_is_atomic_and_refuses_unknown_suffix(tmp_path):
    vol = Volume(np.zeros((2, 3, 4), np.int16))
    with pytest.raises(DagmanInputError, match="use one of"):
        write_volume(vol, tmp_path / "x.png")
    write_volume(vol, tmp_path / "x.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]  # no temporary left behind


def test_resample_to_spacing_keeps_extent(shared_data):
    ct = read_volume(shared_data / "example_ct_sm.nii.gz")
    fine = resample_to_spacing(ct, (1.5, 1.5, 1.5), is_label=False)
    assert fine.shape == (60, 202, 244)
    lo, hi = ct.physical_extent()
    lo2, hi2 = fine.physical_extent()
    assert np.allclose(lo, lo2, atol=1e-3) and np.allclose(hi, hi2, atol=1e-3)


# --- bad input ------------------------------------------------------------------------------------------------
def test_text_file_renamed_nifti(tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("this is not an image")
    with pytest.raises(DagmanInputError, match="cannot read notes.nii.gz"):
        read_volume(bad)


def test_truncated_nifti(shared_data, tmp_path):
    data = (shared_data / "example_ct_sm.nii.gz").read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(DagmanInputError, match="cut.nii.gz is truncated"):
        read_volume(bad)


def test_empty_and_non_dicom_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DagmanInputError, match="no DICOM series"):
        read_volumes(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    (junk / "b.bin").write_bytes(b"\x00" * 300)
    with pytest.raises(DagmanInputError, match="no DICOM series"):
        read_volumes(junk)


def test_2d_rgb_and_4d_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.int16)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DagmanInputError, match="expected a 3D volume"):
        read_volume(tmp_path / "flat.nii.gz")
    rgb = sitk.GetImageFromArray(np.zeros((4, 8, 9, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(DagmanInputError, match="RGB or vector"):
        read_volume(tmp_path / "rgb.nii.gz")
    frame = sitk.GetImageFromArray(np.zeros((4, 8, 9), np.int16))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(tmp_path / "t.nii.gz"))
    with pytest.raises(DagmanInputError, match="expected a 3D volume"):
        read_volume(tmp_path / "t.nii.gz")


def test_gzip_of_garbage_and_missing_path(tmp_path):
    bad = tmp_path / "zeros.nii.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00" * 1000)
    with pytest.raises(DagmanInputError):
        read_volume(bad)
    with pytest.raises(DagmanInputError, match="does not exist"):
        read_volume(tmp_path / "nothing.nii.gz")


def test_copied_dicom_folder_with_a_stray_file_still_reads(shared_data, tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(shared_data / "example_ct_dicom", folder)
    (folder / "README.txt").write_text("exported from PACS")
    (vol,) = read_volumes(folder)
    assert vol.shape == (20, 512, 512)
