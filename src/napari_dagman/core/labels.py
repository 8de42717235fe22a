"""Organ names and colours for label maps.

TotalSegmentator's v2 "total" class map (117 classes; the names are TotalSegmentator's, Apache-2.0, reproduced) names
the ids of a map only when the user says it is TotalSegmentator's or its masks are named so (`core.label_names`,
`core.datasets`); otherwise names are read, never guessed. Colours are keyed by organ *name*, so an organ has the
same colour whatever id a file gives it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

# Ids 1..117 in order; 0 is background.
TOTALSEG_V2_NAMES: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus",
    "trachea",
    "thyroid_gland",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "sacrum",
    "vertebrae_S1",
    "vertebrae_L5",
    "vertebrae_L4",
    "vertebrae_L3",
    "vertebrae_L2",
    "vertebrae_L1",
    "vertebrae_T12",
    "vertebrae_T11",
    "vertebrae_T10",
    "vertebrae_T9",
    "vertebrae_T8",
    "vertebrae_T7",
    "vertebrae_T6",
    "vertebrae_T5",
    "vertebrae_T4",
    "vertebrae_T3",
    "vertebrae_T2",
    "vertebrae_T1",
    "vertebrae_C7",
    "vertebrae_C6",
    "vertebrae_C5",
    "vertebrae_C4",
    "vertebrae_C3",
    "vertebrae_C2",
    "vertebrae_C1",
    "heart",
    "aorta",
    "pulmonary_vein",
    "brachiocephalic_trunk",
    "subclavian_artery_right",
    "subclavian_artery_left",
    "common_carotid_artery_right",
    "common_carotid_artery_left",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "atrial_appendage_left",
    "superior_vena_cava",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
    "humerus_left",
    "humerus_right",
    "scapula_left",
    "scapula_right",
    "clavicula_left",
    "clavicula_right",
    "femur_left",
    "femur_right",
    "hip_left",
    "hip_right",
    "spinal_cord",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "autochthon_left",
    "autochthon_right",
    "iliopsoas_left",
    "iliopsoas_right",
    "brain",
    "skull",
    "rib_left_1",
    "rib_left_2",
    "rib_left_3",
    "rib_left_4",
    "rib_left_5",
    "rib_left_6",
    "rib_left_7",
    "rib_left_8",
    "rib_left_9",
    "rib_left_10",
    "rib_left_11",
    "rib_left_12",
    "rib_right_1",
    "rib_right_2",
    "rib_right_3",
    "rib_right_4",
    "rib_right_5",
    "rib_right_6",
    "rib_right_7",
    "rib_right_8",
    "rib_right_9",
    "rib_right_10",
    "rib_right_11",
    "rib_right_12",
    "sternum",
    "costal_cartilages",
)

TOTALSEG_V2: dict[int, str] = {i + 1: name for i, name in enumerate(TOTALSEG_V2_NAMES)}

# Hand-picked colours (RGB 0-255) for the organs users look at most, chosen to be told apart on a grey CT;
# matched by the start of the organ name, so "kidney_left" and "kidney_right" share the kidney hue family.
#: Curated organ colours (RGB 0-255), matched by name prefix. Chosen to tell apart the organs that meet in one
#: picture (a Labels layer, the organ-clusters scatter): the older anatomical palette had liver, stomach,
#: kidney, colon, small bowel, bladder and the muscles in near-identical salmon and peach. A hint of anatomy is
#: kept (liver brick red, vessels red and blue, bones ivory); the left one of a pair is a lighter (for a light
#: colour, darker) shade of the right one (see `organ_colour`).
_ORGAN_COLOURS: dict[str, tuple[int, int, int]] = {
    "liver": (178, 34, 34),
    "spleen": (148, 103, 189),
    "kidney": (255, 170, 0),
    "gallbladder": (44, 160, 44),
    "stomach": (227, 119, 194),
    "pancreas": (255, 127, 14),
    "aorta": (230, 20, 60),
    # the heart and the great vessels touch in every chest slice: heart amber, aorta red, pulmonary artery blue,
    # pulmonary veins magenta, venae cavae and left atrial appendage apart from all four (issue 27: heart and
    # aorta were both crimson)
    "pulmonary_artery": (40, 90, 210),
    "pulmonary_vein": (180, 40, 140),
    "atrial_appendage": (255, 220, 100),
    "superior_vena_cava": (0, 175, 175),
    "inferior_vena_cava": (31, 119, 180),
    "portal_vein": (90, 60, 220),
    "urinary_bladder": (220, 200, 40),
    "bladder": (220, 200, 40),
    "colon": (120, 72, 0),
    "small_bowel": (255, 152, 150),
    "duodenum": (250, 225, 150),
    "esophagus": (247, 182, 210),
    "heart": (200, 120, 40),
    "lung": (158, 218, 229),
    # the lobes of one lung touch: one hue each (they shared one colour)
    "lung_upper_lobe": (158, 218, 229),
    "lung_middle_lobe": (120, 200, 140),
    "lung_lower_lobe": (110, 140, 230),
    "trachea": (224, 224, 0),
    "vertebra": (240, 230, 140),
    "spine": (240, 230, 140),
    "sacrum": (192, 192, 240),
    "rib": (255, 240, 200),
    "costal_cartilages": (200, 240, 220),
    "femur": (255, 250, 200),
    "hip": (24, 0, 168),
    "muscle": (160, 70, 70),
    "gluteus": (120, 200, 110),
    "gluteus_maximus": (0, 144, 0),
    "gluteus_medius": (170, 220, 60),
    "gluteus_minimus": (60, 110, 60),
    "autochthon": (0, 128, 128),
    "iliopsoas": (200, 90, 30),
    "fat": (250, 240, 160),
    "body": (200, 150, 120),
    "nodule": (255, 60, 60),
    "lung_vessels": (200, 60, 60),
    "spinal_cord": (240, 168, 96),
    "adrenal_gland": (120, 220, 60),
    "prostate": (190, 120, 160),
}


#: Vertebrae touch their neighbours: three shades in turn down the spine (C1 ... S1), so that any two adjacent
#: levels differ (they all had one colour).
_VERTEBRA_SHADES: tuple[tuple[int, int, int], ...] = ((240, 230, 140), (144, 144, 48), (120, 216, 144))
_VERTEBRA_LEVEL = re.compile(r"vertebrae_([ctls])(\d+)$")
_SPINE_START = {"c": 0, "t": 7, "l": 19, "s": 24}  # C1 is level 0, T1 7, L1 19, S1 24


def organ_colour(name: str) -> tuple[float, float, float, float]:
    """RGBA in 0..1 for an organ name: a curated colour when known, else a stable colour from its name.

    A name ending in "_left" gets a lighter shade of its pair's colour (a darker one for a light colour), so
    left and right organs are told apart and still read as a pair; vertebrae take `_VERTEBRA_SHADES` in turn.
    """
    key = name.lower()
    level = _VERTEBRA_LEVEL.match(key)
    if level:
        index = _SPINE_START[level.group(1)] + int(level.group(2)) - 1
        r, g, b = _VERTEBRA_SHADES[index % len(_VERTEBRA_SHADES)]
        return (r / 255.0, g / 255.0, b / 255.0, 1.0)
    best = ""
    for prefix in _ORGAN_COLOURS:
        if key.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    if best:
        rgb = np.array(_ORGAN_COLOURS[best], dtype=float)
        if key.endswith("_left"):
            light = float(rgb @ (0.299, 0.587, 0.114)) > 190
            rgb = rgb * 0.7 if light else rgb + 0.4 * (255.0 - rgb)
        r, g, b = (float(v) for v in rgb)
    else:
        digest = hashlib.sha256(key.encode()).digest()
        # bright, saturated colours: keep each channel in 60..255
        r, g, b = (60 + digest[i] % 196 for i in range(3))
    return (r / 255.0, g / 255.0, b / 255.0, 1.0)


def default_names(ids: Iterable[int]) -> tuple[dict[int, str], str]:
    """Names for label ids that have none (`core.label_names`): ``label_<id>``, or TotalSegmentator v2's when the
    user says the maps are TotalSegmentator's (``NAPARI_DAGMAN_TOTALSEGMENTATOR=1``) and the ids fit it. Never a
    guess from the ids alone: any map with ids up to 117 fits.

    Returns the table and where it came from (``"totalsegmentator_v2"`` or ``"generic"``).
    """
    from napari_dagman.core.label_names import totalsegmentator_asked

    ids = sorted(int(i) for i in ids if int(i) != 0)
    if ids and max(ids) <= len(TOTALSEG_V2_NAMES) and totalsegmentator_asked():
        return {i: TOTALSEG_V2[i] for i in ids}, "totalsegmentator_v2"
    return {i: f"label_{i}" for i in ids}, "generic"


def label_table(ids: Iterable[int], names: Mapping[int, str] | None = None) -> pd.DataFrame:
    """Features table for a napari Labels layer: one row per id (background first), ``index``/``name``/``colour``.

    Ids missing from ``names`` fall back to :func:`default_names`.
    """
    ids = sorted({0, *(int(i) for i in ids)})
    fallback, _ = default_names(ids)
    names = {int(k): v for k, v in (names or {}).items()}
    rows = []
    for i in ids:
        name = "background" if i == 0 else names.get(i, fallback.get(i, f"label_{i}"))
        rows.append({"index": i, "name": name})
    return pd.DataFrame(rows)


def colour_dict(names: Mapping[int, str]) -> dict[int | None, np.ndarray]:
    """``DirectLabelColormap``-ready mapping id -> RGBA (background transparent, unknown ids grey)."""
    colours: dict[int | None, np.ndarray] = {0: np.zeros(4), None: np.array([0.5, 0.5, 0.5, 1.0])}
    for i, name in names.items():
        if int(i) != 0:
            colours[int(i)] = np.array(organ_colour(name))
    return colours


def names_in(array: np.ndarray, names: Mapping[int, str] | None = None) -> dict[int, str]:
    """Id -> name for every non-zero id present in ``array`` (``names`` first, defaults after)."""
    ids = [int(i) for i in np.unique(array) if int(i) != 0]
    fallback, _ = default_names(ids)
    names = dict(names or {})
    return {i: names.get(i, fallback[i]) for i in ids}


def names_from_features(features: Any) -> dict[int, str]:
    """Id -> organ name from a layer's ``features`` table (``index`` and ``name`` columns), else {}: labels made
    outside this plugin (painted, or added by another plugin with a features table) keep their names."""
    if (
        features is None
        or not len(features)
        or not {"index", "name"} <= set(getattr(features, "columns", ()))
    ):
        return {}
    return {
        int(i): str(n)
        for i, n in zip(features["index"], features["name"], strict=True)
        if int(i) != 0 and isinstance(n, str) and n
    }


def layer_names(data: Any, features: Any = None, metadata: dict[str, Any] | None = None) -> dict[int, str]:
    """Id -> name of the organs present in a labels layer's ``data``: its features table, else its metadata's
    ``label_names``, else the defaults of `names_in` (the napari writer and every dock read names this one way)."""
    names = names_from_features(features)
    if not names and (metadata or {}).get("label_names"):
        names = {int(k): str(v) for k, v in metadata["label_names"].items()}
    return names_in(np.asarray(data), names)
