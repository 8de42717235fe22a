"""NIfTI files are read with the geometry and values their header says, or refused in one line (issue 28, item 4).

ITK reads a NIfTI header whatever it says: the voxel size from pixdim even when the sform says another (3 mm
voxels read as 1 mm), the qform or the sform by rules of its own when the two disagree, and any scl_slope (1e30
gives values of 1e33 "HU"); a slope of 0 or NaN still adds the intercept the NIfTI standard says to ignore. The
refusal tests here failed before the header fields were checked; the others hold that files whose fields agree
(as SimpleITK, nibabel, dcm2niix and TotalSegmentator write them) read as before.

The files are built byte by byte, so every header field is the one the test names. SimpleITK 2.5 (ITK 5.4) does
not read NIfTI-2 at all ("Unable to determine ImageIO reader"); its header is checked all the same, so the
refusals are tested in both layouts and the reads in NIfTI-1.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.headers import read_nifti_header
from napari_dagman.core.io import from_sitk, is_label_map, read_volume

#: A small CT block (z, y, x) of stored values from -1000 to 1010.
ARRAY = (np.arange(6 * 7 * 8).reshape(6, 7, 8) * 6 - 1000).astype(np.int16)
_DTYPES = {np.dtype(np.int16): (4, 16), np.dtype(np.uint8): (2, 8), np.dtype(np.float32): (16, 32)}


def z_rotation(degrees: float) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A rotation about z (RAS) and its quaternion (b, c, d)."""
    t = np.radians(degrees)
    matrix = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    return matrix, (0.0, 0.0, float(np.sin(t / 2)))


def write_nifti(
    path: Path,
    array: np.ndarray = ARRAY,
    *,
    version: int = 1,
    pixdim: tuple[float, float, float] = (1.0, 1.0, 1.0),
    sform: np.ndarray | None = None,
    sform_code: int = 1,
    qform_code: int = 1,
    quatern: tuple[float, ...] = (0.0, 0.0, 0.0, 10.0, 20.0, 30.0),
    slope: float = 1.0,
    inter: float = 0.0,
) -> Path:
    """A NIfTI-1 or NIfTI-2 file of ``array`` (z, y, x) with exactly these header fields (qfac 1, mm units).

    The default sform is the qform's: no rotation, the voxel size of pixdim, origin (10, 20, 30).
    """
    array = np.asarray(array)
    code, bitpix = _DTYPES[array.dtype]
    if sform is None:
        sform = np.hstack([np.diag(pixdim), np.array(quatern[3:])[:, None]])
    dim = (3, *array.shape[::-1], 1, 1, 1, 1)
    pixdim8 = (1.0, *pixdim, 1.0, 1.0, 1.0, 1.0)
    f, i, size = ("f", "h", 348) if version == 1 else ("d", "i", 540)
    header = bytearray(size)
    struct.pack_into("<i", header, 0, size)
    if version == 1:
        struct.pack_into("<8h", header, 40, *dim)
        struct.pack_into("<hh", header, 70, code, bitpix)
        struct.pack_into("<8f", header, 76, *pixdim8)
        struct.pack_into("<f", header, 108, 352.0)
        struct.pack_into("<B", header, 123, 2)  # xyzt_units: mm
        struct.pack_into("<4s", header, 344, b"n+1\0")
        fields = 112, 252, 256, 280
    else:
        struct.pack_into("<8s", header, 4, b"n+2\0\r\n\x1a\n")
        struct.pack_into("<hh", header, 12, code, bitpix)
        struct.pack_into("<8q", header, 16, *dim)
        struct.pack_into("<8d", header, 104, *pixdim8)
        struct.pack_into("<q", header, 168, 544)
        struct.pack_into("<i", header, 500, 2)
        fields = 176, 344, 352, 400
    scaling, codes, quaternion, srow = fields
    struct.pack_into(f"<2{f}", header, scaling, slope, inter)
    struct.pack_into(f"<2{i}", header, codes, qform_code, sform_code)
    struct.pack_into(f"<6{f}", header, quaternion, *quatern)
    struct.pack_into(f"<12{f}", header, srow, *np.asarray(sform, dtype=float).ravel())
    path.write_bytes(bytes(header) + b"\0" * 4 + array.tobytes())
    return path


@pytest.fixture(params=[1, 2], ids=["nifti1", "nifti2"])
def version(request) -> int:
    return request.param


def test_the_hand_built_files_read_as_their_header_says(tmp_path, version):
    """The builder itself: ITK reads its geometry and values (so the refusals below are the checks' doing), and
    our parser finds every field where the NIfTI-1 and NIfTI-2 standards put it."""
    matrix, (b, c, d) = z_rotation(30)
    sform = np.hstack([matrix * (0.5, 0.8, 2.0), np.array([[5.0], [-6.0], [7.0]])])
    path = write_nifti(
        tmp_path / "ct.nii", version=version, pixdim=(0.5, 0.8, 2.0), sform=sform, quatern=(b, c, d, 5, -6, 7),
        qform_code=2, sform_code=1, slope=0.5, inter=-1024.0,
    )  # fmt: skip
    header = read_nifti_header(path)
    assert header is not None and header.version == version and header.dims == (8, 7, 6)
    assert (header.qform_code, header.sform_code, header.qfac) == (2, 1, 1.0)
    assert header.quatern == pytest.approx((b, c, d, 5, -6, 7))
    assert (header.scl_slope, header.scl_inter) == (0.5, -1024.0)
    np.testing.assert_allclose(header.srow, sform, rtol=1e-7)
    if version == 2:
        return  # ITK 5.4 does not read NIfTI-2
    path = write_nifti(
        tmp_path / "ct.nii", pixdim=(0.5, 0.8, 2.0), sform=sform, quatern=(b, c, d, 5, -6, 7)
    )
    image = sitk.ReadImage(str(path))
    assert image.GetSpacing() == pytest.approx((0.5, 0.8, 2.0))
    assert image.GetOrigin() == pytest.approx((-5.0, 6.0, 7.0))  # RAS -> LPS
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ARRAY)
    volume = read_volume(path)
    assert volume.array.dtype == np.int16 and sorted(volume.spacing) == pytest.approx([0.5, 0.8, 2.0])


# --- geometry -----------------------------------------------------------------------------------------------------
def test_an_sform_voxel_size_that_disagrees_with_pixdim_is_refused(tmp_path, version):
    """The sform says 3 mm voxels, pixdim 1 mm: nibabel reads 3 mm, ITK read 1 mm without a word."""
    sform = np.hstack([np.diag([3.0, 3.0, 3.0]), np.array([[10.0], [20.0], [30.0]])])
    path = write_nifti(tmp_path / "ct.nii", version=version, sform=sform, qform_code=0)
    if version == 1:
        assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
    with pytest.raises(DagmanInputError) as err:
        read_volume(path)
    assert str(err.value) == (
        "ct.nii: the header's voxel size disagrees with itself: sform 3 x 3 x 3 mm, pixdim 1 x 1 x 1 mm; fix the "
        "header (e.g. rewrite it with nibabel or 3D Slicer)"
    )


@pytest.mark.parametrize(
    ("qform_code", "sform_code", "itk_reads"), [(1, 1, "sform"), (1, 2, "qform"), (2, 1, "sform"), (1, 4, "qform")]
)
def test_a_qform_that_disagrees_with_the_sform_is_refused(tmp_path, version, qform_code, sform_code, itk_reads):
    """The qform says no rotation at (10, 20, 30), the sform 30 degrees about z at (-5, -6, -7): ITK read one of
    them by the codes (the sform when its code is 1, else the qform), nibabel the sform, without a word."""
    matrix, _ = z_rotation(30)
    sform = np.hstack([matrix, np.array([[-5.0], [-6.0], [-7.0]])])
    path = write_nifti(
        tmp_path / "ct.nii", version=version, sform=sform, qform_code=qform_code, sform_code=sform_code
    )
    if version == 1:
        origin = sitk.ReadImage(str(path)).GetOrigin()
        assert origin == pytest.approx((5.0, 6.0, -7.0) if itk_reads == "sform" else (-10.0, -20.0, 30.0))
    with pytest.raises(DagmanInputError, match=r"^ct\.nii: the header's two affines disagree") as err:
        read_volume(path)
    message = str(err.value)
    assert f"qform (code {qform_code}) and sform (code {sform_code})" in message and "\n" not in message
    assert "axes 30 degrees" in message and f"ITK would read the {itk_reads}" in message


def test_a_qform_whose_origin_alone_disagrees_is_refused(tmp_path):
    sform = np.hstack([np.eye(3), np.array([[10.0], [20.0], [35.0]])])  # 5 mm from the qform's origin
    with pytest.raises(DagmanInputError, match=r"axes 0 degrees and origins 5 mm apart"):
        read_volume(write_nifti(tmp_path / "ct.nii", sform=sform))


@pytest.mark.parametrize("degrees", [0.0, 30.0, 90.0, 180.0, 179.999])
def test_a_qform_and_sform_that_agree_up_to_float_rounding_read_unchanged(tmp_path, degrees):
    """Both set to one geometry, the sform as float32 (NIfTI-1) and the quaternion as stored: read as ITK reads."""
    matrix, (b, c, d) = z_rotation(degrees)
    sizes = (0.9765625, 0.9765625, 2.5)
    sform = np.hstack([matrix * sizes, np.array([[-250.0], [-120.5], [1012.25]])])
    path = write_nifti(tmp_path / "ct.nii", pixdim=sizes, sform=sform, quatern=(b, c, d, -250, -120.5, 1012.25))
    assert_read_as_itk_reads(path)


def test_files_written_by_simpleitk_and_nibabel_read_unchanged(tmp_path):
    """Oblique, improper (qfac -1) and near-180-degree geometries, written with both qform and sform set."""
    rotations = {
        "oblique": [[0.8, -0.6, 0.0], [0.36, 0.48, -0.8], [0.48, 0.64, 0.6]],
        "flipped": [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "near_180": z_rotation(179.99)[0] @ [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]],
    }
    paths = []
    for name, rotation in rotations.items():
        image = sitk.GetImageFromArray(ARRAY)
        image.SetSpacing((0.7, 0.9, 3.0))
        image.SetOrigin((-123.4, 56.7, -890.1))
        image.SetDirection(tuple(np.asarray(rotation, dtype=float).ravel()))
        paths.append(tmp_path / f"sitk_{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    try:
        import nibabel
    except ImportError:  # not a dependency of the package
        nibabel = None
    if nibabel is not None:
        for name, rotation in rotations.items():
            affine = np.eye(4)
            affine[:3, :3] = np.asarray(rotation, dtype=float) * (0.7, 0.9, 3.0)
            affine[:3, 3] = (123.4, -56.7, -890.1)
            for qform_code, sform_code in ((1, 1), (1, 2), (0, 2)):
                img = nibabel.Nifti1Image(ARRAY.T.copy(), affine)
                img.set_qform(affine, code=qform_code)
                img.set_sform(affine, code=sform_code)
                paths.append(tmp_path / f"nib_{qform_code}{sform_code}_{name}.nii.gz")
                nibabel.save(img, str(paths[-1]))
    for path in paths:
        assert_read_as_itk_reads(path)


def test_the_shared_example_files_read_unchanged(shared_data):
    for path in sorted(shared_data.glob("*.nii.gz")):
        assert_read_as_itk_reads(path)


def assert_read_as_itk_reads(path: Path) -> None:
    """``read_volume`` gives the voxels, voxel size, origin and direction that SimpleITK reads from ``path``."""
    expected = from_sitk(sitk.ReadImage(str(path)))
    volume = read_volume(path)
    assert volume.array.dtype == expected.array.dtype
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_allclose(volume.spacing, expected.spacing, rtol=1e-12)
    np.testing.assert_allclose(volume.origin, expected.origin, atol=1e-9)
    np.testing.assert_allclose(volume.direction, expected.direction, atol=1e-12)


# --- values -------------------------------------------------------------------------------------------------------
def test_an_absurd_scl_slope_is_refused(tmp_path):
    """scl_slope 1e30: ITK read values of +-1e33 and training went on with them."""
    path = write_nifti(tmp_path / "ct.nii", slope=1e30)
    assert np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).max() > 1e32
    with pytest.raises(DagmanInputError) as err:
        read_volume(path)
    assert str(err.value) == (
        "ct.nii: its values span -1e+33 to 1.01e+33 (scl_slope 1e+30, scl_inter 0): not Hounsfield units; check "
        "the header's scl_slope/scl_inter"
    )


@pytest.mark.parametrize(
    ("slope", "inter", "message"),
    [
        (0.0, -1024.0, "scl_slope is 0 (no scaling, says the NIfTI standard) but its scl_inter is -1024"),
        (np.nan, -1024.0, "scl_slope is nan (no scaling, says the NIfTI standard) but its scl_inter is -1024"),
        (np.inf, 0.0, "scl_slope is inf, not a scale factor"),
        (2.0, np.nan, "scl_inter is nan (with scl_slope 2), not a number"),
        (1e-20, 0.0, "scl_slope 1e-20 is too small for ITK, which would read it as 1"),
    ],
)
def test_a_scaling_itk_would_apply_otherwise_than_the_standard_is_refused(tmp_path, version, slope, inter, message):
    """ITK reads a slope of 0, NaN or inf as "add the intercept only", a NaN intercept as 0, a tiny slope as 1."""
    path = write_nifti(tmp_path / "ct.nii", version=version, slope=slope, inter=inter)
    with pytest.raises(DagmanInputError, match=r"^ct\.nii: the header's ") as err:
        read_volume(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("slope", "inter", "dtype", "times", "plus"),
    [
        (0.0, 0.0, np.int16, 1, 0),  # 0: no scaling
        (np.nan, np.nan, np.int16, 1, 0),  # what nibabel writes for no scaling
        (0.0, np.nan, np.int16, 1, 0),
        (1.0, 0.0, np.int16, 1, 0),
        (0.5, -1024.0, np.float32, 0.5, -1024),
        (1.0, -1024.0, np.float32, 1, -1024),  # dcm2niix's unsigned CT
        (-2.0, 3.0, np.float32, -2, 3),
    ],
)
def test_scl_slope_and_inter_are_read_as_the_nifti_standard_says(tmp_path, slope, inter, dtype, times, plus):
    """Values = stored x scl_slope + scl_inter, unless scl_slope is 0 (or NaN, nibabel's "not set")."""
    path = write_nifti(tmp_path / "ct.nii", slope=slope, inter=inter)
    stored = read_volume(write_nifti(tmp_path / "stored.nii")).array  # the same voxels, in the reader's order
    assert stored.dtype == np.int16 and sorted(np.unique(stored)) == sorted(np.unique(ARRAY))
    volume = read_volume(path)
    assert volume.array.dtype == dtype
    np.testing.assert_array_equal(volume.array, (stored * times + plus).astype(dtype))


def test_a_label_map_with_scl_slope_1_is_unaffected(tmp_path):
    labels = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 5).astype(np.uint8)
    volume = read_volume(write_nifti(tmp_path / "seg.nii", labels, slope=1.0, inter=0.0))
    assert volume.array.dtype == np.uint8 and is_label_map(volume)
    assert set(np.unique(volume.array)) == {0, 1, 2, 3, 4}


def test_extended_hounsfield_units_are_read(tmp_path):
    """Metal in an extended-scale CT reaches about +30000 HU: well inside the limit."""
    path = write_nifti(tmp_path / "ct.nii", slope=30.0, inter=-1024.0)
    volume = read_volume(path)
    assert volume.array.min() == -31024 and volume.array.max() == 1010 * 30 - 1024
