"""Bad volumes built from the real CT: never wrong data without a word, one line and exit status 2 instead.

Each case of issue 14 that concerns what a file holds (resampling, NaN, DICOM slices, sheared grids, voxel sizes,
truncations, constant and all-air images), and the cases of the same kind found beside them.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tests.helpers import write_dicom_series

from napari_dagman.cli import main
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import (
    list_dicom_series,
    read_volume,
    resample_like,
    resample_to_spacing,
    write_volume,
)
from napari_dagman.core.volume import Volume

#: What says how to read a DICOM series with uneven slices (core.io.UNEVEN_SLICES_ENV).
UNEVEN_SLICES_ENV = "NAPARI_DAGMAN_UNEVEN_SLICES"
#: A tiny pretraining run that would start at once if its input were accepted.
TINY = ["--preset", "tiny", "--roi", "32", "--spacing", "4", "--steps", "1", "--batch-size", "1", "--quiet"]


@pytest.fixture(scope="module")
def small_ct(shared_data) -> sitk.Image:
    """example_ct_sm.nii.gz as SimpleITK reads it (122 x 101 x 30, 3 mm, int16 HU)."""
    return sitk.ReadImage(str(shared_data / "example_ct_sm.nii.gz"))


def write_like(image: sitk.Image, array: np.ndarray, path: Path) -> Path:
    """``array`` (z, y, x) with ``image``'s geometry, written to ``path``."""
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))
    return path


def patch_nifti(source: Path, target: Path, edits: dict[int, tuple[str, tuple]]) -> Path:
    """A copy of an uncompressed NIfTI-1 file with header bytes replaced: offset -> (struct format, values)."""
    raw = bytearray(source.read_bytes())
    for offset, (fmt, values) in edits.items():
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    target.write_bytes(bytes(raw))
    return target


def pretrain(image: Path, out: Path, capsys, *flags: str) -> tuple[int, str]:
    """Run ``napari-dagman pretrain`` on one image; returns the exit status and stderr."""
    status = main(["pretrain", str(image), "--out", str(out), *TINY, *flags])
    return status, capsys.readouterr().err.strip()


def one_line(err: str) -> str:
    """The error line of a refused command: exactly one line, no traceback."""
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# --- 1: resampling pads with the image, not with water ------------------------------------------------------------
def test_a_resampled_ct_has_no_water_slab_at_its_border(shared_data):
    """3 mm -> 2 mm used to fill the last y-row of example_ct with 0 HU (water), a slab that is not in the scan."""
    ct = read_volume(shared_data / "example_ct.nii.gz")
    fine = resample_to_spacing(ct, (2.0, 2.0, 2.0), is_label=False)
    for axis in range(3):
        for end in (0, -1):
            border = np.take(fine.array, end, axis=axis)
            original = np.take(ct.array, end, axis=axis)
            assert not np.all(border == 0), (axis, end)
            assert abs(float(border.mean()) - float(original.mean())) < 25, (axis, end)
    assert fine.array.min() >= ct.array.min()

    seg = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    fine_seg = resample_to_spacing(seg, (2.0, 2.0, 2.0), is_label=True)
    for end in (0, -1):  # the border rows hold the labels of the border rows, not background
        assert set(np.unique(fine_seg.array[:, end])) == set(np.unique(seg.array[:, end]))


def test_resampling_onto_a_larger_grid_pads_with_air_and_background(shared_data):
    ct = read_volume(shared_data / "example_ct_sm.nii.gz")
    seg = read_volume(shared_data / "example_seg.nii.gz")
    big = Volume(
        np.zeros((40, 111, 132), np.int16),
        ct.spacing,
        tuple(np.asarray(ct.origin) - 5 * np.asarray(ct.spacing)),
        ct.direction,
    )
    image = resample_like(ct, big, is_label=False)
    labels = resample_like(seg, big, is_label=True)
    outside = np.ones(big.shape, bool)
    outside[5:35, 5:106, 5:127] = False
    assert np.all(image.array[outside] == ct.array.min())  # air (-1024 HU) or below, never 0 HU
    assert np.all(labels.array[outside] == 0)
    np.testing.assert_array_equal(image.array[5:35, 5:106, 5:127], ct.array)


def test_an_all_air_ct_is_refused(shared_data, small_ct, tmp_path, capsys):
    """The README promises exit 2; the water slab of resampling made it train."""
    # the real CT with everything denser than lung turned into air: nothing above -175 HU
    array = sitk.GetArrayFromImage(small_ct)
    air = write_like(small_ct, np.where(array > -400, -1000, array).astype(np.int16), tmp_path / "air.nii.gz")
    status, err = pretrain(air, tmp_path / "run", capsys, "--spacing", "2")  # 3 -> 2 mm made the slab
    assert status == 2 and "no voxel above -175 HU" in one_line(err)
    assert not (tmp_path / "run").exists()


# --- 2: NaN and infinity in a NIfTI ------------------------------------------------------------------------------
def test_nan_and_infinity_in_a_nifti_are_seen_and_refused(small_ct, tmp_path, capsys):
    array = sitk.GetArrayFromImage(small_ct).astype(np.float32)
    array[10, 50, 60], array[11, 50, 60] = np.nan, -np.inf
    path = write_like(small_ct, array, tmp_path / "nan.nii.gz")
    volume = read_volume(path)
    assert np.isnan(volume.array).sum() == 1 and np.isneginf(volume.array).sum() == 1
    status, err = pretrain(path, tmp_path / "run", capsys)
    assert status == 2 and "2 NaN or infinite voxels" in one_line(err)
    assert not (tmp_path / "run").exists()


# --- 3: DICOM series with a missing, unreadable or repeated slice -------------------------------------------------
@pytest.fixture
def dicom_copy(shared_data, tmp_path) -> tuple[Path, list[str]]:
    """A writable copy of the real DICOM series and its files in slice order."""
    folder = tmp_path / "dicom"
    shutil.copytree(shared_data / "example_ct_dicom", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder, list(list_dicom_series(folder)[0].files)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_dicom_series_with_a_gap_is_refused_or_resampled(shared_data, dicom_copy, monkeypatch, damage):
    folder, files = dicom_copy
    whole = read_volume(shared_data / "example_ct_dicom")
    if damage == "missing":
        Path(files[10]).unlink()
    else:
        raw = Path(files[10]).read_bytes()
        Path(files[10]).write_bytes(raw[: len(raw) // 3])
    monkeypatch.delenv(UNEVEN_SLICES_ENV, raising=False)
    with pytest.raises(DagmanInputError) as info:
        read_volume(folder)
    message = str(info.value)
    assert "gap of 4.00 mm" in message and "2.00 mm apart" in message and "\n" not in message

    monkeypatch.setenv(UNEVEN_SLICES_ENV, "resample")
    even = read_volume(folder)
    assert even.shape == whole.shape and even.spacing == pytest.approx(whole.spacing)
    assert even.origin == pytest.approx(whole.origin)
    assert "interpolated onto 20 slices 2.00 mm apart" in even.metadata["notes"][0]
    # every slice that was read is where it belongs; the lost one lies between its neighbours
    kept = [k for k in range(20) if k != 10]
    z = [int(round(whole.physical_to_index(even.index_to_physical((k, 0, 0)))[0])) for k in kept]
    np.testing.assert_array_equal(even.array[kept], whole.array[z])
    lost = int(round(whole.physical_to_index(even.index_to_physical((10, 0, 0)))[0]))
    np.testing.assert_allclose(
        even.array[10], (whole.array[lost - 1].astype(float) + whole.array[lost + 1]) / 2, atol=0.51
    )


def test_a_repeated_dicom_slice_is_refused(dicom_copy):
    folder, files = dicom_copy
    shutil.copy(files[4], folder / "copy_of_slice.dcm")
    with pytest.raises(DagmanInputError, match="lie at the same position.*duplicated file"):
        read_volume(folder)


def test_an_unknown_uneven_slice_policy_is_refused(shared_data, monkeypatch):
    monkeypatch.setenv(UNEVEN_SLICES_ENV, "guess")
    with pytest.raises(DagmanInputError, match="must be one of refuse, resample"):
        read_volume(shared_data / "example_ct_dicom")


# --- 4: sheared grids -------------------------------------------------------------------------------------------------
def test_a_sheared_metaimage_is_refused(small_ct, tmp_path):
    sheared = sitk.Image(small_ct)
    sheared.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.2, 0.9798))
    sitk.WriteImage(sheared, str(tmp_path / "sheared.mha"))
    with pytest.raises(DagmanInputError, match=r"sheared.mha: the voxel grid is sheared \(its axes are 11\.\d degrees"):
        read_volume(tmp_path / "sheared.mha")


def test_a_nifti_with_a_sheared_affine_is_refused(small_ct, tmp_path):
    """ITK forces a sheared sform orthogonal: the volume would be read, and written back, rotated."""
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(small_ct, str(plain))
    srow = list(struct.unpack("<12f", plain.read_bytes()[280:328]))
    srow[4 + 2] = 0.8  # y gains a z component: the slices lean
    path = patch_nifti(plain, tmp_path / "sheared.nii", {254: ("<h", (1,)), 280: ("<12f", tuple(srow))})
    with pytest.raises(DagmanInputError, match=r"sheared.nii: the voxel grid is sheared \(axes 1[45]\.\d degrees"):
        read_volume(path)


def test_a_volume_with_sheared_directions_cannot_be_made_or_written(shared_data, tmp_path):
    ct = read_volume(shared_data / "example_ct_sm.nii.gz")
    shear = np.array([[1.0, 0.0, 0.0], [0.0, 0.98, 0.2], [0.0, 0.2, 0.98]])
    with pytest.raises(DagmanInputError, match="sheared"):
        Volume(ct.array, ct.spacing, ct.origin, shear)
    with pytest.raises(DagmanInputError, match="sheared"):
        Volume.from_layer_data(ct.array, metadata={"direction": shear.tolist()})
    assert not list(tmp_path.iterdir())


def test_a_dicom_series_from_a_tilted_gantry_is_refused(small_ct, tmp_path):
    array = sitk.GetArrayFromImage(small_ct)[:8]
    write_dicom_series(tmp_path / "tilt", array, uid="1.2.826.0.1.3680043.2.1125.7", description="tilt",
                       spacing=(3.0, 3.0, 3.0), tilt_mm=0.5)
    with pytest.raises(DagmanInputError, match=r"shifted within their plane \(9\.5 degrees, a tilted gantry"):
        read_volume(tmp_path / "tilt")
    write_dicom_series(tmp_path / "straight", array, uid="1.2.826.0.1.3680043.2.1125.8", description="straight",
                       spacing=(3.0, 3.0, 3.0))
    np.testing.assert_array_equal(read_volume(tmp_path / "straight").array, array)


# --- 5: voxel sizes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0.0, float("nan")], ids=["zero", "nan"])
def test_a_nifti_voxel_size_of_zero_or_nan_is_refused(small_ct, tmp_path, size):
    """ITK reads both as 1 mm."""
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(small_ct, str(plain))
    path = patch_nifti(plain, tmp_path / "bad.nii", {80: ("<f", (size,))})
    with pytest.raises(DagmanInputError, match=rf"voxel size of {size:g}, 3, 3 mm \(pixdim\)"):
        read_volume(path)


def test_microscopic_voxels_are_refused(small_ct, tmp_path, capsys):
    """A voxel size of 1e-4 mm (a header in metres, or a broken one) would make the scan one voxel of the model."""
    tiny = sitk.Image(small_ct)
    tiny.SetSpacing((1e-4, 1e-4, 1e-4))
    sitk.WriteImage(tiny, str(tmp_path / "tiny.nii.gz"))
    status, err = pretrain(tmp_path / "tiny.nii.gz", tmp_path / "run", capsys)
    assert status == 2 and "spans only 0.003 x 0.0101 x 0.0122 mm" in one_line(err)
    assert "voxel size in its header" in err and not (tmp_path / "run").exists()


def test_a_constant_image_is_refused(small_ct, tmp_path, capsys):
    flat = write_like(small_ct, np.full(sitk.GetArrayFromImage(small_ct).shape, 40, np.int16), tmp_path / "flat.nii.gz")
    status, err = pretrain(flat, tmp_path / "run", capsys)
    assert status == 2 and "every voxel has the value 40" in one_line(err)
    assert not (tmp_path / "run").exists()


# --- 13: truncated MetaImage ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "compressed"])
def test_a_truncated_metaimage_says_so(small_ct, tmp_path, compressed):
    """ITK said "No such file or directory" about a file that is there."""
    whole = tmp_path / "whole.mha"
    sitk.WriteImage(small_ct, str(whole), useCompression=compressed)
    raw = whole.read_bytes()
    cut = tmp_path / "cut.mha"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DagmanInputError) as info:
        read_volume(cut)
    message = str(info.value)
    assert message.startswith("cut.mha is truncated or corrupt") and "No such file" not in message


def test_a_metaimage_without_its_data_file_names_it(small_ct, tmp_path):
    sitk.WriteImage(small_ct, str(tmp_path / "split.mhd"))
    (tmp_path / "split.raw").unlink()
    with pytest.raises(DagmanInputError, match="split.mhd: its data file split.raw .* is missing"):
        read_volume(tmp_path / "split.mhd")


def test_a_compressed_nifti_beside_an_uncompressed_one_of_the_same_name_reads_its_own_data(shared_data, tmp_path):
    """niftilib, asked for scan.nii.gz, reads scan.nii when it exists: another scan, without a word."""
    shutil.copy(shared_data / "example_ct_sm.nii.gz", tmp_path / "scan.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(shared_data / "example_seg.nii.gz")), str(tmp_path / "scan.nii"))
    ct = read_volume(tmp_path / "scan.nii.gz")
    np.testing.assert_array_equal(ct.array, read_volume(shared_data / "example_ct_sm.nii.gz").array)
    assert read_volume(tmp_path / "scan.nii").array.max() == 117  # and the other file is the label map


def test_writing_a_valid_volume_still_round_trips(shared_data, tmp_path):
    """The checks refuse what is wrong, not what is right: every real file reads, writes and reads back."""
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz", "example_ct_dicom"):
        volume = read_volume(shared_data / name)
        write_volume(volume, tmp_path / "copy.nii")
        again = read_volume(tmp_path / "copy.nii")
        np.testing.assert_array_equal(again.array, volume.array)
        assert again.same_grid(volume)
