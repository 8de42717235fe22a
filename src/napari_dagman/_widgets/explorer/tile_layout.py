"""How `TileFigure` lays its tiles out and styles them: axes placed in pixels for the widget's width, row headers,
the colour scales of the maps and masks, and the colour bars (a part of `TileFigure`, in `explorer.figure`).

The layout is made once per result (or per new width, colour scale or slicing orientation); what changes with the
viewer's slice is `TileFigure`'s own (it replaces the images' data and blits them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_dagman._widgets.explorer.tiles import UNIFORM_TICKS, Contrast, Tile, TileRow

BACKGROUND = "#262930"  # napari's dark theme
TEXT = "#e0e0e0"
SELECTED = "#ffff00"
DIFFERENCE_CMAP = "RdBu_r"
#: Layout in pixels: smallest tile, gaps, a row's header, a tile's title, a colour bar with its label.
MIN_TILE, GAP, HEADER, TITLE, BAR = 92, 6, 16, 13, 46
EMPTY = np.full((1, 1), np.nan, np.float32)


class TileLayout:
    """The layout and colour scales of `TileFigure` (its attributes are the figure's)."""

    # --- styles -------------------------------------------------------------------------------------------------
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

    # --- layout -------------------------------------------------------------------------------------------------
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
                real = (
                    f"; the maps span {contrast.real[0]:.3g} - {contrast.real[1]:.3g}"
                    if contrast.real
                    else ""
                )
                label = (
                    f"STRETCHED to percentiles 1-99: x uniform {contrast.low:.3g} - {contrast.high:.3g}{real}"
                )
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
