"""Organ names and colours; CT windows (display) vs model normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.labels import (
    TOTALSEG_V2,
    colour_dict,
    default_names,
    label_table,
    names_in,
    organ_colour,
)
from napari_dagman.core.windowing import WINDOW_PRESETS, normalize_hu, window_limits


def test_totalsegmentator_v2_map(shared_data):
    import json

    official = json.loads((shared_data / "labels.json").read_text())
    assert len(TOTALSEG_V2) == 117
    assert all(TOTALSEG_V2[int(k)] == v for k, v in official.items() if k != "0")


def test_default_names_are_generic_unless_the_user_says_totalsegmentator(monkeypatch):
    names, source = default_names([0, 1, 5, 117])  # ids that fit TotalSegmentator are not a reason to use its names
    assert source == "generic" and names == {1: "label_1", 5: "label_5", 117: "label_117"}
    monkeypatch.setenv("NAPARI_DAGMAN_TOTALSEGMENTATOR", "1")
    names, source = default_names([0, 1, 5, 117])
    assert source == "totalsegmentator_v2" and names == {1: "spleen", 5: "liver", 117: "costal_cartilages"}
    names, source = default_names([1, 300])
    assert source == "generic" and names == {1: "label_1", 300: "label_300"}


def test_label_table_and_colours_are_stable_per_organ_name():
    table = label_table([5, 1], {5: "liver", 1: "spleen"})
    assert table["index"].tolist() == [0, 1, 5]
    assert table["name"].tolist() == ["background", "spleen", "liver"]
    # the same organ keeps its colour whatever id a file gives it
    a = colour_dict({5: "liver"})[5]
    b = colour_dict({42: "liver"})[42]
    np.testing.assert_allclose(a, b)
    assert organ_colour("kidney_left") != organ_colour("liver")
    assert organ_colour("some_new_structure") == organ_colour("some_new_structure")
    assert colour_dict({1: "spleen"})[0][3] == 0  # background transparent


def test_names_in_prefers_given_names():
    arr = np.array([[[0, 1, 5]]])
    assert names_in(arr, {1: "my organ"}) == {1: "my organ", 5: "label_5"}  # never a guessed name


def test_window_presets_and_custom():
    assert window_limits("lung") == (-1350.0, 150.0)
    assert window_limits("abdomen") == (-160.0, 240.0)
    assert window_limits("custom", width=100, level=30) == (-20.0, 80.0)
    assert set(WINDOW_PRESETS) >= {"abdomen", "lung", "bone", "brain", "liver", "mediastinum"}
    with pytest.raises(DagmanInputError):
        window_limits("nope")
    with pytest.raises(DagmanInputError):
        window_limits("custom", width=-5, level=0)


def test_model_normalisation_is_clipped_and_linear():
    hu = np.array([-1000, -175, 37.5, 250, 3000], dtype=np.float32)
    np.testing.assert_allclose(normalize_hu(hu), [0.0, 0.0, 0.5, 1.0, 1.0])


#: Organs that touch on a CT (a slice or a 3D view shows them side by side): a chest CT's heart and great vessels
#: and lung lobes, the abdomen's neighbours. Issue 27: heart and aorta were both crimson, and the lobes of one lung
#: shared one colour.
TOUCHING = [
    ("heart", "aorta"), ("heart", "pulmonary_artery"), ("aorta", "pulmonary_artery"), ("heart", "pulmonary_vein"),
    ("aorta", "pulmonary_vein"), ("heart", "atrial_appendage_left"), ("heart", "superior_vena_cava"),
    ("aorta", "superior_vena_cava"), ("pulmonary_artery", "superior_vena_cava"), ("heart", "esophagus"),
    ("aorta", "esophagus"), ("trachea", "esophagus"), ("trachea", "lung_upper_lobe_right"),
    ("lung_upper_lobe_right", "lung_middle_lobe_right"), ("lung_middle_lobe_right", "lung_lower_lobe_right"),
    ("lung_upper_lobe_left", "lung_lower_lobe_left"), ("heart", "lung_lower_lobe_left"), ("heart", "liver"),
    ("liver", "gallbladder"), ("liver", "inferior_vena_cava"), ("liver", "kidney_right"),
    ("kidney_right", "adrenal_gland_right"), ("kidney_left", "adrenal_gland_left"), ("spleen", "stomach"),
    ("stomach", "pancreas"), ("pancreas", "duodenum"), ("duodenum", "small_bowel"), ("small_bowel", "colon"),
    ("liver", "portal_vein_and_splenic_vein"), ("pancreas", "portal_vein_and_splenic_vein"),
]  # fmt: skip


def test_organs_that_touch_get_colours_told_apart_at_a_glance():
    """CIEDE2000 colour difference of at least 15 (about 10 is 'another colour' at a glance)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    from napari_dagman.core.labels import organ_colour

    def lab(name):
        return rgb2lab(np.array(organ_colour(name)[:3])[None, None])[0, 0]

    close = {(a, b): round(float(deltaE_ciede2000(lab(a), lab(b))), 1) for a, b in TOUCHING}
    assert {pair: d for pair, d in close.items() if d < 15} == {}


def test_every_pair_of_touching_organs_in_the_shared_label_maps_is_told_apart(shared_data):
    """Organs whose voxels share a face in the three shared TotalSegmentator maps (144 pairs: vertebrae and their
    neighbours, hip and femur, the bowel) get colours at least 15 apart (CIEDE2000)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    from napari_dagman.core.io import read_volume
    from napari_dagman.core.labels import TOTALSEG_V2, organ_colour

    touching: set[tuple[int, int]] = set()
    for name in ("example_seg_fast_force_split.nii.gz", "example_seg_dicom.nii.gz", "example_seg.nii.gz"):
        ids = read_volume(shared_data / name).array.astype(np.int32)
        for axis in range(3):
            a = np.moveaxis(ids, axis, 0)
            lower, upper = a[:-1].ravel(), a[1:].ravel()
            face = (lower != upper) & (lower > 0) & (upper > 0)
            touching |= set(map(tuple, np.unique(np.sort(np.stack([lower[face], upper[face]], 1), axis=1), axis=0)))

    def lab(name):
        return rgb2lab(np.array(organ_colour(name)[:3])[None, None])[0, 0]

    assert len(touching) > 100
    close = {
        (TOTALSEG_V2[p], TOTALSEG_V2[q]): round(float(deltaE_ciede2000(lab(TOTALSEG_V2[p]), lab(TOTALSEG_V2[q]))), 1)
        for p, q in touching
    }
    assert {pair: d for pair, d in close.items() if d < 15} == {}


def test_a_ct_opens_in_the_window_of_its_body_region_or_its_own_dicom_window(shared_data):
    """Issue 27: the default window was abdomen for every CT, a chest CT included."""
    from napari_dagman._layers import image_layer_data
    from napari_dagman.core.io import read_volumes
    from napari_dagman.core.phantom import make_phantom
    from napari_dagman.core.volume import Volume
    from napari_dagman.core.windowing import body_region, opening_window

    ct, labels = make_phantom()
    lung_ids = [i for i, name in labels.metadata["label_names"].items() if name.startswith("lung_") and "lobe" in name]
    lung_slices = np.flatnonzero(np.isin(labels.array, lung_ids).any(axis=(1, 2)))
    chest = Volume(ct.array[lung_slices], spacing=ct.spacing)
    assert body_region(chest.array) == "chest"
    _, kwargs, _ = image_layer_data(chest)
    assert kwargs["metadata"]["window"] == "mediastinum"
    assert tuple(kwargs["contrast_limits"]) == WINDOW_PRESETS["mediastinum"].limits
    # the real abdominal CT (lung bases included) stays abdominal
    abdomen = read_volumes(shared_data / "example_ct.nii.gz")[0]
    assert opening_window(abdomen.array, abdomen.metadata)[0] == "abdomen"
    # a DICOM series opens in its own window (WindowCenter 40\300, WindowWidth 300\1500: the first pair)
    series = read_volumes(shared_data / "example_ct_dicom")[0]
    name, limits, why = opening_window(series.array, series.metadata)
    assert (name, limits) == ("custom", (-110.0, 190.0)) and "DICOM" in why
    # a preset asked for wins
    assert image_layer_data(series, window="lung")[1]["metadata"]["window"] == "lung"
