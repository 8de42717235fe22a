"""The explorer's figures (matplotlib in Qt): the small multiples that follow the viewer's slice, and head diversity.

`TileFigure` draws rows of `attention_tiles.Tile` over the CT on the slice the viewer shows. It is laid out once per
result (axes, titles, colour bars: rendered once and kept) and a new slice only replaces the images' data and
blits them over the kept render, so text and colour bars are not drawn again (benchmarks/explorer_redraw.py). A
click on a tile emits `clicked` with the tile's key. How the tiles are laid out and styled is `TileLayout`'s
(`explorer.tile_layout`), a part of `TileFigure`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from napari_dagman._widgets.explorer.tile_layout import (
    BACKGROUND,
    BAR,
    DIFFERENCE_CMAP,
    EMPTY,
    GAP,
    HEADER,
    MIN_TILE,
    SELECTED,
    TEXT,
    TITLE,
    TileLayout,
)
from napari_dagman._widgets.explorer.tiles import (
    Contrast,
    Grid,
    SliceView,
    Tile,
    TileRow,
    ct_plane,
)

__all__ = [
    "BACKGROUND",
    "BAR",
    "CLICK_TIP",
    "DIFFERENCE_CMAP",
    "EMPTY",
    "GAP",
    "HEADER",
    "MIN_TILE",
    "SELECTED",
    "TEXT",
    "TITLE",
    "DiversityFigure",
    "TileFigure",
]

CLICK_TIP = "click a tile to show it as the napari layer"


class TileFigure(TileLayout, QWidget):
    """Small multiples: rows of tiles, each the CT on the viewer's slice with a map, mask or picture over it."""

    clicked = Signal(object)

    def __init__(self, parent: QWidget | None = None, *, empty_text: str = "") -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 1.2), facecolor=BACKGROUND)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.rows: list[TileRow] = []
        self.view: SliceView | None = None
        self.ct: Grid | None = None
        self.ct_limits: tuple[float, float] = (-160.0, 240.0)
        self.contrast: Contrast | None = None
        self.difference_limit = 1.0
        self.colormap = "inferno"
        self.smooth = False
        self.selected: tuple | None = None
        self.empty_text = empty_text
        self._artists: dict[tuple, dict[str, Any]] = {}  # tile key -> axes, background, overlay
        self._headers: list[tuple[TileRow, Any]] = []
        self._bars: list[tuple[str, Any]] = []
        self._animated: list[Any] = []  # the images and row headers, blitted over `_background`
        self._background: Any = None  # the last full render, without them
        self._width = 0
        self._relayout = QTimer(self)
        self._relayout.setSingleShot(True)
        self._relayout.setInterval(120)
        self._relayout.timeout.connect(self._layout_if_resized)
        self.canvas.mpl_connect("button_press_event", self._on_press)
        self.canvas.mpl_connect("draw_event", self._on_draw)
        self.canvas.mpl_connect("motion_notify_event", self._on_motion)
        self.canvas.setToolTip(CLICK_TIP)
        self._layout()

    # --- content ------------------------------------------------------------------------------------------------
    def set_rows(
        self,
        rows: list[TileRow],
        ct: Grid | None,
        view: SliceView | None,
        *,
        contrast: Contrast | None = None,
        difference_limit: float = 1.0,
    ) -> None:
        """New tiles (a new result): lay them out and draw them on ``view``'s slice."""
        self.rows, self.ct, self.view = [r for r in rows if r.tiles], ct, view
        self.contrast, self.difference_limit = contrast, difference_limit
        if self.selected not in {t.key for r in self.rows for t in r.tiles}:
            self.selected = None
        self._layout()

    def set_slice(self, view: SliceView, *, draw: bool = True) -> None:
        """Cut every tile at the viewer's new slice; only the images' data change."""
        relayout = self.view is None or view.axis != self.view.axis  # another slicing orientation: new limits
        self.view = view
        if not self.rows or self.ct is None:
            return
        if relayout:
            self._layout()  # cuts the tiles at ``view`` itself
            if draw:
                self.canvas.draw_idle()
            return
        planes: dict[bytes, Any] = {}
        for row, header in self._headers:
            key = row.region.tobytes()
            if key not in planes:
                planes[key] = ct_plane(self.ct, view, row.region)
            inside = row.region[view.axis, 0] <= view.world <= row.region[view.axis, 1]
            header.set_text(row.label + ("" if inside else "  (this slice is outside: no data here)"))
            for tile in row.tiles:
                self._cut(tile, planes[key], view)
        if draw:
            self._blit()

    def set_ct_limits(self, limits: tuple[float, float]) -> None:
        """The CT's grey window (the CT layer's contrast limits)."""
        self.ct_limits = (float(limits[0]), float(limits[1]))
        for tile in self._tiles():
            if tile.kind != "image":
                self._artists[tile.key]["background"].set_clim(*self.ct_limits)
        self._blit()

    def set_style(
        self, *, colormap: str | None = None, smooth: bool | None = None, contrast: Contrast | None = None
    ) -> None:
        """Colour map, smooth (bilinear) or raw-grid maps, and the shared colour scale, without a new layout."""
        if colormap is not None:
            self.colormap = colormap
        if smooth is not None:
            self.smooth = smooth
        if contrast is not None:
            self.contrast = contrast
        for tile in self._tiles():
            overlay = self._artists[tile.key]["overlay"]
            if tile.kind == "attention":
                overlay.set_cmap(self._cmap(self.colormap))
                overlay.set_norm(self._norm())
            if tile.kind in ("attention", "difference"):
                overlay.set_interpolation("bilinear" if self.smooth else "nearest")
        if contrast is not None:  # a new scale: the colour bar's ticks and label change too
            self._layout()
        self.canvas.draw_idle()

    def select(self, key: tuple | None) -> None:
        """Frame the tile whose layer napari shows."""
        self.selected = key
        for tile in self._tiles():
            colour = SELECTED if tile.key == key else BACKGROUND
            for spine in self._artists[tile.key]["axes"].spines.values():
                spine.set_color(colour)
                spine.set_linewidth(2.0)
        self.canvas.draw_idle()

    def tile_axes(self, key: tuple) -> Any:
        """The matplotlib axes of a tile (tests click on it)."""
        return self._artists[key]["axes"]

    def overlay_data(self, key: tuple) -> np.ndarray:
        """What a tile shows over the CT now (NaN where nothing)."""
        return np.asarray(self._artists[key]["overlay"].get_array(), dtype=float).copy()

    def background_data(self, key: tuple) -> np.ndarray:
        """The CT (or picture) a tile shows now."""
        return np.asarray(self._artists[key]["background"].get_array(), dtype=float).copy()

    def tile_keys(self) -> list[tuple]:
        """The keys of every tile, in drawing order."""
        return [t.key for t in self._tiles()]

    # --- drawing ------------------------------------------------------------------------------------------------
    def _tiles(self) -> list[Tile]:
        return [t for r in self.rows for t in r.tiles]

    def _cut(self, tile: Tile, plane: Any, view: SliceView) -> None:
        artists = self._artists[tile.key]
        background, overlay = artists["background"], artists["overlay"]
        data = tile.grid.plane(view.axis, view.world)
        if tile.kind == "image":  # the method's picture replaces the CT
            background.set_data(EMPTY if data is None else data)
            background.set_extent(tile.grid.extent(view.axis))
            return
        background.set_data(EMPTY if plane.array is None else plane.array)
        background.set_extent(plane.extent)
        if data is not None and tile.kind in ("mask", "labels"):
            data = np.where(data > 0, data, np.nan)
        overlay.set_data(EMPTY if data is None else data)
        overlay.set_extent(tile.grid.extent(view.axis))

    # --- blitting -----------------------------------------------------------------------------------------------
    def _on_draw(self, _event: Any) -> None:
        # after every full render: keep it without the images, then draw them on top
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_animated()

    def _draw_animated(self) -> None:
        for artist in self._animated:
            self.figure.draw_artist(artist)

    def _blit(self) -> None:
        """Redraw the images (and row headers) over the kept render; a full render when there is none yet."""
        if self._background is None:
            self.canvas.draw_idle()
            return
        self.canvas.restore_region(self._background)
        self._draw_animated()
        self.canvas.blit(self.figure.bbox)

    def save_png(self, path: str) -> None:
        """The figure as a PNG (animated artists included)."""
        for artist in self._animated:
            artist.set_animated(False)
        try:
            self.figure.savefig(path, dpi=self.figure.dpi, facecolor=BACKGROUND)
        finally:
            for artist in self._animated:
                artist.set_animated(True)
            self.canvas.draw_idle()

    # --- Qt -----------------------------------------------------------------------------------------------------
    def resizeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        self._relayout.start()

    def _layout_if_resized(self) -> None:
        if self._geometry()[0] != self._width:
            self._layout()

    def _tile_at(self, event: Any) -> Tile | None:
        for tile in self._tiles():
            if self._artists[tile.key]["axes"] is event.inaxes:
                return tile
        return None

    def _on_press(self, event: Any) -> None:
        tile = self._tile_at(event)
        if tile is not None:
            self.select(tile.key)
            self.clicked.emit(tile.key)

    def _on_motion(self, event: Any) -> None:
        tile = self._tile_at(event)
        tip = f"{tile.title}: {tile.tooltip}\n{CLICK_TIP}" if tile is not None and tile.tooltip else CLICK_TIP
        if self.canvas.toolTip() != tip:
            self.canvas.setToolTip(tip)


class DiversityFigure(QWidget):
    """Head-diversity figures of the shown maps, per run: head x head correlation and each head's entropy."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 1.9), facecolor=BACKGROUND)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def show_diversity(self, runs: list[tuple[str, dict[str, Any]]]) -> None:
        """``runs``: (label, diversity figures) of one run or two compared."""
        fig = self.figure
        fig.clear()
        runs = [(label, d) for label, d in runs if d]
        self.canvas.setFixedHeight(150 * max(1, len(runs)))
        fig.set_size_inches(fig.get_size_inches()[0], 1.56 * max(1, len(runs)), forward=False)
        for r, (label, d) in enumerate(runs):
            left = fig.add_subplot(len(runs), 2, 2 * r + 1)
            right = fig.add_subplot(len(runs), 2, 2 * r + 2)
            self._draw_run(label, d, left, right)
        fig.tight_layout(pad=0.4, w_pad=1.0)
        self.canvas.draw_idle()

    def _draw_run(self, label: str, d: dict[str, Any], left: Any, right: Any) -> None:
        similarity = np.asarray(d.get("similarity", []), dtype=float)
        entropy = np.asarray(d.get("entropy", []), dtype=float)
        for ax in (left, right):
            ax.set_facecolor(BACKGROUND)
            ax.tick_params(colors="#d0d0d0", labelsize=7)
            for spine in ax.spines.values():
                spine.set_color("#8f9294")
        if similarity.size:
            image = left.imshow(similarity, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
            left.set_xticks(range(len(similarity)))
            left.set_yticks(range(len(similarity)))
            bar = self.figure.colorbar(image, ax=left, fraction=0.046, pad=0.04)
            bar.ax.tick_params(colors="#d0d0d0", labelsize=6)
        left.set_title(f"{label}: correlation", color=TEXT, fontsize=8)
        left.set_xlabel("head", color="#d0d0d0", fontsize=7)
        if entropy.size:
            right.bar(range(len(entropy)), entropy, color="#f0a030")
            right.set_ylim(0, 1.05)
            right.set_xticks(range(len(entropy)))
        right.set_title("entropy (1 = uniform)", color=TEXT, fontsize=8)
        right.set_xlabel("head", color="#d0d0d0", fontsize=7)
