"""What the explorer's small multiples show, as plain arrays: no Qt, no matplotlib (`attention_figure` draws it).

A tile is a grid placed in napari's world (physical mm, z-y-x: ``scale`` and ``translate`` as on a layer) drawn over
the CT on the slice the viewer shows. Every grid is cut along the viewer's slice axis at the same world position,
so the CT, the attention maps (token or sub-token grid), the masks (mask-cell grid) and the method's pictures
overlay exactly as the layers do in napari. Tiles come in rows: the heads of a run (and their mean), the masks of
every strategy, the difference of two runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman.core.windowing import UNIFORM_RANGE

if TYPE_CHECKING:
    from napari_dagman.core.attention import AttentionMaps, AttentionResult, CropPreview
    from napari_dagman.core.volume import Volume

#: A colour per mask strategy (hidden cells), distinct on a grey CT; the dropped cells of the noisy teacher are white.
#: ``run`` is the mask drawn with the run's own recipe (`core.attention.preview.RUN_MASK`).
MASK_COLOURS = {
    "run": "#00e5ff",
    "random": "#c0ca33",
    "block": "#4fc3f7",
    "attention-high": "#ff5252",
    "attention-low": "#7c4dff",
    "attention-hint": "#ffb300",
    "noisy-teacher": "#00e676",
}
DROPPED = "not seen by the noisy teacher"
DROPPED_COLOUR = "#ffffff"
#: Percentiles of every head's values that set the stretched colour scale (an option, not the default).
AUTO_PERCENTILES = (1.0, 99.0)
UNIFORM_TICKS = ((0.25, "1/4"), (0.5, "1/2"), (1.0, "1"), (2.0, "2"), (4.0, "4"))


@dataclass
class Grid:
    """A 3D array (z, y, x) placed in world mm like a napari layer: element ``i`` is centred at translate + scale*i."""

    array: np.ndarray
    scale: Sequence[float]
    translate: Sequence[float]

    def index(self, axis: int, world: float) -> int | None:
        """The element along ``axis`` whose extent holds ``world`` (None outside the grid)."""
        i = int(np.floor((world - self.translate[axis]) / self.scale[axis] + 0.5))
        return i if 0 <= i < self.array.shape[axis] else None

    def plane(self, axis: int, world: float) -> np.ndarray | None:
        """The 2D plane of the grid at ``world`` along ``axis`` (the other two axes in order), None outside."""
        i = self.index(axis, world)
        return None if i is None else np.take(self.array, i, axis=axis)

    def extent(self, axis: int) -> tuple[float, float, float, float]:
        """matplotlib ``extent`` (left, right, bottom, top) of a plane across ``axis``, rows downwards as in napari."""
        rows, cols = [a for a in range(3) if a != axis]
        return (
            self._edge(cols, 0),
            self._edge(cols, self.array.shape[cols]),
            self._edge(rows, self.array.shape[rows]),
            self._edge(rows, 0),
        )

    def bounds(self) -> np.ndarray:
        """(3, 2) world positions of the grid's first and last edges along z, y, x."""
        return np.array([[self._edge(a, 0), self._edge(a, self.array.shape[a])] for a in range(3)])

    def _edge(self, axis: int, i: int) -> float:
        return float(self.translate[axis] + self.scale[axis] * (i - 0.5))


@dataclass
class Tile:
    """One small multiple: a title, what is drawn over the CT (``kind``) and the grid it comes from.

    ``kind`` is ``attention`` (the shared colour scale), ``difference`` (a diverging scale around 0), ``mask``
    (hidden cells in ``colour``), ``labels`` (a method's label picture) or ``image`` (a method's picture drawn
    instead of the CT). ``key`` says what a click on it shows in napari.
    """

    key: tuple
    title: str
    kind: str
    grid: Grid
    colour: str = ""
    tooltip: str = ""


@dataclass
class TileRow:
    """Tiles that share a region of the slice (the crop, or the whole CT), under a label."""

    label: str
    tiles: list[Tile]
    region: np.ndarray  # (3, 2) world box shown: edges along z, y, x


@dataclass
class SliceView:
    """Where the viewer is: the slice axis (0 = axial) and the world position along it."""

    axis: int
    world: float


@dataclass
class Contrast:
    """The shared colour scale of the attention tiles and layers, and what it was taken from.

    ``log``: the default fixed scale, logarithmic in x uniform (1/4 ... 4, 1 = uniform in the middle). Otherwise a
    linear stretch of the maps' percentiles, whose ``real`` range (the maps' min and max) the text gives.
    """

    low: float
    high: float
    source: str
    log: bool = False
    real: tuple[float, float] | None = None

    def text(self) -> str:
        if self.log:
            return f"colour scale: x uniform, logarithmic {self.low:g} - {self.high:g} ({self.source}; 1 = uniform)"
        real = f"; the maps span {self.real[0]:.3g} - {self.real[1]:.3g}" if self.real else ""
        return f"colour scale STRETCHED to {self.low:.3g} - {self.high:.3g} x uniform ({self.source}{real})"


@dataclass
class CtPlane:
    """The CT's voxels on one slice, cut to a region, with their extent (for the tiles' grey background)."""

    array: np.ndarray | None
    extent: tuple[float, float, float, float]


def volume_grid(volume: Volume) -> Grid:
    """A CT volume as a `Grid` (its voxels placed as its napari layer places them)."""
    return Grid(np.asarray(volume.array), list(volume.spacing), list(volume.origin))


def ct_plane(ct: Grid, view: SliceView, region: np.ndarray) -> CtPlane:
    """The CT's plane at the viewer's slice, cut to the voxels inside ``region`` (rows and columns of the plane)."""
    rows, cols = [a for a in range(3) if a != view.axis]
    lo, hi = region[:, 0], region[:, 1]
    cut = []
    for a in (rows, cols):
        first = int(np.ceil((lo[a] - ct.translate[a]) / ct.scale[a] - 0.5 - 1e-6))
        last = int(np.floor((hi[a] - ct.translate[a]) / ct.scale[a] - 0.5 + 1e-6))
        cut.append((max(0, first), min(ct.array.shape[a], last + 1)))
    extent = (
        ct._edge(cols, cut[1][0]),
        ct._edge(cols, cut[1][1]),
        ct._edge(rows, cut[0][1]),
        ct._edge(rows, cut[0][0]),
    )
    plane = ct.plane(view.axis, view.world)
    if plane is None or cut[0][0] >= cut[0][1] or cut[1][0] >= cut[1][1]:
        return CtPlane(None, extent)
    return CtPlane(plane[cut[0][0] : cut[0][1], cut[1][0] : cut[1][1]], extent)


def maps_grid(maps: AttentionMaps, head: int | None = None) -> Grid:
    """One head's map (``None``: the mean of the heads) as a `Grid`."""
    array = maps.mean if head is None else maps.maps[head]
    return Grid(np.asarray(array, np.float32), list(maps.scale), list(maps.translate))


def crop_region(preview: CropPreview) -> np.ndarray:
    """World box of the crop the masks were drawn for."""
    return Grid(preview.image, preview.image_scale, preview.image_translate).bounds()


def maps_region(maps: AttentionMaps, ct: Grid) -> np.ndarray:
    """World box of the maps, cut to the CT (the last token of a whole-volume map may reach past it)."""
    box = maps_grid(maps).bounds()
    ct_box = ct.bounds()
    return np.stack([np.maximum(box[:, 0], ct_box[:, 0]), np.minimum(box[:, 1], ct_box[:, 1])], axis=1)


def run_label(result: AttentionResult, folder: str = "") -> str:
    """A short name for a run in titles: its method and folder name."""
    method = str(result.model.get("method", "run"))
    return f"{method} ({folder})" if folder and folder != method else method


def map_facts(result: AttentionResult, head: int | None) -> dict[str, Any]:
    """Normalised entropy, peak (x uniform) and the flat verdict of a head (None: the mean), from the result's
    sanity checks when computed, else from the maps as shown."""
    from napari_dagman.core.attention.sanity import is_flat

    stats = result.stats or {}
    facts = stats.get("mean") if head is None else stats.get("heads", {}).get(str(head))
    if facts:
        return {k: facts[k] for k in ("normalised_entropy", "peak_x_uniform", "flat")}
    array = result.maps.mean if head is None else result.maps.maps[head]
    return {"normalised_entropy": None, "peak_x_uniform": float(np.nanmax(array)), "flat": is_flat(array)}


def facts_title(name: str, facts: dict[str, Any]) -> str:
    """E.g. "head 2 · peak 1.07x · flat"."""
    return f"{name} · peak {facts['peak_x_uniform']:.2f}x" + (" · flat" if facts["flat"] else "")


def facts_tooltip(what: str, facts: dict[str, Any]) -> str:
    entropy = facts.get("normalised_entropy")
    text = f"{what}, x uniform (1 = every token equal); peak {facts['peak_x_uniform']:.2f} x uniform"
    if entropy is not None:
        text += f"; normalised entropy {entropy:.4f} (1 = uniform)"
    if facts["flat"]:
        text += "; flat: every token stays within 2/3 - 3/2 of uniform, so the colours show a ripple, not a pattern"
    return text


def head_row(result: AttentionResult, ct: Grid, run: int, label: str) -> TileRow | None:
    """The mean and every head of a run's maps, each titled with its peak and whether it is flat; a method without
    class attention gets its own pictures instead."""
    if result.maps is not None:
        maps = result.maps
        mean = map_facts(result, None)
        tiles = [
            Tile(
                ("mean", run),
                facts_title("mean", mean),
                "attention",
                maps_grid(maps),
                tooltip=facts_tooltip("the heads' mean", mean),
            )
        ]
        for h in range(maps.maps.shape[0]):
            facts = map_facts(result, h)
            tiles.append(
                Tile(
                    ("head", run, h),
                    facts_title(f"head {h}", facts),
                    "attention",
                    maps_grid(maps, h),
                    tooltip=facts_tooltip(f"head {h}'s attention", facts),
                )
            )
        return TileRow(f"{label}: attention per head", tiles, maps_region(maps, ct))
    pictures = result.pictures
    if pictures is None or not pictures.pictures or result.preview is None:
        return None
    tiles = []
    for picture in pictures.pictures:
        scale, translate = pictures.placement(picture)
        kind = "labels" if picture.kind == "labels" else "image"
        tiles.append(
            Tile(
                ("picture", run, picture.name),
                picture.name,
                kind,
                Grid(picture.array, scale, translate),
                tooltip=picture.description,
            )
        )
    return TileRow(
        f"{label}: the method's own pictures (no class attention)", tiles, crop_region(result.preview)
    )


def mask_row(result: AttentionResult, run: int, label: str) -> TileRow | None:
    """The run's own mask of the crop (and every other strategy's, when asked) with the share each hides, and,
    with a noisy teacher, the cells it did not see."""
    from napari_dagman.core.attention.preview import RUN_MASK
    from napari_dagman.core.masking import strategy_names

    preview = result.preview
    if preview is None or not preview.masks:
        return None
    known = set(strategy_names())

    def tip(strategy: str) -> str:
        from napari_dagman.core.masking import get_strategy

        if strategy == RUN_MASK:
            return f"the mask this run draws for this crop and seed: {preview.recipe}"
        if strategy in known:
            return get_strategy(strategy).description + " (at the run's ratio, for comparison)"
        return "attention-high on the attention of a teacher that did not see some cells (DAGMaN), for comparison"

    def cells(array: np.ndarray) -> Grid:
        return Grid(np.asarray(array, np.float32), preview.mask_scale, preview.mask_translate)

    def title(strategy: str, mask: np.ndarray) -> str:
        name = "this run" if strategy == RUN_MASK else strategy
        hidden = float(np.mean(mask > 0))
        return f"{name} {hidden:.0%}" + (" (unmasked draw)" if hidden == 0 else "")

    tiles = [
        Tile(("mask", run, s), title(s, m), "mask", cells(m), MASK_COLOURS.get(s, "#ffffff"), tip(s))
        for s, m in preview.masks.items()
    ]
    if np.any(preview.teacher_dropped):
        share = float(np.mean(preview.teacher_dropped > 0))
        tiles.append(
            Tile(
                ("dropped", run),
                f"teacher did not see {share:.0%}",
                "mask",
                cells(preview.teacher_dropped),
                DROPPED_COLOUR,
            )
        )
    return TileRow(f"{label}: masks of the crop", tiles, crop_region(preview))


def difference_row(difference: AttentionMaps | None, ct: Grid, labels: tuple[str, str]) -> TileRow | None:
    """The difference of the two runs' mean maps (first - second)."""
    if difference is None:
        return None
    tile = Tile(("difference",), "first - second", "difference", maps_grid(difference),
                tooltip=f"{labels[0]} minus {labels[1]}, x uniform")  # fmt: skip
    return TileRow(
        f"difference of the mean maps: {labels[0]} - {labels[1]}", [tile], maps_region(difference, ct)
    )


def auto_contrast(maps: Sequence[AttentionMaps | None], stretch: bool = False) -> Contrast | None:
    """The shared colour scale of the shown maps: by default the fixed logarithmic 1/4 - 4 x uniform; with
    ``stretch``, the 1st-99th percentiles of every head's values (the text then says so and gives the real range)."""
    values = [np.asarray(m.maps, np.float32).ravel() for m in maps if m is not None]
    if not values:
        return None
    if not stretch:
        return Contrast(*UNIFORM_RANGE, "fixed, the same for every head and run", log=True)
    data = np.concatenate(values)
    low, high = (float(v) for v in np.percentile(data, AUTO_PERCENTILES))
    if high - low < 1e-6:  # a flat map (an untrained module): a visible range around it
        low, high = low - 0.05, high + 0.05
    real = (float(np.nanmin(data)), float(np.nanmax(data)))
    return Contrast(
        low, high, f"percentiles {AUTO_PERCENTILES[0]:g}-{AUTO_PERCENTILES[1]:g} of every head", real=real
    )


def difference_limit(difference: AttentionMaps | None) -> float:
    """Half-range of the diverging scale of a difference map: its 99th percentile of |value|."""
    if difference is None:
        return 1.0
    return max(1e-3, float(np.percentile(np.abs(difference.mean), 99.0)))
