"""The explorer's figures (matplotlib in Qt): the small multiples that follow the viewer's slice, and head diversity.

`TileFigure` draws rows of `attention_tiles.Tile` over the CT on the slice the viewer shows. It is laid out once per
result (axes, titles, colour bars: rendered once and kept) and a new slice only replaces the images' data and
blits them over the kept render, so text and colour bars are not drawn again (benchmarks/explorer_redraw.py). A
click on a tile emits `clicked` with the tile's key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from napari_dagman._widgets.attention_tiles import (
    UNIFORM_TICKS,
    Contrast,
    Grid,
    SliceView,
    Tile,
    TileRow,
    ct_plane,
)

BACKGROUND = "#262930"  # napari's dark theme
TEXT = "#e0e0e0"
SELECTED = "#ffff00"
DIFFERENCE_CMAP = "RdBu_r"
#: Layout in pixels: smallest tile, gaps, a row's header, a tile's title, a colour bar with its label.
MIN_TILE, GAP, HEADER, TITLE, BAR = 92, 6, 16, 13, 46
EMPTY = np.full((1, 1), np.nan, np.float32)
CLICK_TIP = "click a tile to show it as the napari layer"


class TileFigure(QWidget):
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

    @staticmethod
    def _cmap(name: str) -> Any:
        import matplotlib

        cmap = matplotlib.colormaps[name].copy()
        cmap.set_bad((0, 0, 0, 0))
        return cmap

    def _overlay_style(self, tile: Tile) -> dict[str, Any]:
        from matplotlib.colors import ListedColormap

        if tile.kind == "attention":
            return {"cmap": self._cmap(self.colormap), "norm": self._norm(), "alpha": 0.6}
        if tile.kind == "difference":
            lim = self.difference_limit
            return {"cmap": self._cmap(DIFFERENCE_CMAP), "vmin": -lim, "vmax": lim, "alpha": 0.75}
        if tile.kind == "mask":
            cmap = ListedColormap([tile.colour])
            cmap.set_bad((0, 0, 0, 0))
            alpha = 0.75 if tile.key[0] == "dropped" else 0.6  # white cells on a grey CT need more
            return {"cmap": cmap, "vmin": 0.0, "vmax": 1.0, "alpha": alpha}
        return {"cmap": self._cmap("tab10"), "vmin": 0.5, "vmax": 10.5, "alpha": 0.55}

    def _norm(self) -> Any:
        """The attention colour scale: logarithmic x uniform by default, linear when stretched."""
        from matplotlib.colors import LogNorm, Normalize

        contrast = self.contrast or Contrast(0.25, 4.0, "fixed", log=True)
        if contrast.log:
            return LogNorm(contrast.low, contrast.high, clip=True)
        return Normalize(contrast.low, contrast.high)

    def _geometry(self) -> tuple[int, int, float]:
        """(width px, columns, tile size px) for the widget's width."""
        width = max(300, self.canvas.width() if self.canvas.width() > 50 else self.width())
        longest = max((len(r.tiles) for r in self.rows), default=1)
        columns = max(1, min(longest, (width - GAP) // (MIN_TILE + GAP)))
        tile = (width - GAP * (columns + 1)) / columns
        return width, columns, tile

    def _layout(self) -> None:
        """Axes for every tile, row headers and colour bars, placed in pixels; then the current slice."""
        self.figure.clear()
        self._artists, self._headers, self._bars, self._animated = {}, [], [], []
        self._background = None
        width, columns, tile = self._geometry()
        self._width = width
        if not self.rows:
            self._set_height(width, 60)
            if self.empty_text:
                self.figure.text(
                    0.5, 0.5, self.empty_text, color=TEXT, ha="center", va="center", fontsize=8, wrap=True
                )
            self.canvas.draw_idle()
            return
        bars = self._bar_rows()
        height = 0.0
        for i, row in enumerate(self.rows):
            lines = -(-len(row.tiles) // columns)
            height += HEADER + lines * (TITLE + tile + GAP) + (BAR if i in bars else 0)
        height += GAP
        self._set_height(width, height)
        y = height  # pixels from the bottom; rows go downwards
        for i, row in enumerate(self.rows):
            y -= HEADER
            header = self.figure.text(
                GAP / width,
                (y + 3) / height,
                row.label,
                color=TEXT,
                fontsize=8,
                fontweight="bold",
                animated=True,
            )
            self._animated.append(header)
            self._headers.append((row, header))
            for n, t in enumerate(row.tiles):
                line, column = divmod(n, columns)
                top = y - line * (TITLE + tile + GAP) - TITLE
                rect = (
                    (GAP + column * (tile + GAP)) / width,
                    (top - tile) / height,
                    tile / width,
                    tile / height,
                )
                self._add_tile(t, row, rect)
            y -= -(-len(row.tiles) // columns) * (TITLE + tile + GAP)
            if i in bars:
                y -= BAR
                self._add_bar(bars[i], (0.12, (y + 30) / height, 0.76, 8 / height))
        if self.view is not None:
            self.set_slice(self.view, draw=False)
        self.select(self.selected)

    def _bar_rows(self) -> dict[int, str]:
        """Row index -> kind of the colour bar drawn under it (under the last row of each scale)."""
        last: dict[str, int] = {}
        for i, row in enumerate(self.rows):
            for tile in row.tiles:
                if tile.kind in ("attention", "difference"):
                    last[tile.kind] = i
        return {i: kind for kind, i in last.items()}

    def _add_tile(self, tile: Tile, row: TileRow, rect: tuple[float, ...]) -> None:
        ax = self.figure.add_axes(rect)
        ax.set_facecolor("black")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(tile.title, color=TEXT, fontsize=7, pad=2)
        rows, cols = [a for a in range(3) if a != (self.view.axis if self.view else 0)]
        ax.set_xlim(row.region[cols, 0], row.region[cols, 1])
        ax.set_ylim(row.region[rows, 1], row.region[rows, 0])  # rows downwards, as napari shows them
        ax.set_autoscale_on(False)
        if tile.kind == "image":
            finite = tile.grid.array[np.isfinite(tile.grid.array)]
            low, high = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
            background = ax.imshow(EMPTY, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            overlay = ax.imshow(EMPTY)
        else:
            background = ax.imshow(
                EMPTY, cmap="gray", vmin=self.ct_limits[0], vmax=self.ct_limits[1], interpolation="nearest"
            )
            smooth = self.smooth and tile.kind in ("attention", "difference")
            overlay = ax.imshow(
                EMPTY,
                interpolation="bilinear" if smooth else "nearest",
                interpolation_stage="data",
                **self._overlay_style(tile),
            )
        background.set_animated(True)
        overlay.set_animated(True)
        self._animated += [background, overlay]
        self._artists[tile.key] = {"axes": ax, "background": background, "overlay": overlay}

    def _add_bar(self, kind: str, rect: tuple[float, ...]) -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        contrast = self.contrast or Contrast(0.25, 4.0, "fixed", log=True)
        if kind == "attention":
            mappable = ScalarMappable(self._norm(), self.colormap)
            if contrast.log:
                label = "x uniform, log scale  (1 = what every token gets if all are equal; 2 = twice that)"
            else:
                real = f"; the maps span {contrast.real[0]:.3g} - {contrast.real[1]:.3g}" if contrast.real else ""
                label = f"STRETCHED to percentiles 1-99: x uniform {contrast.low:.3g} - {contrast.high:.3g}{real}"
        else:
            lim = self.difference_limit
            mappable = ScalarMappable(Normalize(-lim, lim), DIFFERENCE_CMAP)
            label = "difference, x uniform  (red: the first run looks here more; blue: the second)"
        cax = self.figure.add_axes(rect)
        bar = self.figure.colorbar(mappable, cax=cax, orientation="horizontal")
        if kind == "attention" and contrast.log:  # 1/4 ... 4 with uniform marked
            values = [v for v, _ in UNIFORM_TICKS if contrast.low <= v <= contrast.high]
            bar.set_ticks(values, labels=[t for v, t in UNIFORM_TICKS if v in values])
            bar.ax.minorticks_off()
            bar.ax.axvline(1.0, color=TEXT, linewidth=1.5)
        bar.ax.tick_params(colors=TEXT, labelsize=7, length=2)
        bar.set_label(label, color=TEXT, fontsize=7, labelpad=1)
        bar.outline.set_edgecolor("#8f9294")
        self._bars.append((kind, bar))

    def _set_height(self, width: float, height: float) -> None:
        dpi = self.figure.dpi
        self.figure.set_size_inches(width / dpi, height / dpi, forward=False)
        self.canvas.setFixedHeight(int(round(height)))
        self.setFixedHeight(int(round(height)))  # a resize the dock's collapsible section sees and follows

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
