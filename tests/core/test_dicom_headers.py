"""DICOM series are read with the geometry and values their headers say, or refused in one line (issue 28).

ITK reads a series whatever its headers say: no ImagePositionPatient stacks the slices 1 mm apart, a
RescaleSlope of 0 or "abc" becomes 1, an MR series reads like a CT, a localizer breaks the stack. Each case here
failed before the headers were checked (items 1-3 and 15 of issue 28); the property at the end edits the headers
of a small synthetic series at random.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import write_dicom_series

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import (
    ANY_MODALITY_ENV,
    UNEVEN_SLICES_ENV,
    list_dicom_series,
    read_volume,
    read_volumes,
)

UID = "1.2.826.0.1.3680043.2.1125.28"
#: The stored values of the synthetic series (z, y, x); slice k holds values around 100 k.
ARRAY = (np.arange(5)[:, None, None] * 100 + np.arange(42).reshape(6, 7)[None]).astype(np.int16) - 200


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    """Every test sees the default policies, whatever the shell that runs it says."""
    monkeypatch.delenv(UNEVEN_SLICES_ENV, raising=False)
    monkeypatch.delenv(ANY_MODALITY_ENV, raising=False)


def series(folder: Path, edits: dict[int, dict[str, str | None]] | None = None, **options) -> Path:
    """The synthetic series (2 mm slices, 0.8 mm pixels) in ``folder``, its headers edited."""
    write_dicom_series(folder, ARRAY, uid=UID, description="edited", spacing=(0.8, 0.8, 2.0), edits=edits, **options)
    return folder


def extra_slice(folder: Path, name: str, array: np.ndarray, changes: dict[str, str | None]) -> None:
    """One more file of the same series (its own SOP instance), written as ``name``, its header changed."""
    (path,) = write_dicom_series(folder / "tmp", array, uid=UID, description="edited", spacing=(0.8, 0.8, 2.0),
                                 edits={0: {"SOPInstanceUID": f"{UID}.900", "InstanceNumber": "90", **changes}})
    path.rename(folder / name)
    (folder / "tmp").rmdir()


def refused(path: Path, **options) -> str:
    with pytest.raises(DagmanInputError) as info:
        read_volume(path, **options)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# --- item 1: where the slices lie ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["every", "one"])
def test_a_series_without_image_position_is_refused_naming_the_file(tmp_path, which):
    """Before: read 1.0 mm apart (removed from every slice; truth 2.0) or at a guessed spacing (from one)."""
    slices = range(5) if which == "every" else [3]
    folder = series(tmp_path, {k: {"ImagePositionPatient": None} for k in slices})
    first = "s000.dcm" if which == "every" else "s003.dcm"
    assert f"{first} has no ImagePositionPatient (0020,0032), so where its slice lies is unknown" in refused(folder)


@pytest.mark.parametrize(
    ("orientation", "says"),
    [(None, "s002.dcm has no ImageOrientationPatient (0020,0037)"),
     ("1\\0.05\\0\\-0.05\\1\\0", "s002.dcm is oriented otherwise than s000.dcm"),
     ("1\\0\\0\\1\\0\\0", "s002.dcm has ImageOrientationPatient (0020,0037) '1\\0\\0\\1\\0\\0', not two perpendicular")],
    ids=["missing", "rotated", "degenerate"],
)  # fmt: skip
def test_a_slice_without_or_with_another_orientation_is_refused_naming_the_file(tmp_path, orientation, says):
    """Before: read with the first slice's orientation, as if every slice had it."""
    folder = series(tmp_path, {2: {"ImageOrientationPatient": orientation}})
    assert says in refused(folder)


# --- item 2: what the values mean ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "value", "says"),
    [("RescaleSlope", "0", "s001.dcm has RescaleSlope (0028,1053) 0"),
     ("RescaleSlope", "abc", "s001.dcm has RescaleSlope (0028,1053) 'abc', not a number"),
     ("RescaleIntercept", "-10x24", "s001.dcm has RescaleIntercept (0028,1052) '-10x24', not a number")],
)  # fmt: skip
@pytest.mark.parametrize("where", ["series", "file"])
def test_a_rescale_of_zero_or_not_a_number_is_refused_naming_the_file_and_value(tmp_path, tag, value, says, where):
    """Before: ITK read a slope of 0 or 'abc' as 1, an intercept 'abc' as 0, without a word."""
    folder = series(tmp_path, {1: {tag: value}})
    assert says in refused(folder if where == "series" else folder / "s001.dcm")


def test_slices_with_different_rescales_are_each_read_with_their_own(tmp_path):
    """ITK rescales each slice, but into the first slice's integer type: 0.5 x 101 was read as 50, not 50.5."""
    folder = series(tmp_path, {2: {"RescaleSlope": "0.5", "RescaleIntercept": "-1024.25"}})
    volume = read_volume(folder)
    expected = ARRAY.astype(np.float64)
    expected[2] = ARRAY[2] * 0.5 - 1024.25
    np.testing.assert_array_equal(volume.array, expected)
    assert "different RescaleSlope/RescaleIntercept" in volume.metadata["notes"][0]


# --- item 3: the modality ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["series", "file"])
def test_an_mr_series_is_refused_unless_any_modality_is_allowed(tmp_path, monkeypatch, where):
    """Before: an MR series was read, pretrained on and segmented as CT."""
    folder = series(tmp_path, {k: {"Modality": "MR"} for k in range(5)})
    path = folder if where == "series" else folder / "s000.dcm"
    message = refused(path)
    assert "is an MR" in message and f"set {ANY_MODALITY_ENV}=1 to read it anyway" in message
    assert read_volume(path, any_modality=True).shape[0] == (5 if where == "series" else 1)
    monkeypatch.setenv(ANY_MODALITY_ENV, "1")
    assert "MR" in read_volume(path).metadata["notes"][0]
    monkeypatch.setenv(ANY_MODALITY_ENV, "perhaps")
    assert f"{ANY_MODALITY_ENV} must be 1 or 0, got 'perhaps'" in refused(path)


def test_a_series_that_does_not_say_its_modality_is_read_with_a_note(tmp_path):
    """Anonymised exports strip Modality: read as CT, and said so."""
    volume = read_volume(series(tmp_path, {k: {"Modality": None} for k in range(5)}))
    np.testing.assert_array_equal(volume.array, ARRAY)
    assert any("no Modality (0008,0060)" in note for note in volume.metadata["notes"])


# --- item 15: localizers, other sizes, MetaImage directions, GDCM's warnings -------------------------------------------
@pytest.mark.parametrize("marked", ["image_type", "orientation"])
def test_a_localizer_in_a_series_is_left_out_with_a_note(tmp_path, marked):
    """Before: refused as slices at the same position, or as 'a tilted gantry?', without naming the file."""
    folder = series(tmp_path)
    changes = {"ImageOrientationPatient": "1\\0\\0\\0\\0\\-1", "ImagePositionPatient": "0\\3\\4"}
    if marked == "image_type":
        changes = {"ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER", "ImagePositionPatient": "0\\0\\3"}
    extra_slice(folder, "scout.dcm", ARRAY[:1], changes)
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.array, ARRAY)
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.8))
    assert volume.metadata["notes"] == [f"DICOM series 'edited (5 slices)' in {folder}: left out 1 localizer (scout.dcm)"]
    assert all("scout" not in f for f in list_dicom_series(folder)[0].files)  # nor is it in a DICOM SEG's sources


def test_a_slice_of_another_size_is_left_out_with_a_note(tmp_path):
    """Before: refused with ITK's 'Size mismatch! ... [9, 9, 1]'."""
    folder = series(tmp_path)
    extra_slice(folder, "big.dcm", np.zeros((1, 9, 9)), {"ImagePositionPatient": "0\\0\\10"})
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.array, ARRAY)
    (note,) = volume.metadata["notes"]
    assert note.endswith("left out 1 slice of another size 9 x 9 (big.dcm; the others are 7 x 6)")


def test_slices_of_two_sizes_half_and_half_are_refused(tmp_path):
    """Which size is the series is then unclear: refused, naming a file, not guessed."""
    folder = series(tmp_path)
    for k in range(5):
        extra_slice(folder, f"big{k}.dcm", np.zeros((1, 9, 9)),
                    {"SOPInstanceUID": f"{UID}.91{k}", "ImagePositionPatient": f"0\\0\\{10 + 2 * k}"})
    assert "two matrix sizes" in refused(folder)


def test_a_metaimage_with_a_singular_direction_says_so(tmp_path):
    """Before: 'broken or truncated file (0 0 0)'."""
    path = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(ARRAY), str(path))
    path.write_bytes(path.read_bytes().replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0 1 0 0 0 0"))
    assert "flat.mha: its direction matrix (TransformMatrix 1 0 0 0 1 0 0 0 0) is singular" in refused(path)


def test_listing_a_folder_without_dicom_writes_nothing_to_stderr(tmp_path):
    """Before: GDCM's 'No Series were found' warnings, several lines each, on the terminal (fd 2, from C++)."""
    (tmp_path / "notes.txt").write_text("not DICOM")
    code = (
        "import sys; from napari_dagman.core.io import list_dicom_series;"
        f"assert list_dicom_series({str(tmp_path)!r}) == [] and list_dicom_series({str(tmp_path / 'none')!r}) == []"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_the_real_series_reads_as_its_headers_say(shared_data):
    """The shared CT series (JPEG 2000, slope 1, intercept -1024) reads as ITK reads it: nothing left out, no note."""
    folder = shared_data / "example_ct_dicom"
    volume = read_volume(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reader.Execute()))
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625)) and "notes" not in volume.metadata


# --- the property ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch():
    path = Path(tempfile.mkdtemp(prefix="dagman-dicom-headers-"))
    yield path
    shutil.rmtree(path)


POSITION = ["none", "drop_every", "drop_one", "not_numbers", "shift_one"]
ORIENTATION = ["none", "drop_one", "rounding", "rotated_one", "not_numbers"]
SLOPES = [None, "", "1", "2", "0.5", "0", "abc", "1e999"]
INTERCEPTS = [None, "0", "-1024", "-1024.5", "x1"]
MODALITIES = ["CT", None, "MR", "PT"]


@settings(max_examples=int(os.environ.get("DAGMAN_HYPOTHESIS_EXAMPLES", "25")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    count=st.integers(3, 5),
    spacing=st.sampled_from([0.7, 1.25, 2.0, 3.0]),
    origin=st.tuples(*[st.sampled_from([0.0, -120.5, 33.25])] * 3),
    position=st.sampled_from(POSITION),
    orientation=st.sampled_from(ORIENTATION),
    slope=st.tuples(st.sampled_from(SLOPES), st.integers(0, 4), st.booleans()),
    intercept=st.tuples(st.sampled_from(INTERCEPTS), st.integers(0, 4), st.booleans()),
    modality=st.sampled_from(MODALITIES),
    localizer=st.booleans(),
    other_size=st.booleans(),
)
def test_dicom_header_edits_are_read_as_the_headers_say_or_refused(
    scratch, count, spacing, origin, position, orientation, slope, intercept, modality, localizer, other_size
):
    """Header edits (positions, orientations, rescales, modality, a localizer, a slice of another size): the series
    is read with the geometry and HU its headers say, or refused in one line; never read otherwise."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    array = ARRAY[:count]
    edits: dict[int, dict[str, str | None]] = {k: {} for k in range(count)}
    one = count // 2
    refuse = False
    if position == "drop_every":
        for k in range(count):
            edits[k]["ImagePositionPatient"] = None
    elif position != "none":
        z = origin[2] + one * spacing + 0.5 * spacing  # half a slice off: unevenly spaced
        text = {"drop_one": None, "not_numbers": "0\\0", "shift_one": f"{origin[0]}\\{origin[1]}\\{z}"}[position]
        edits[one]["ImagePositionPatient"] = text
    refuse |= position != "none"
    if orientation != "none":
        text = {"drop_one": None, "rounding": "1\\0.000001\\0\\-0.000001\\1\\0", "rotated_one": "1\\0.01\\0\\-0.01\\1\\0",
                "not_numbers": "1\\0\\0\\0\\1"}[orientation]  # fmt: skip
        edits[one]["ImageOrientationPatient"] = text
        refuse |= orientation != "rounding"
    rescale = [(1.0, 0.0)] * count
    for (value, k, every), tag, index in ((slope, "RescaleSlope", 0), (intercept, "RescaleIntercept", 1)):
        for j in range(count) if every else [k % count]:
            edits[j][tag] = value
            if value in ("0", "abc", "1e999", "x1") and not (value == "0" and tag == "RescaleIntercept"):
                refuse = True
            elif value:
                pair = list(rescale[j])
                pair[index] = float(value)
                rescale[j] = (pair[0], pair[1])
    for k in range(count):
        edits[k]["Modality"] = modality
    refuse |= modality in ("MR", "PT")
    write_dicom_series(folder, array, uid=UID, description="edited", spacing=(0.8, 0.8, spacing), origin=origin,
                       edits=edits)  # fmt: skip
    if localizer:
        extra_slice(folder, "scout.dcm", array[:1], {"ImageOrientationPatient": "0\\1\\0\\0\\0\\-1",
                                                     "ImagePositionPatient": "\\".join(map(str, origin))})  # fmt: skip
    if other_size:
        extra_slice(folder, "other.dcm", np.zeros((1, 4, 4)),
                    {"SOPInstanceUID": f"{UID}.901", "ImagePositionPatient": "\\".join(map(str, origin))})
    try:
        volumes = read_volumes(folder)
    except DagmanInputError as err:
        assert str(err) and "\n" not in str(err), str(err)
        assert refuse, f"refused a series whose headers are sound: {err}"
        return
    assert not refuse, "read a series whose headers do not say where its slices lie or what they hold"
    (volume,) = volumes
    expected = np.stack([array[k] * s + i for k, (s, i) in enumerate(rescale)])
    np.testing.assert_allclose(volume.array, expected, rtol=0, atol=1e-4)
    assert volume.spacing == pytest.approx((spacing, 0.8, 0.8), rel=1e-5)
    assert volume.origin == pytest.approx(origin[::-1], abs=1e-4)
    notes = " ".join(volume.metadata.get("notes", []))
    assert ("localizer (scout.dcm)" in notes) == localizer
    assert ("another size 4 x 4 (other.dcm" in notes) == other_size
    assert ("no Modality" in notes) == (modality is None)
