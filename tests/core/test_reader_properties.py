"""Property-based tests of the readers: real CT files with random geometry, types and damage.

Whatever the file, reading gives a volume whose geometry is the file's, or our one-line `DagmanInputError`; the
napari reader gives layers, that error, or None. Never another exception, never a crash, never a changed voxel
size or position without a word.
"""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from napari_dagman._reader import get_reader
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import read_volumes
from napari_dagman.core.volume import Volume

#: Examples per property: a few seconds in CI; raise it (DAGMAN_HYPOTHESIS_EXAMPLES=5000) to search harder.
SETTINGS = settings(
    max_examples=int(os.environ.get("DAGMAN_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FORMATS = (".nii", ".nii.gz", ".mha", ".nrrd")
DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64)


@pytest.fixture(scope="module")
def ct_array(shared_data) -> np.ndarray:
    """A 12 x 20 x 24 block of the real small CT (z, y, x HU): small enough for many examples."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "example_ct_sm.nii.gz")))[9:21, 40:60, 50:74]


@pytest.fixture(scope="module")
def folder():
    path = Path(tempfile.mkdtemp(prefix="dagman-hypothesis-"))
    yield path
    shutil.rmtree(path)


def read_or_refuse(path: Path) -> list[Volume] | None:
    """The property every reader keeps: volumes, or one line of `DagmanInputError`; the napari reader agrees."""
    try:
        volumes = read_volumes(path)
    except DagmanInputError as err:
        message = str(err)
        assert message and "\n" not in message, message
        volumes = None
    reader = get_reader(str(path))
    if reader is not None:
        try:
            layers = reader(str(path))
        except DagmanInputError as err:
            assert volumes is None and "\n" not in str(err)
        else:
            assert volumes is not None and len(layers) == len(volumes)
    for volume in volumes or []:
        assert volume.array.ndim == 3 and all(np.isfinite(s) and s > 0 for s in volume.spacing)
    return volumes


def corners(image: sitk.Image) -> np.ndarray:
    """The physical positions (x, y, z) of the 8 corner voxels, sorted: the same however the array is oriented."""
    size = image.GetSize()
    points = [image.TransformIndexToPhysicalPoint(tuple(c)) for c in itertools.product(*((0, n - 1) for n in size))]
    return np.array(sorted(np.round(points, 3).tolist()))


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@SETTINGS
@given(
    fmt=st.sampled_from(FORMATS),
    dtype=st.sampled_from(DTYPES),
    size=st.tuples(st.integers(1, 12), st.integers(1, 20), st.integers(1, 24)),
    spacing=st.tuples(*[st.floats(1e-3, 200.0)] * 3),
    angles=st.tuples(*[st.sampled_from([0.0, np.pi / 2, np.pi, 0.3, -1.1])] * 3),
    shear=st.sampled_from([0.0, 0.0, 0.05, 0.3]),
)
def test_any_geometry_and_type_reads_as_written_or_is_refused(ct_array, folder, fmt, dtype, size, spacing, angles, shear):
    array = ct_array[: size[0], : size[1], : size[2]]
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    array = np.clip(array, info.min, info.max).astype(dtype) if info else array.astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    direction = rotation(angles)
    direction[:, 1] += shear * direction[:, 0]
    direction /= np.linalg.norm(direction, axis=0)
    image.SetDirection(tuple(direction.ravel()))
    path = folder / f"v{fmt}"
    sitk.WriteImage(image, str(path))
    volumes = read_or_refuse(path)
    written = sitk.ReadImage(str(path))  # what the file holds (the NIfTI writer makes a shear orthogonal)
    sheared = abs(np.dot(*np.asarray(written.GetDirection()).reshape(3, 3).T[:2])) > 1e-3
    if sheared:
        assert volumes is None  # refused, never forced orthogonal (a rotated volume)
        return
    assert volumes is not None and len(volumes) == 1
    volume = volumes[0]
    assert sorted(volume.spacing) == pytest.approx(sorted(spacing), rel=1e-5)
    read = sitk.GetImageFromArray(volume.array)
    read.SetSpacing(volume.spacing[::-1])
    read.SetOrigin(volume.origin[::-1])
    read.SetDirection(tuple(volume.direction[::-1, ::-1].ravel()))
    np.testing.assert_allclose(corners(read), corners(written), atol=1e-2 * max(1.0, max(spacing)))
    assert np.array_equal(np.sort(volume.array, axis=None), np.sort(array, axis=None))


@pytest.fixture(scope="module")
def nifti_bytes(ct_array) -> bytes:
    """An uncompressed NIfTI-1 file of the real CT block."""
    path = Path(tempfile.mkdtemp()) / "ct.nii"
    sitk.WriteImage(sitk.GetImageFromArray(ct_array), str(path))
    raw = path.read_bytes()
    shutil.rmtree(path.parent)
    return raw


#: NIfTI-1 fields whose whole value the property below replaces: pixdim[0..3], scl_slope, scl_inter, the
#: quaternion and qoffset, srow_x/y/z (float32 at these offsets); qform_code and sform_code (int16).
NIFTI_FLOAT_FIELDS = (76, 80, 84, 88, 112, 116, 256, 260, 264, 268, 272, 276, *range(280, 328, 4))
NIFTI_FIELD_VALUES = (0.0, 1.0, -1.0, 3.0, 0.5, -1024.0, 1e-20, 1e30, float("nan"), float("inf"))


@SETTINGS
@given(
    edits=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1, max_size=6),
    fields=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(NIFTI_FLOAT_FIELDS), st.sampled_from(NIFTI_FIELD_VALUES)),
            st.tuples(st.sampled_from((252, 254)), st.integers(-1, 5)),
        ),
        max_size=3,
    ),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    gz=st.booleans(),
)
@example(edits=[(0, 92)], fields=[(280, -3.0), (300, -3.0), (320, 3.0)], cut=None, gz=False)  # sform 3 mm, pixdim 1
@example(edits=[(0, 92)], fields=[(256, 0.5), (254, 2)], cut=None, gz=False)  # qform rotated, sform not
@example(edits=[(0, 92)], fields=[(112, 1e30)], cut=None, gz=True)  # values of 1e33
@example(edits=[(0, 92)], fields=[(112, 0.0), (116, -1024.0)], cut=None, gz=False)  # ITK adds the intercept
def test_damaged_nifti_headers_and_truncations_are_read_or_refused(nifti_bytes, folder, edits, fields, cut, gz):
    """Random bytes and whole header fields (the geometry and the scaling) replaced, the file possibly cut."""
    raw = bytearray(nifti_bytes)
    for offset, value in edits:
        raw[offset] = value
    for offset, value in fields:
        struct.pack_into("<h" if offset in (252, 254) else "<f", raw, offset, value)
    data = bytes(raw[:cut] if cut is not None else raw)
    path = folder / ("d.nii.gz" if gz else "d.nii")
    if gz:
        import gzip

        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    read_or_refuse(path)


@pytest.fixture(scope="module")
def text_headers(ct_array) -> dict[str, tuple[bytes, bytes]]:
    """Uncompressed MetaImage and NRRD files of the real CT block: suffix -> (header, data)."""
    folder = Path(tempfile.mkdtemp())
    out = {}
    for suffix, end in ((".mha", b"ElementDataFile = LOCAL\n"), (".nrrd", b"\n\n")):
        sitk.WriteImage(sitk.GetImageFromArray(ct_array), str(folder / f"ct{suffix}"), useCompression=False)
        raw = (folder / f"ct{suffix}").read_bytes()
        split = raw.index(end) + len(end)
        out[suffix] = raw[:split], raw[split:]
    shutil.rmtree(folder)
    return out


@SETTINGS
@given(
    suffix=st.sampled_from([".mha", ".nrrd"]),
    line=st.integers(0, 12),
    value=st.sampled_from(["0", "-1", "nan", "1e9", "abc", "3 3", "", "MET_FLOAT", "float", "LOCAL", "gzip",
                           "True", "99999 99999 9", "(nan,0,0) (0,1,0) (0,0,1)", "(1,0,0) (1,0,0) (0,0,1)"]),  # fmt: skip
    cut=st.one_of(st.none(), st.integers(0, 12_000)),
)
@example(suffix=".mha", line=1, value="-1", cut=None)  # NDims -1: ITK's MetaImage reader crashed the process
@example(suffix=".mha", line=1, value="1e9", cut=150)  # the same with the header cut before ElementDataFile
def test_damaged_text_headers_and_truncations_are_read_or_refused(text_headers, folder, suffix, line, value, cut):
    """MetaImage (``key = value``) and NRRD (``key: value``) headers with one field replaced, possibly cut."""
    header, data = text_headers[suffix]
    separator = "=" if suffix == ".mha" else ":"
    lines = header.decode().split("\n")
    k = line % len(lines)
    if separator in lines[k]:
        lines[k] = f"{lines[k].split(separator)[0]}{separator} {value}"
    damaged = "\n".join(lines).encode() + data
    path = folder / f"d{suffix}"
    path.write_bytes(damaged[:cut] if cut is not None else damaged)
    read_or_refuse(path)
