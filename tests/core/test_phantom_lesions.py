"""Lesions in the phantom and the lesion-classification cohort (issue 25): determinism, placement, balance, no
overlap, the two kinds equal in mean HU but not in texture and shape, and a table that points at them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import read_volume
from napari_dagman.core.phantom import (
    LESION_CLASSES,
    LIVER,
    SPLEEN,
    Lesion,
    add_lesions,
    make_lesion_cohort,
    make_phantom,
)
from napari_dagman.core.phantom.lesions import LESION_HU, TABLE_COLUMNS, _add_lesions, _cohort_case
from napari_dagman.core.volume import Volume

COARSE = {"shape": (48, 64, 64), "spacing": (6.0, 5.0, 5.0)}  # the cohort's default grid
FINE = {"shape": (96, 128, 128), "spacing": (3.0, 2.5, 2.5)}  # where the shape shows
ORGANS = (LIVER, SPLEEN)


@pytest.fixture(scope="module")
def coarse() -> tuple[Volume, Volume, Volume, list[Lesion], np.ndarray]:
    ct, labels = make_phantom(**COARSE, seed=1)
    out, lesions, owner = _add_lesions(ct, labels, 10, 7)
    return ct, labels, out, lesions, owner


@pytest.fixture(scope="module")
def fine() -> tuple[Volume, Volume, Volume, list[Lesion], np.ndarray]:
    ct, labels = make_phantom(**FINE, seed=2)
    out, lesions, owner = _add_lesions(ct, labels, 12, 5)
    return ct, labels, out, lesions, owner


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_lesion_cohort(tmp_path_factory.mktemp("cohort"), cases=2, lesions_per_case=8, seed=3)


def _centre_index(volume: Volume, lesion: Lesion) -> tuple[int, int, int]:
    index = volume.physical_to_index(lesion.centre_zyx_mm)
    assert np.allclose(index, np.rint(index), atol=1e-6), "a lesion's centre is a voxel centre"
    return tuple(int(i) for i in np.rint(index))  # type: ignore[return-value]


def _per_kind(lesions: list[Lesion], values: list[float]) -> dict[str, np.ndarray]:
    pairs = list(zip(lesions, values, strict=True))
    return {k: np.array([v for x, v in pairs if x.kind == k]) for k in LESION_CLASSES}


def _extent(mask: np.ndarray, centre: tuple[int, int, int], spacing: tuple[float, ...]) -> float:
    """Farthest lesion voxel from the centre over the radius of a ball of the lesion's volume: 1 for a ball,
    more for anything with spikes."""
    offsets = (np.argwhere(mask) - np.array(centre)) * np.array(spacing)
    equivalent = (3.0 * mask.sum() * np.prod(spacing) / (4.0 * np.pi)) ** (1.0 / 3.0)
    return float(np.linalg.norm(offsets, axis=1).max() / equivalent)


def _best_threshold_accuracy(values: np.ndarray, spiculated: np.ndarray) -> float:
    """Accuracy of the best one-feature threshold classifier (either direction), on the data it is fit on."""
    best = 0.0
    for t in np.unique(values):
        above = values >= t
        best = max(best, float((above == spiculated).mean()), float((above != spiculated).mean()))
    return best


# --- determinism and the API ------------------------------------------------------------------------------
def test_same_seed_same_lesions_other_seed_other_lesions(coarse):
    ct, labels, out, lesions, _ = coarse
    before = ct.array.copy()
    again, lesions_again = add_lesions(ct, labels, 10, 7)
    assert np.array_equal(again.array, out.array)
    assert lesions_again == lesions
    assert np.array_equal(ct.array, before), "the input CT is not changed"
    other, other_lesions = add_lesions(ct, labels, 10, 8)
    assert other_lesions != lesions
    assert not np.array_equal(other.array, out.array)


def test_new_ct_on_the_same_grid_changed_only_inside_organs(coarse):
    ct, labels, out, lesions, _ = coarse
    assert out.array.dtype == np.int16
    assert out.same_grid(ct)
    assert out.metadata["phantom_seed"] == 1 and out.metadata["lesion_seed"] == 7
    assert len(out.metadata["lesions"]) == len(lesions) == 10
    changed = out.array != ct.array
    assert changed.sum() > 10 * 3
    assert np.isin(labels.array[changed], ORGANS).all(), "lesions are painted only on liver and spleen"


def test_centres_are_voxels_of_their_lesion_inside_an_organ(coarse, fine):
    for ct, labels, _, lesions, owner in (coarse, fine):
        in_liver = 0
        for k, lesion in enumerate(lesions):
            assert lesion.kind in LESION_CLASSES
            assert 10.0 <= lesion.diameter_mm <= 20.0
            assert ct.contains(lesion.centre_zyx_mm)
            index = _centre_index(ct, lesion)
            assert labels.array[index] in ORGANS
            assert owner[index] == k + 1, "the centre voxel belongs to its lesion"
            in_liver += labels.array[index] == LIVER
            # the body is inside the organ: every voxel of the lesion is organ, and it is not cut to a sliver
            mask = owner == k + 1
            assert np.isin(labels.array[mask], ORGANS).all()
            ball = np.pi / 6.0 * lesion.diameter_mm**3 / np.prod(ct.spacing)
            assert mask.sum() >= 0.25 * ball
        assert in_liver >= len(lesions) // 2, "the liver is preferred"


def test_kinds_balanced_and_shuffled(coarse):
    ct, labels, _, lesions, _ = coarse
    kinds = [x.kind for x in lesions]
    assert kinds.count("smooth") == kinds.count("spiculated") == 5
    assert kinds != ["smooth", "spiculated"] * 5 and kinds != ["spiculated", "smooth"] * 5
    _, odd = add_lesions(ct, labels, 7, 1)
    assert sorted(sum(x.kind == k for x in odd) for k in LESION_CLASSES) == [3, 4]
    _, one = add_lesions(ct, labels, 4, 1, kinds=("spiculated",))
    assert [x.kind for x in one] == ["spiculated"] * 4
    _, none = add_lesions(ct, labels, 0, 1)
    assert none == []


def test_lesions_neither_overlap_nor_touch(coarse, fine):
    for ct, _, out, lesions, owner in (coarse, fine):
        for k in range(len(lesions)):
            near = ndimage.binary_dilation(owner == k + 1, np.ones((3, 3, 3), bool))
            assert set(np.unique(owner[near]).tolist()) <= {0, k + 1}
        # every voxel the lesions changed, partial volume included, belongs to the blob of one lesion only
        blobs, n = ndimage.label(out.array != ct.array, np.ones((3, 3, 3), bool))
        seen: dict[int, int] = {}
        for k in range(len(lesions)):
            for blob in np.unique(blobs[(owner == k + 1) & (blobs > 0)]).tolist():
                assert seen.setdefault(blob, k) == k, f"lesions {seen[blob]} and {k} touch"
        assert n >= len(lesions)


# --- what tells the kinds apart, and what must not --------------------------------------------------------
def test_same_mean_hu_and_visible(coarse, fine):
    for ct, labels, out, lesions, owner in (coarse, fine):
        hu = out.array.astype(float)
        means = [float(hu[owner == k + 1].mean()) for k in range(len(lesions))]
        assert np.allclose(means, LESION_HU, atol=0.5), "every lesion is calibrated to the same mean HU"
        by_kind = _per_kind(lesions, means)
        assert abs(by_kind["smooth"].mean() - by_kind["spiculated"].mean()) < 1.0
        spiculated = np.array([x.kind == "spiculated" for x in lesions])
        assert _best_threshold_accuracy(np.round(means), spiculated) <= 0.7
        # hypodense enough to be seen through the default noise (12 HU): 2 noise SDs below every organ
        for organ in ORGANS:
            assert np.median(ct.array[labels.array == organ]) - LESION_HU >= 24.0
        # nor does the mean in a ball of the table's size tell them apart
        zz, yy, xx = np.indices(out.shape)
        ball_means = []
        for lesion in lesions:
            c = out.physical_to_index(lesion.centre_zyx_mm)
            d2 = sum(((g - ci) * s) ** 2 for g, ci, s in zip((zz, yy, xx), c, out.spacing, strict=True))
            ball_means.append(float(hu[d2 <= (lesion.diameter_mm / 2.0) ** 2].mean()))
        balls = _per_kind(lesions, ball_means)
        assert abs(balls["smooth"].mean() - balls["spiculated"].mean()) < 5.0


def test_texture_differs_at_the_cohort_grid_and_shape_on_a_finer_one(coarse, fine):
    for _, _, out, lesions, owner in (coarse, fine):
        hu = out.array.astype(float)
        std = _per_kind(lesions, [float(hu[owner == k + 1].std()) for k in range(len(lesions))])
        assert std["spiculated"].mean() > 1.6 * std["smooth"].mean()
        spiculated = np.array([x.kind == "spiculated" for x in lesions])
        stds = np.array([float(hu[owner == k + 1].std()) for k in range(len(lesions))])
        assert _best_threshold_accuracy(stds, spiculated) >= 0.9
    ct, _, out, lesions, owner = fine
    extent = _per_kind(
        lesions, [_extent(owner == k + 1, _centre_index(ct, x), ct.spacing) for k, x in enumerate(lesions)]
    )
    assert extent["smooth"].max() < 1.2 < extent["spiculated"].min(), extent


# --- the cohort -----------------------------------------------------------------------------------------
def test_cohort_table_points_at_the_lesions(cohort):
    folder = cohort.parent
    assert cohort.name == "lesions.csv"
    with open(cohort, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == TABLE_COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * 8
    assert sorted({r["patient"] for r in rows}) == ["case_000", "case_001"]
    assert sorted(p.name for p in folder.iterdir()) == ["case_000.nii.gz", "case_001.nii.gz", "lesions.csv"]
    balls = []
    for case, patient in enumerate(("case_000", "case_001")):
        mine = [r for r in rows if r["patient"] == patient]
        assert {r["image"] for r in mine} == {f"{patient}.nii.gz"}
        assert sorted(r["label"] for r in mine) == ["smooth"] * 4 + ["spiculated"] * 4
        ct = read_volume(folder / mine[0]["image"])  # the image is named relative to the table's folder
        # the file is the case as painted in memory, and each row's x, y, z is a voxel of its lesion there
        painted, lesions, owner = _cohort_case(3, case, 8, COARSE["shape"], COARSE["spacing"], 12.0)
        assert np.array_equal(ct.array, painted.array) and ct.same_grid(painted)
        assert [r["label"] for r in mine] == [x.kind for x in lesions]
        for k, (r, lesion) in enumerate(zip(mine, lesions, strict=True)):
            centre = (float(r["z"]), float(r["y"]), float(r["x"]))  # x is the last coordinate
            assert np.allclose(centre, lesion.centre_zyx_mm, atol=1e-3)
            assert float(r["size"]) == pytest.approx(lesion.diameter_mm)
            index = ct.physical_to_index(centre)
            assert np.allclose(index, np.rint(index), atol=1e-3)
            voxel = tuple(int(i) for i in np.rint(index))
            assert owner[voxel] == k + 1
            zz, yy, xx = np.indices(ct.shape)
            d2 = sum(((g - i) * s) ** 2 for g, i, s in zip((zz, yy, xx), voxel, ct.spacing, strict=True))
            balls.append(float(ct.array[d2 <= (float(r["size"]) / 2.0) ** 2].mean()))
    # read back from the files, the balls the table points at hold lesions, well below liver and spleen
    assert np.mean(balls) < LESION_HU + 10.0


def test_cohort_is_deterministic_and_matches_add_lesions(tmp_path):
    a = make_lesion_cohort(tmp_path / "a", cases=1, lesions_per_case=4, seed=5)
    b = make_lesion_cohort(tmp_path / "b", cases=1, lesions_per_case=4, seed=5)
    c = make_lesion_cohort(tmp_path / "c", cases=1, lesions_per_case=4, seed=6)
    assert a.read_text() == b.read_text() != c.read_text()
    ct_a, ct_b = (read_volume(p.parent / "case_000.nii.gz") for p in (a, b))
    assert np.array_equal(ct_a.array, ct_b.array)
    assert ct_a.array.dtype == np.int16 and ct_a.spacing == (6.0, 5.0, 5.0)


# --- refusals ---------------------------------------------------------------------------------------------
def test_bad_requests_are_refused(coarse, tmp_path):
    ct, labels, _, _, _ = coarse
    with pytest.raises(DagmanInputError, match="kinds"):
        add_lesions(ct, labels, 2, 0, kinds=("round",))
    with pytest.raises(DagmanInputError, match="diameters"):
        add_lesions(ct, labels, 2, 0, diameter_mm=(20.0, 10.0))
    with pytest.raises(DagmanInputError, match=">= 0"):
        add_lesions(ct, labels, -1, 0)
    with pytest.raises(DagmanInputError, match="grid"):
        add_lesions(ct, Volume(labels.array, (5.0, 5.0, 5.0), labels.origin), 2, 0)
    with pytest.raises(DagmanInputError, match="no room"):
        add_lesions(ct, labels, 200, 0)
    with pytest.raises(DagmanInputError, match="none of the organs"):
        add_lesions(ct, labels.with_array(np.zeros_like(labels.array)), 2, 0)
    with pytest.raises(DagmanInputError, match="at least 1 case"):
        make_lesion_cohort(tmp_path, cases=0)
