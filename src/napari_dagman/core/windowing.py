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
