"""CT display windows (what the screen shows) and model input normalisation (what the network sees).

The two are kept apart on purpose: changing the window in napari never changes what a model is trained or
evaluated on (a surprise users of napari-sam reported, see design/ecosystem.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_dagman.core.errors import DagmanInputError


@dataclass(frozen=True)
class Window:
    """A CT display window: width and level in Hounsfield units."""

    width: float
    level: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise DagmanInputError(f"window width must be positive, got {self.width}")

    @property
    def limits(self) -> tuple[float, float]:
        """(low, high) contrast limits in HU."""
        return (self.level - self.width / 2.0, self.level + self.width / 2.0)


#: Common radiology presets (W/L in HU).
WINDOW_PRESETS: dict[str, Window] = {
    "abdomen": Window(400, 40),
    "lung": Window(1500, -600),
    "bone": Window(1800, 400),
    "brain": Window(80, 40),
    "liver": Window(150, 30),
    "mediastinum": Window(350, 50),
}
DEFAULT_WINDOW = "abdomen"

#: The window a CT opens with, by body region (`body_region`): a chest CT read in an abdominal window shows the
#: lungs black and the mediastinum washed out.
REGION_WINDOWS: dict[str, str] = {"chest": "mediastinum", "abdomen": "abdomen"}
REGION_WORDS: dict[str, str] = {"chest": "a chest CT", "abdomen": "an abdominal CT"}
#: An axial slice is a chest slice when air enclosed by the body (lungs) is more than this share of its body
#: cross-section (tissue + enclosed air): lungs fill about 30-50 % of a thorax' section, bowel gas a few % of an
#: abdomen's, lung bases 5-15 %.
CHEST_AIR_SHARE = 0.2


def body_region(array: np.ndarray) -> str:
    """"chest" when at least half of the axial slices that hold a body are chest slices (`CHEST_AIR_SHARE`), else
    "abdomen".

    On a copy subsampled to about 96 voxels a side: air (< -400 HU) is enclosed when its connected part of the
    axial slice (z-y-x arrays, z first) does not reach the slice's edge; outside air always does.
    """
    from scipy import ndimage

    step = max(1, int(np.ceil(max(array.shape) / 96)))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float32)
    air = sample < -400
    in_slice = np.zeros((3, 3, 3), bool)
    in_slice[1] = ndimage.generate_binary_structure(2, 1)  # no connection across slices
    parts, _ = ndimage.label(air, structure=in_slice)
    edges = (parts[:, 0], parts[:, -1], parts[:, :, 0], parts[:, :, -1])
    enclosed = air & ~np.isin(parts, np.unique(np.concatenate([e.ravel() for e in edges])))
    enclosed_per_slice = enclosed.sum(axis=(1, 2))
    body_per_slice = (~air).sum(axis=(1, 2)) + enclosed_per_slice
    has_body = body_per_slice > 0.02 * air[0].size
    if not has_body.any():
        return "abdomen"
    chest = enclosed_per_slice[has_body] / body_per_slice[has_body] > CHEST_AIR_SHARE
    return "chest" if chest.mean() >= 0.5 else "abdomen"


def dicom_window(metadata: dict) -> Window | None:
    """The series' own window (DICOM WindowWidth/WindowCenter, the first of several), when it has a usable one."""
    width, level = metadata.get("window_width"), metadata.get("window_center")
    if width is None or level is None:
        return None
    try:
        window = Window(float(str(width).split("\\")[0]), float(str(level).split("\\")[0]))
    except (ValueError, DagmanInputError):
        return None
    return window if np.isfinite(window.width) and np.isfinite(window.level) else None


def opening_window(array: np.ndarray, metadata: dict) -> tuple[str, tuple[float, float], str]:
    """The window a CT opens with: its DICOM window tags, else the preset of its body region.

    Returns (preset name or "custom", contrast limits, why in a few words for the layer's metadata)."""
    window = dicom_window(metadata)
    if window is not None:
        return "custom", window.limits, f"the series' DICOM window (W {window.width:g} / L {window.level:g})"
    region = body_region(array)
    name = REGION_WINDOWS[region]
    return name, WINDOW_PRESETS[name].limits, f"{name} window for {REGION_WORDS[region]}"


#: The one colour scale of attention maps, in x uniform (1 = every token its equal share), logarithmic: the same for
#: every head, run and slice, 1 in its middle. The explorer's tiles and layers and the CLI's PNG all use it.
UNIFORM_RANGE: tuple[float, float] = (0.25, 4.0)


def window_limits(
    preset: str | None = None, *, width: float | None = None, level: float | None = None
) -> tuple[float, float]:
    """Contrast limits for a named preset, or for a custom ``width``/``level`` ("custom")."""
    if preset in (None, "custom"):
        if width is None or level is None:
            raise DagmanInputError("a custom window needs both width and level")
        return Window(float(width), float(level)).limits
    try:
        return WINDOW_PRESETS[preset].limits
    except KeyError:
        raise DagmanInputError(
            f"unknown window preset '{preset}'; choose one of {', '.join(WINDOW_PRESETS)} or custom"
        ) from None


#: SMIT's model input range: HU clipped to [-175, 250] and scaled to [0, 1].
DEFAULT_HU_RANGE: tuple[float, float] = (-175.0, 250.0)


def normalize_hu(array: np.ndarray, hu_range: tuple[float, float] = DEFAULT_HU_RANGE) -> np.ndarray:
    """Clip HU to ``hu_range`` and scale linearly to [0, 1] (float32, MONAI's ScaleIntensityRange): the model's input."""
    from monai.transforms import ScaleIntensityRange

    lo, hi = float(hu_range[0]), float(hu_range[1])
    if not hi > lo:
        raise DagmanInputError(f"HU range must be increasing, got {hu_range}")
    scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(np.asarray(array, dtype=np.float32)), dtype=np.float32)
