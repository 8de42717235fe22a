"""The synthetic CT phantom: determinism, geometry, labels, HU values, anatomy, and the sample_data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import read_volume
from napari_dagman.core.labels import TOTALSEG_V2
from napari_dagman.core.phantom import (
    AORTA,
    HEART,
    KIDNEY_LEFT,
    KIDNEY_RIGHT,
    LIVER,
    LUNG_NODULE,
    LUNG_VESSELS,
    PHANTOM_HU,
    PHANTOM_LABELS,
    RIB_LEFT_1,
    RIB_NUMBERS,
    RIB_RIGHT_1,
    SAMPLE_FILE_PARAMS,
    SKELETAL_MUSCLE,
    SOFT_TISSUE,
    SPINAL_CORD,
    SPLEEN,
    SUBCUTANEOUS_FAT,
    URINARY_BLADDER,
    VERTEBRA_L5,
    VERTEBRA_LEVELS,
    make_phantom,
)
from napari_dagman.core.volume import Volume

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data"
LUNGS = (10, 11, 12, 13, 14)
VERTEBRAE = tuple(VERTEBRA_L5 + k for k in range(len(VERTEBRA_LEVELS)))
RIBS = tuple(RIB_LEFT_1 + n - 1 for n in RIB_NUMBERS) + tuple(RIB_RIGHT_1 + n - 1 for n in RIB_NUMBERS)


@pytest.fixture(scope="module")
def phantom() -> tuple[Volume, Volume]:
    return make_phantom()


def _mask(labels: Volume, *ids: int) -> np.ndarray:
    return np.isin(labels.array, ids)


def _median(ct: Volume, labels: Volume, *ids: int) -> float:
    return float(np.median(ct.array[_mask(labels, *ids)]))


def _centroid(labels: Volume, *ids: int) -> np.ndarray:
    """Physical (z, y, x) mm centre of mass; LPS, so larger z is superior, larger y posterior, larger x left."""
    return labels.index_to_physical(np.argwhere(_mask(labels, *ids)).mean(axis=0))


def _volume_ml(labels: Volume, *ids: int) -> float:
    return float(_mask(labels, *ids).sum() * np.prod(labels.spacing) / 1000.0)


# --- determinism ----------------------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_arrays(phantom: tuple[Volume, Volume]) -> None:
    ct, labels = phantom
    ct2, labels2 = make_phantom()
    assert np.array_equal(ct.array, ct2.array)
    assert np.array_equal(labels.array, labels2.array)
    assert labels.metadata["label_names"] == labels2.metadata["label_names"]


def test_other_seed_gives_other_arrays_with_the_same_organs(phantom: tuple[Volume, Volume]) -> None:
    ct, labels = phantom
    ct1, labels1 = make_phantom(seed=1)
    assert not np.array_equal(ct.array, ct1.array)
    assert not np.array_equal(labels.array, labels1.array)
    # organs move and change size a little, but not wholesale
    changed = np.mean(labels.array != labels1.array)
    assert 0.001 < changed < 0.2
    assert set(labels1.metadata["label_names"]) == set(labels.metadata["label_names"])
    assert abs(_volume_ml(labels1, LIVER) / _volume_ml(labels, LIVER) - 1.0) < 0.4


def test_anatomy_does_not_depend_on_noise_level(phantom: tuple[Volume, Volume]) -> None:
    _, labels = phantom
    _, quiet_labels = make_phantom(noise_hu=0.0)
    assert np.array_equal(labels.array, quiet_labels.array)


# --- grid and metadata ----------------------------------------------------------------------------------
def test_ct_and_labels_share_the_grid(phantom: tuple[Volume, Volume]) -> None:
    ct, labels = phantom
    assert ct.same_grid(labels)
    assert ct.shape == (96, 128, 128)
    assert ct.spacing == (3.0, 2.5, 2.5)
    assert ct.array.dtype == np.int16
    assert labels.array.dtype == np.uint8
    assert ct.is_axis_aligned_lps
    # centred on (0, 0, 0) mm
    centre = ct.index_to_physical((np.array(ct.shape) - 1) / 2.0)
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)
    assert ct.metadata["name"] == "phantom_ct"
    assert labels.metadata["name"] == "phantom_labels"


def test_other_shapes_and_spacings(phantom: tuple[Volume, Volume]) -> None:
    ct, labels = make_phantom((24, 40, 36), (9.0, 6.0, 7.0), seed=2, noise_hu=5.0)
    assert ct.shape == labels.shape == (24, 40, 36)
    assert ct.spacing == (9.0, 6.0, 7.0)
    present = set(labels.metadata["label_names"])
    assert {LIVER, SPLEEN, URINARY_BLADDER, AORTA, *LUNGS} <= present
    assert present <= set(PHANTOM_LABELS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (4, 64, 64)},
        {"shape": (32, 32)},
        {"spacing": (0.0, 1.0, 1.0)},
        {"spacing": (1.0, float("nan"), 1.0)},
        {"noise_hu": -1.0},
    ],
)
def test_bad_arguments_raise_a_clear_error(kwargs: dict) -> None:
    with pytest.raises(DagmanInputError):
        make_phantom(**kwargs)


# --- labels ---------------------------------------------------------------------------------------------
def test_label_table_is_complete_and_honest(phantom: tuple[Volume, Volume]) -> None:
    _, labels = phantom
    present = {int(i) for i in np.unique(labels.array)} - {0}
    names = labels.metadata["label_names"]
    assert set(names) == present
    # every class the table promises really appears in the default phantom, and nothing else does
    assert present == set(PHANTOM_LABELS)
    assert all(names[i] == PHANTOM_LABELS[i] for i in present)
    for i, name in PHANTOM_LABELS.items():
        if i < 200:
            assert TOTALSEG_V2[i] == name
        else:
            assert name not in TOTALSEG_V2.values()
    assert set(PHANTOM_HU) == set(PHANTOM_LABELS) | {0}


def test_vertebrae_and_ribs_are_labelled_by_level(phantom: tuple[Volume, Volume]) -> None:
    _, labels = phantom
    assert [PHANTOM_LABELS[i] for i in VERTEBRAE] == [f"vertebrae_{v}" for v in VERTEBRA_LEVELS]
    heights = [_centroid(labels, i)[0] for i in VERTEBRAE]
    assert np.all(np.diff(heights) > 15.0)  # stacked upwards, L5 lowest, one body height apart
    for n in RIB_NUMBERS:
        left, right = _centroid(labels, RIB_LEFT_1 + n - 1), _centroid(labels, RIB_RIGHT_1 + n - 1)
        assert PHANTOM_LABELS[RIB_LEFT_1 + n - 1] == f"rib_left_{n}"
        assert left[2] > 40.0 and right[2] < -40.0  # x runs to the patient's left
    rib_heights = [_centroid(labels, RIB_LEFT_1 + n - 1)[0] for n in RIB_NUMBERS]
    assert np.all(np.diff(rib_heights) < 0)  # rib 6 highest, rib 12 lowest


# --- HU values ------------------------------------------------------------------------------------------
def test_organ_hu_values_are_realistic(phantom: tuple[Volume, Volume]) -> None:
    ct, labels = phantom
    assert _median(ct, labels, *LUNGS) < -700
    assert -150 <= _median(ct, labels, SUBCUTANEOUS_FAT) <= -60
    assert 40 <= _median(ct, labels, LIVER) <= 80
    assert 35 <= _median(ct, labels, SPLEEN) <= 65
    assert 15 <= _median(ct, labels, KIDNEY_LEFT, KIDNEY_RIGHT) <= 45
    assert 30 <= _median(ct, labels, SKELETAL_MUSCLE) <= 60
    assert 25 <= _median(ct, labels, HEART) <= 55
    assert 25 <= _median(ct, labels, AORTA) <= 60
    assert -10 <= _median(ct, labels, URINARY_BLADDER) <= 25
    assert 0 <= _median(ct, labels, SOFT_TISSUE) <= 35
    assert 0 <= _median(ct, labels, SPINAL_CORD) <= 60
    assert _median(ct, labels, *VERTEBRAE) > 200
    assert _median(ct, labels, *RIBS) > 200
    assert np.percentile(ct.array[_mask(labels, *VERTEBRAE)], 95) > 500  # cortical bone
    assert _median(ct, labels, 0) < -900  # air outside the body
    assert np.median(ct.array[:, :, :4]) < -900 and np.median(ct.array[:, :4, :]) < -900
    # small dense structures in the lungs: partial-volume blurred, but far brighter than the parenchyma
    assert _median(ct, labels, LUNG_VESSELS) > _median(ct, labels, *LUNGS) + 300
    assert ct.array[_mask(labels, LUNG_NODULE)].max() > -100
    # liver vessels are darker than the parenchyma: the liver is not flat
    assert np.percentile(ct.array[_mask(labels, LIVER)], 5) < 40


def test_organs_differ_in_intensity(phantom: tuple[Volume, Volume]) -> None:
    ct, labels = phantom
    liver, spleen = _median(ct, labels, LIVER), _median(ct, labels, SPLEEN)
    kidney, bladder = _median(ct, labels, KIDNEY_LEFT, KIDNEY_RIGHT), _median(ct, labels, URINARY_BLADDER)
    assert liver > spleen > kidney > bladder


def test_noise_is_close_to_noise_hu_in_a_homogeneous_region(phantom: tuple[Volume, Volume]) -> None:
    ct, labels = phantom
    core = ndimage.binary_erosion(labels.array == URINARY_BLADDER, iterations=3)  # no edges, no texture
    assert core.sum() > 500
    assert abs(ct.array[core].std() / 12.0 - 1.0) < 0.4
    quiet, _ = make_phantom(noise_hu=0.0)
    assert quiet.array[core].std() < 2.0
    loud, _ = make_phantom(noise_hu=30.0)
    assert abs(loud.array[core].std() / 30.0 - 1.0) < 0.4
    # spatially correlated: neighbouring voxels are alike, unlike white noise
    diff = (loud.array.astype(float) - quiet.array)[core]
    shifted = (loud.array.astype(float) - quiet.array)[np.roll(core, 1, axis=2)]
    assert np.corrcoef(diff, shifted)[0, 1] > 0.2


# --- anatomy ------------------------------------------------------------------------------------------
def test_organ_volumes_are_plausible(phantom: tuple[Volume, Volume]) -> None:
    _, labels = phantom
    solid = {i: _volume_ml(labels, i) for i in (LIVER, SPLEEN, KIDNEY_LEFT, KIDNEY_RIGHT)}
    assert max(solid, key=solid.get) == LIVER
    assert 300 < solid[LIVER] < 2500
    assert 40 < solid[SPLEEN] < 400
    assert 40 < solid[KIDNEY_LEFT] < 300 and 40 < solid[KIDNEY_RIGHT] < 300
    assert 1000 < _volume_ml(labels, *LUNGS) < 6000
    assert 50 < _volume_ml(labels, URINARY_BLADDER) < 700
    assert 100 < _volume_ml(labels, HEART) < 900
    assert 20 < _volume_ml(labels, AORTA) < 200
    assert _volume_ml(labels, LUNG_VESSELS) > 10
    # the nodule is 8-12 mm across (equivalent sphere of its labelled voxels, with a voxel's slack)
    diameter = 2.0 * (3.0 * _volume_ml(labels, LUNG_NODULE) * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    assert 5.0 < diameter < 15.0
    assert ndimage.label(labels.array == LUNG_NODULE)[1] == 1


def test_anatomy_is_in_the_right_place(phantom: tuple[Volume, Volume]) -> None:
    _, labels = phantom
    z, y, x = 0, 1, 2
    liver, spleen = _centroid(labels, LIVER), _centroid(labels, SPLEEN)
    lungs, bladder = _centroid(labels, *LUNGS), _centroid(labels, URINARY_BLADDER)
    kidney_r, kidney_l = _centroid(labels, KIDNEY_RIGHT), _centroid(labels, KIDNEY_LEFT)
    aorta, spine = _centroid(labels, AORTA), _centroid(labels, *VERTEBRAE)
    heart, cord = _centroid(labels, HEART), _centroid(labels, SPINAL_CORD)
    # z: bladder low in the pelvis, kidneys, liver under the lungs, heart among the lungs
    assert bladder[z] < kidney_r[z] < liver[z] < lungs[z]
    assert bladder[z] < kidney_l[z] < spleen[z] < lungs[z]
    assert heart[z] > liver[z]
    assert (labels.array[: labels.shape[0] // 4] == URINARY_BLADDER).any()
    assert not np.isin(labels.array[: labels.shape[0] // 3], LUNGS).any()
    # x: liver on the patient's right (negative x in LPS), spleen on the left
    assert liver[x] < 0 < spleen[x]
    assert kidney_r[x] < 0 < kidney_l[x]
    assert _centroid(labels, 12, 13, 14)[x] < 0 < _centroid(labels, 10, 11)[x]
    # y: aorta in front of the spine, cord behind the vertebral bodies, kidneys behind the liver, bladder in front
    assert aorta[y] < spine[y] < cord[y]
    assert kidney_r[y] > liver[y]
    assert bladder[y] < spine[y]
    # lung lobes: lower lobes behind and below the upper lobes, middle lobe in front
    assert _centroid(labels, 11)[z] < _centroid(labels, 10)[z]
    assert _centroid(labels, 14)[y] > _centroid(labels, 12)[y] > _centroid(labels, 13)[y]


def test_nodule_and_vessels_sit_inside_the_lungs(phantom: tuple[Volume, Volume]) -> None:
    _, labels = phantom
    nodule = labels.array == LUNG_NODULE
    shell = ndimage.binary_dilation(nodule, iterations=2) & ~nodule
    assert np.isin(labels.array[shell], (*LUNGS, LUNG_VESSELS)).all()
    vessels = labels.array == LUNG_VESSELS
    around = ndimage.binary_dilation(vessels) & ~vessels
    assert np.isin(labels.array[around], (*LUNGS, LUNG_NODULE)).mean() > 0.7


# --- the files in sample_data/ and the napari sample provider ------------------------------------------------
def test_sample_data_files_match_the_generator() -> None:
    ct_path, labels_path = SAMPLE_DIR / "phantom_ct.nii.gz", SAMPLE_DIR / "phantom_labels.nii.gz"
    assert ct_path.is_file() and labels_path.is_file(), "run: python scripts/make_sample_data.py"
    assert (SAMPLE_DIR / "phantom_labels.labels.json").is_file()
    assert (SAMPLE_DIR / "README.md").is_file()
    assert sum(f.stat().st_size for f in SAMPLE_DIR.iterdir()) < 3e6
    ct_file, labels_file = read_volume(ct_path), read_volume(labels_path)
    ct, labels = make_phantom(**SAMPLE_FILE_PARAMS)
    assert ct_file.same_grid(ct) and labels_file.same_grid(labels)
    assert ct_file.array.dtype == np.int16 and labels_file.array.dtype == np.uint8
    assert labels_file.metadata["label_names"] == labels.metadata["label_names"]
    # bit-identical where the files were made; elsewhere, a CPU whose exp/sin differ in the last bit may move
    # a voxel or two across an organ boundary, so allow a handful (a stale folder differs in thousands)
    assert np.count_nonzero(labels_file.array != labels.array) <= 20
    assert np.count_nonzero(np.abs(ct_file.array.astype(np.int32) - ct.array) > 1) <= 20


def test_sample_phantom_provider_gives_image_and_labels_layers() -> None:
    from napari_dagman._sample_data import sample_phantom

    layers = sample_phantom()
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    (ct, ct_kwargs, _), (labels, labels_kwargs, _) = layers
    assert ct.shape == labels.shape == (96, 128, 128)
    assert ct_kwargs["name"] == "phantom CT" and labels_kwargs["name"] == "phantom organs"
    assert list(ct_kwargs["scale"]) == list(labels_kwargs["scale"]) == [3.0, 2.5, 2.5]
    assert list(ct_kwargs["translate"]) == list(labels_kwargs["translate"])
    names = set(labels_kwargs["features"]["name"])
    assert {"liver", "spleen", "kidney_left", "urinary_bladder", "aorta", "lung_nodule"} <= names
    assert labels_kwargs["metadata"]["label_names"] == {i: PHANTOM_LABELS[i] for i in PHANTOM_LABELS}
