"""The plots the docks draw with matplotlib: a live curve plot (losses, Dice) and a linked 2D scatter.

Both are drawn in the GUI thread and kept cheap (see each class). matplotlib is imported when a plot is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

#: Above this many points the scatter draws a density map of all and a random subset in colour.
MAX_DRAWN_POINTS = 10_000
_BACKGROUND = "#262930"  # napari's dark theme
HIGHLIGHT = "#ffff00"


# --- a live curve plot ------------------------------------------------------------------------------------------
#: Colours of a plot's series, in the order they first appear (the primary series has its own).
SERIES_COLOURS = (
    "#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292", "#a1887f", "#90a4ae",
)  # fmt: skip
PRIMARY_COLOUR = "#f5f5f5"


class LossPlot(QWidget):
    """Curves that grow while a job runs (loss terms, validation Dice), redrawn at most once per ``interval_ms``.

    Each series keeps its colour for the plot's life (a cleared plot, a resumed run: the same term, the same
    colour); the ``primary`` series (the total loss, the mean Dice) is drawn thicker, light, above the others,
    so its terms never hide it. The step axis has whole-number ticks.

    Drawing happens in the GUI thread, so it is kept cheap (measured ~15 ms per redraw on a 2-core CPU): one
    persistent line per series whose data are replaced, the layout recomputed only when the legend or the
    widget size changes, and at most one redraw a second by default.
    """

    def __init__(
        self,
        title: str = "",
        ylabel: str = "",
        *,
        log_y: bool = False,
        parent: QWidget | None = None,
        interval_ms: int = 1000,
        primary: str | None = None,
    ) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        # no automatic tight layout: it would run on every draw (the costliest part of a redraw)
        self.figure = Figure(figsize=(4, 2.6))
        self.figure.patch.set_facecolor("#262930")  # napari's dark theme background
        self.axes = self.figure.add_subplot(111)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(180)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._title, self._ylabel, self._log_y = title, ylabel, log_y
        self._series: dict[str, tuple[list[float], list[float]]] = {}
        self._lines: dict[str, Any] = {}
        self.primary = primary
        self._colours: dict[str, str] = {} if primary is None else {primary: PRIMARY_COLOUR}
        self._dirty = False
        self._layout_dirty = True
        self._timer = QTimer(self)
        self._timer.setInterval(max(50, int(interval_ms)))
        self._timer.timeout.connect(self._redraw_if_dirty)
        self._timer.start()
        self._style()

    def _style(self) -> None:
        ax = self.axes
        ax.set_facecolor("#262930")
        for spine in ax.spines.values():
            spine.set_color("#8f9294")
        ax.tick_params(colors="#d0d0d0", labelsize=8)
        ax.set_title(self._title, color="#e0e0e0", fontsize=9)
        ax.set_xlabel("step", color="#d0d0d0", fontsize=8)
        ax.set_ylabel(self._ylabel, color="#d0d0d0", fontsize=8)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers (no tick at 1.5)
        if self._log_y:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_yscale("log")
            # plain numbers ("0.5", "2", "6"), not "6x10^0": loss values span one or two decades
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())

    def add_point(self, series: str, step: float, value: float) -> None:
        if not np.isfinite(value) or (self._log_y and value <= 0):
            return
        xs, ys = self._series.setdefault(series, ([], []))
        xs.append(float(step))
        ys.append(float(value))
        self._dirty = True

    def series(self, name: str) -> tuple[list[float], list[float]]:
        return self._series.get(name, ([], []))

    def colour(self, name: str) -> str:
        """The colour of a series: the same for the plot's life, whatever was cleared or drawn since."""
        if name not in self._colours:
            taken = sum(1 for key in self._colours if key != self.primary)
            self._colours[name] = SERIES_COLOURS[taken % len(SERIES_COLOURS)]
        return self._colours[name]

    def clear(self) -> None:
        self._series.clear()
        for line in self._lines.values():
            line.remove()
        self._lines.clear()
        legend = self.axes.get_legend()
        if legend is not None:
            legend.remove()
        self._layout_dirty = True
        self.redraw()

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self._layout_dirty = True
        super().resizeEvent(event)

    def _redraw_if_dirty(self) -> None:
        if self._dirty:
            self.redraw()

    def redraw(self) -> None:
        self._dirty = False
        ax = self.axes
        added = False
        for name, (xs, ys) in self._series.items():
            line = self._lines.get(name)
            if line is None:
                primary = name == self.primary
                (line,) = ax.plot(
                    xs,
                    ys,
                    label=name,
                    color=self.colour(name),
                    linewidth=2.0 if primary else 1.1,
                    zorder=3 if primary else 2,
                )
                self._lines[name] = line
                added = True
            else:
                line.set_data(xs, ys)
        if added:
            legend = ax.legend(
                fontsize=7,
                ncol=2,
                framealpha=0.6,
                facecolor="#262930",
                edgecolor="#8f9294",
                labelcolor="#d0d0d0",
            )
            legend.set_draggable(True)
            self._layout_dirty = True
        if self._series:
            ax.relim()
            ax.autoscale_view()
        if self._layout_dirty and self.canvas.width() > 50 and self.canvas.height() > 50:
            self._layout_dirty = False
            # a canvas too small to lay out keeps the last layout
            with contextlib.suppress(ValueError, np.linalg.LinAlgError):
                self.figure.tight_layout()
        self.canvas.draw_idle()

    def save_png(self, path: str) -> None:
        self.redraw()
        self.figure.savefig(path, dpi=150, facecolor=self.figure.get_facecolor())


# --- the scatter ------------------------------------------------------------------------------------------------
class ScatterPlot(QWidget):
    """A matplotlib scatter of a 2D projection, one colour per group, with pick, lasso and rectangle selection.

    Large sets (more than ``max_points``) are drawn as a density map of every point under a random subset in
    colour, and the plot says so; selections always reach every point, drawn or not. Drawing uses one
    marker line per group (Agg stamps a marker once per line). Everything that changes while the user works
    - the rings of highlighted points, the picked point, the lasso or rectangle being dragged - is blitted over
    a saved render of the points, so only a new data set or colouring renders them again. (matplotlib's own
    selectors re-render the whole figure whenever other animated artists are visible, hence our own.)
    """

    def __init__(self, parent: QWidget | None = None, *, max_points: int = MAX_DRAWN_POINTS) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg, NavigationToolbar2QT
        from matplotlib.figure import Figure

        self.max_points = max_points
        self.figure = Figure(figsize=(4, 3.6))
        self.figure.patch.set_facecolor(_BACKGROUND)
        # fixed margins: an automatic layout would render every label once more per draw
        self.figure.subplots_adjust(left=0.14, right=0.98, bottom=0.12, top=0.98)
        self.axes = self.figure.add_subplot(111)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(260)
        self.toolbar = NavigationToolbar2QT(self.canvas, self)
        self.tool = ComboBox(label="select with", choices=["lasso", "rectangle"], value="lasso")
        self.info = QLabel("")
        self.info.setWordWrap(True)
        # the legend sits below the plot, in the dock's own font: it never covers points and stays readable
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.toolbar)
        row.addWidget(self.tool.native)
        layout.addLayout(row)
        layout.addWidget(self.canvas)
        layout.addWidget(self.legend)
        layout.addWidget(self.info)

        self.on_pick: list[Callable[[int], None]] = []
        self.on_select: list[Callable[[np.ndarray], None]] = []
        self.xy = np.zeros((0, 2))
        self.groups: list[tuple[str, tuple[float, ...], np.ndarray]] = []
        self.drawn = np.zeros(0, np.int64)
        self.highlighted = np.zeros(0, np.int64)
        self._press: tuple[float, float] | None = None  # pixels of the button press
        self._path: list[tuple[float, float]] = []  # data coordinates of the drag so far
        self._moved = False
        self._background: Any = None  # the last full render, without the overlays
        self._overlays: list[Any] = []
        self._highlight = self._picked = self._drag = None
        self.canvas.mpl_connect("button_press_event", self._on_press)
        self.canvas.mpl_connect("motion_notify_event", self._on_motion)
        self.canvas.mpl_connect("button_release_event", self._on_release)
        self.canvas.mpl_connect("draw_event", self._on_draw)
        self._style()

    def _style(self, xlabel: str = "", ylabel: str = "") -> None:
        ax = self.axes
        ax.set_facecolor(_BACKGROUND)
        for spine in ax.spines.values():
            spine.set_color("#8f9294")
        ax.tick_params(colors="#d0d0d0", labelsize=7)
        ax.set_xlabel(xlabel, color="#d0d0d0", fontsize=8)
        ax.set_ylabel(ylabel, color="#d0d0d0", fontsize=8)

    # data -----------------------------------------------------------------------------------------------------
    def set_data(
        self,
        xy: np.ndarray,
        groups: list[tuple[str, tuple[float, ...], np.ndarray]],
        *,
        axis_name: str = "",
        max_legend: int = 12,
    ) -> None:
        """Draw ``xy`` (N, 2) as ``groups`` of ``(name, RGBA, row indices)`` (largest first, drawn first)."""
        self.xy = np.asarray(xy, float)
        n = len(self.xy)
        ax = self.axes
        ax.clear()
        self._style(f"{axis_name} 1", f"{axis_name} 2")
        drawn = np.ones(n, bool)
        if n > self.max_points:
            # every point in a density map, a seeded random subset in colour on top (said below the plot)
            rng = np.random.default_rng(0)
            drawn[:] = False
            drawn[rng.choice(n, self.max_points, replace=False)] = True
            counts, xe, ye = np.histogram2d(self.xy[:, 0], self.xy[:, 1], bins=200)
            ax.imshow(
                np.log1p(counts.T),
                extent=(xe[0], xe[-1], ye[0], ye[-1]),
                origin="lower",
                aspect="auto",
                cmap="gray",
                interpolation="nearest",
                alpha=0.9,
            )
            self.info.setText(
                f"{n:,} patches: density of all (grey), a random {self.max_points:,} drawn in colour; "
                "selections include every patch"
            )
        else:
            self.info.setText(f"{n:,} patches")
        self.drawn = np.flatnonzero(drawn)
        size = 3.0 if len(self.drawn) < 3000 else 2.0
        for _name, rgba, rows in groups:
            rows = rows[drawn[rows]]
            ax.plot(self.xy[rows, 0], self.xy[rows, 1], "o", ms=size, mew=0, color=rgba, linestyle="none")
        self.groups = list(groups)
        self.legend.setText(legend_html(groups, max_legend))
        if n:
            pad = 0.03 * np.ptp(self.xy, axis=0) + 1e-9
            ax.set_xlim(self.xy[:, 0].min() - pad[0], self.xy[:, 0].max() + pad[0])
            ax.set_ylim(self.xy[:, 1].min() - pad[1], self.xy[:, 1].max() + pad[1])
        # overlays: animated, so full renders leave them out and they are blitted on top
        (self._highlight,) = ax.plot([], [], "o", ms=size + 4, mfc="none", mec=HIGHLIGHT, mew=1.0)
        (self._picked,) = ax.plot([], [], "+", ms=16, mew=2.0, color="#00ffff")
        (self._drag,) = ax.plot([], [], "-", color=HIGHLIGHT, linewidth=1.0)
        self._overlays = [self._highlight, self._picked, self._drag]
        for artist in self._overlays:
            artist.set_animated(True)
        self._background = None
        self.highlighted = np.zeros(0, np.int64)
        self.canvas.draw_idle()

    def set_highlight(self, ids: Any) -> None:
        """Ring the points ``ids`` (every one, drawn in colour or not)."""
        ids = np.asarray(sorted(ids) if isinstance(ids, set) else ids, np.int64).reshape(-1)
        self.highlighted = ids[(ids >= 0) & (ids < len(self.xy))]
        if self._highlight is not None:
            self._highlight.set_data(self.xy[self.highlighted, 0], self.xy[self.highlighted, 1])
            self._blit()

    def set_picked(self, index: int | None) -> None:
        if self._picked is None:
            return
        if index is None:
            self._picked.set_data([], [])
        else:
            self._picked.set_data([self.xy[index, 0]], [self.xy[index, 1]])
        self._blit()

    # blitting -----------------------------------------------------------------------------------------------
    def _on_draw(self, _event: Any) -> None:
        # after every full render: keep it without the overlays, then draw the overlays on top
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        for artist in self._overlays:
            self.axes.draw_artist(artist)

    def _blit(self) -> None:
        if self._background is None:  # nothing rendered yet: the next full render draws the overlays
            self.canvas.draw_idle()
            return
        self.canvas.restore_region(self._background)
        for artist in self._overlays:
            self.axes.draw_artist(artist)
        self.canvas.blit(self.figure.bbox)

    # mouse: click = pick, drag = lasso or rectangle -----------------------------------------------------------
    def _on_press(self, event: Any) -> None:
        busy = bool(getattr(self.toolbar, "mode", ""))  # pan or zoom active: the mouse is theirs
        ok = event.button == 1 and event.inaxes is self.axes and not (busy or event.xdata is None)
        self._press = (event.x, event.y) if ok else None
        self._path = [(event.xdata, event.ydata)] if ok else []
        self._moved = False

    def _on_motion(self, event: Any) -> None:
        if self._press is None or event.inaxes is not self.axes or event.xdata is None:
            return
        # a drag once the mouse has gone more than 3 pixels from the press (a lasso may end where it began)
        self._moved |= max(abs(event.x - self._press[0]), abs(event.y - self._press[1])) > 3
        if self.tool.value == "lasso":
            self._path.append((event.xdata, event.ydata))
            outline = self._path
        else:
            self._path = [self._path[0], (event.xdata, event.ydata)]
            (x0, y0), (x1, y1) = self._path
            outline = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        if self._drag is not None:
            self._drag.set_data(*zip(*outline, strict=True))
            self._blit()

    def _on_release(self, event: Any) -> None:
        press, path = self._press, self._path
        self._press, self._path = None, []
        if press is None or event.button != 1:
            return
        if self._drag is not None:
            self._drag.set_data([], [])
        if not self._moved:
            self._blit()
            index = self.nearest(event.x, event.y)
            if index is not None:
                for callback in self.on_pick:
                    callback(index)
            return
        if self.tool.value == "lasso":
            ids = self.select_polygon(path)
        else:
            (x0, y0), (x1, y1) = path[0], path[-1]
            ids = self.select_box(x0, y0, x1, y1)
        self._blit()
        for callback in self.on_select:
            callback(ids)

    def nearest(self, x_pixel: float, y_pixel: float, radius: float = 10.0) -> int | None:
        """The drawn point nearest to a display position, if within ``radius`` pixels."""
        if not len(self.drawn):
            return None
        screen = self.axes.transData.transform(self.xy[self.drawn])
        d2 = ((screen - (x_pixel, y_pixel)) ** 2).sum(axis=1)
        best = int(np.argmin(d2))
        return int(self.drawn[best]) if d2[best] <= radius**2 else None

    def select_polygon(self, vertices: Any) -> np.ndarray:
        """Ids of every point inside a polygon given in data coordinates."""
        from matplotlib.path import Path as MplPath

        if len(vertices) < 3 or not len(self.xy):
            return np.zeros(0, np.int64)
        return np.flatnonzero(MplPath(np.asarray(vertices, float)).contains_points(self.xy))

    def select_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Ids of every point inside a rectangle given in data coordinates."""
        (xa, xb), (ya, yb) = sorted((x0, x1)), sorted((y0, y1))
        x, y = self.xy[:, 0], self.xy[:, 1]
        return np.flatnonzero((x >= xa) & (x <= xb) & (y >= ya) & (y <= yb))

    def save_png(self, path: str | Path) -> None:
        """The plot as shown, rings included, with its legend to the right of the points, as a PNG."""
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker="o", linestyle="none", color=rgba, label=f"{name} ({len(rows)})")
            for name, rgba, rows in self.groups
        ]
        legend = (
            self.axes.legend(
                handles=handles,
                loc="upper left",
                bbox_to_anchor=(1.02, 1.0),
                fontsize=8,
                frameon=False,
                labelcolor="#d0d0d0",
                ncol=1 + len(handles) // 24,
            )  # fmt: skip
            if handles
            else None
        )
        for artist in self._overlays:
            artist.set_animated(False)  # savefig leaves animated artists out
        try:
            self.figure.savefig(path, dpi=150, facecolor=self.figure.get_facecolor(), bbox_inches="tight")
        finally:
            if legend is not None:
                legend.remove()
            for artist in self._overlays:
                artist.set_animated(True)
            self.canvas.draw_idle()


def legend_html(groups: list[tuple[str, tuple[float, ...], np.ndarray]], shown: int = 12) -> str:
    """A legend as rich text: a disc of each group's colour, its name and size; the rest counted, by name."""

    def disc(rgba: tuple[float, ...]) -> str:
        r, g, b = (int(round(255 * c)) for c in rgba[:3])
        return f"<span style='color:#{r:02x}{g:02x}{b:02x}; font-size:large'>&#9679;</span>"

    parts = [f"{disc(rgba)}&nbsp;{name}&nbsp;({len(rows)})" for name, rgba, rows in groups[:shown]]
    rest = groups[shown:]
    if rest:
        names = ", ".join(name for name, _, _ in rest)
        parts.append(f"<span style='color:#d0d0d0'>+{len(rest)} more: {names}</span>")
    return " &nbsp; ".join(parts)
