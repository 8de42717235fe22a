"""Organ-clusters dock: patch embeddings of a CT from a pretraining run, a scatter linked both ways with the viewer.

Thin on purpose: every number (features, projection, clusters, metrics, the selection mask) comes from
`napari_dagman.core.embeddings`; this module gathers the settings, runs the job in the background and draws.

Links:

* plot -> viewer: a click on a point moves the sliders and the camera to its patch and marks it; a lasso or a
  rectangle lights its patches up in the CT (a Labels layer that "Selection -> labels" keeps as a new layer);
* viewer -> plot: points selected in the Points layer, or a click on an organ in the Labels layer (pan/zoom
  mode), are ringed in the plot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, PushButton, SpinBox
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_dagman._widgets._common import (
    OUTPUT_KEY,
    DeviceComboBox,
    JobRunner,
    Settings,
    is_output_layer,
    jump_to,
    layer_combo,
    notify_error,
    upsert_layer,
    volume_from_layer,
)
from napari_dagman.core.config import (
    EMBED_FEATURES,
    EMBED_POOLINGS,
    EMBED_SAMPLINGS,
    EmbedConfig,
    clustering_names,
    projection_names,
)
from napari_dagman.core.errors import DagmanError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.embeddings import EmbeddingResult
    from napari_dagman.core.volume import Volume

#: Names of the layers this dock draws (one each, updated in place).
POINTS_LAYER = "organ clusters"
SELECTION_LAYER = "organ clusters: selection"
PICKED_LAYER = "organ clusters: picked"
#: Above this many points the scatter draws a density map of all and a random subset in colour.
MAX_DRAWN_POINTS = 10_000
_BACKGROUND = "#262930"  # napari's dark theme
_HIGHLIGHT = "#ffff00"


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
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.toolbar)
        row.addWidget(self.tool.native)
        layout.addLayout(row)
        layout.addWidget(self.canvas)
        layout.addWidget(self.info)

        self.on_pick: list[Callable[[int], None]] = []
        self.on_select: list[Callable[[np.ndarray], None]] = []
        self.xy = np.zeros((0, 2))
        self.drawn = np.zeros(0, np.int64)
        self.highlighted = np.zeros(0, np.int64)
        self._press: tuple[float, float] | None = None  # pixels of the button press
        self._path: list[tuple[float, float]] = []  # data coordinates of the drag so far
        self._moved = False
        self._background: Any = None  # the last full render, without the overlays
        self._overlays: list[Any] = []
        self._highlight = self._picked = self._drag = self._legend = None
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
        for k, (name, rgba, rows) in enumerate(groups):
            rows = rows[drawn[rows]]
            ax.plot(
                self.xy[rows, 0],
                self.xy[rows, 1],
                "o",
                ms=size,
                mew=0,
                color=rgba,
                linestyle="none",
                label=f"{name} ({len(rows)})" if k < max_legend else "_nolegend_",
            )
        self._legend = None
        if groups:
            more = len(groups) - max_legend
            self._legend = legend = ax.legend(
                fontsize=6,
                markerscale=1.5,
                facecolor=_BACKGROUND,
                edgecolor="#8f9294",
                labelcolor="#d0d0d0",
                loc="upper right",
                title=f"+{more} more" if more > 0 else None,
                title_fontsize=6,
                framealpha=0.7,
            )
            legend.set_draggable(True, use_blit=True)
        if n:
            pad = 0.03 * np.ptp(self.xy, axis=0) + 1e-9
            ax.set_xlim(self.xy[:, 0].min() - pad[0], self.xy[:, 0].max() + pad[0])
            ax.set_ylim(self.xy[:, 1].min() - pad[1], self.xy[:, 1].max() + pad[1])
        # overlays: animated, so full renders leave them out and they are blitted on top
        (self._highlight,) = ax.plot([], [], "o", ms=size + 4, mfc="none", mec=_HIGHLIGHT, mew=1.0)
        (self._picked,) = ax.plot([], [], "+", ms=16, mew=2.0, color="#00ffff")
        (self._drag,) = ax.plot([], [], "-", color=_HIGHLIGHT, linewidth=1.0)
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
        on_legend = self._legend is not None and self._legend.contains(event)[0]  # dragging the legend
        ok = (
            event.button == 1 and event.inaxes is self.axes and not (busy or on_legend or event.xdata is None)
        )
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
        """The plot as shown, rings included, as a PNG."""
        for artist in self._overlays:
            artist.set_animated(False)  # savefig leaves animated artists out
        try:
            self.figure.savefig(path, dpi=150, facecolor=self.figure.get_facecolor())
        finally:
            for artist in self._overlays:
                artist.set_animated(True)
            self.canvas.draw_idle()


# --- the dock ---------------------------------------------------------------------------------------------------
def _label_names(layer: Any) -> dict[int, str] | None:
    """Organ names of a Labels layer: its metadata (our reader), else its features table (index, name)."""
    names = layer.metadata.get("label_names")
    if names:
        return {int(k): str(v) for k, v in names.items()}
    features = getattr(layer, "features", None)
    if features is not None and {"index", "name"} <= set(features.columns):
        return {int(i): str(n) for i, n in zip(features["index"], features["name"], strict=True) if int(i)}
    return None


class ClustersWidget(QWidget):
    """Organ clusters: embed a CT with a run's encoder, project, cluster, score, and explore in a linked scatter."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        import napari

        self.viewer = napari_viewer
        self.settings = Settings("clusters")
        helps = EmbedConfig.field_help()
        defaults = EmbedConfig()

        def tip(widget: Any, name: str) -> Any:
            widget.tooltip = helps[name]
            return widget

        not_ours = lambda layer: not is_output_layer(layer)  # noqa: E731
        self.image = layer_combo(napari_viewer, napari.layers.Image, "image", where=not_ours)
        self.labels = layer_combo(
            napari_viewer,
            napari.layers.Labels,
            "labels",
            nullable=True,
            where=not_ours,
            tooltip="organ label map on the image grid: organ names, purity, metrics and click-to-highlight",
        )
        self.run = FileEdit(label="run folder", mode="d", value=self.settings.get("run", ""))
        self.run.tooltip = helps["checkpoint"]
        self.features = tip(
            ComboBox(label="features", choices=EMBED_FEATURES, value=defaults.features), "features"
        )
        self.stage = tip(SpinBox(label="stage", min=0, max=4, value=defaults.stage), "stage")
        self.pooling = tip(
            ComboBox(label="pooling", choices=EMBED_POOLINGS, value=defaults.pooling), "pooling"
        )
        self.patch = tip(SpinBox(label="patch (voxels)", min=1, max=512, value=defaults.patch), "patch")
        self.stride = tip(SpinBox(label="stride (voxels)", min=1, max=512, value=defaults.stride), "stride")
        self.sampling = tip(
            ComboBox(label="sampling", choices=EMBED_SAMPLINGS, value=defaults.sampling), "sampling"
        )
        self.method = tip(ComboBox(label="projection", choices=projection_names(), value=defaults.method), "method")
        self.fast = tip(CheckBox(label="fast (not reproducible)", value=defaults.fast), "fast")
        self.clustering = tip(
            ComboBox(label="clustering", choices=clustering_names(), value=defaults.clustering), "clustering"
        )
        self.clusters = tip(
            SpinBox(label="clusters (0 = organs)", min=0, max=200, value=defaults.clusters), "clusters"
        )
        self.seed = tip(SpinBox(label="seed", min=0, max=2**31 - 1, value=defaults.seed), "seed")
        self.device = DeviceComboBox(value=self.settings.get("device", "auto"))
        self.form = Container(
            widgets=[self.image, self.labels, self.run, self.method, self.fast], labels=True
        )
        self.advanced = Container(
            widgets=[
                self.features,
                self.stage,
                self.pooling,
                self.patch,
                self.stride,
                self.sampling,
                self.clustering,
                self.clusters,
                self.seed,
                self.device,
            ],
            labels=True,
        )
        self.compute_button = PushButton(text="Compute")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.compute_button.changed.connect(self.compute)
        self.cancel_button.changed.connect(self.cancel)
        self.status = QLabel("Choose a CT, a run folder and (optionally) its organ labels")
        self.status.setWordWrap(True)
        self.metrics = QLabel("")
        self.metrics.setWordWrap(True)
        self.colour_by = ComboBox(label="colour by", choices=["organ", "cluster"], value="organ")
        self.colour_by.changed.connect(self.recolour)
        self.scatter = ScatterPlot(self)
        self.scatter.on_pick.append(self.pick)
        self.scatter.on_select.append(self.select)
        self.keep_button = PushButton(text="Selection -> labels")
        self.keep_button.tooltip = (
            "keep the selected patches as a new Labels layer (save it with File > Save)"
        )
        self.clear_button = PushButton(text="Clear selection")
        self.table_button = PushButton(text="Export table...")
        self.png_button = PushButton(text="Save plot PNG...")
        self.keep_button.changed.connect(lambda _=None: self.keep_selection())
        self.clear_button.changed.connect(lambda _=None: self.select(np.zeros(0, np.int64)))
        self.table_button.changed.connect(lambda _=None: self.export_table())
        self.png_button.changed.connect(lambda _=None: self.save_plot())

        from superqt import QCollapsible

        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        settings = QCollapsible("Features, patches and clusters")
        settings.addWidget(self.advanced.native)
        layout.addWidget(settings)
        buttons = QHBoxLayout()
        buttons.addWidget(self.compute_button.native)
        buttons.addWidget(self.cancel_button.native)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.metrics)
        colour_row = QHBoxLayout()
        colour_row.addWidget(QLabel("colour by"))
        colour_row.addWidget(self.colour_by.native)
        layout.addLayout(colour_row)
        layout.addWidget(self.scatter)
        exports = QHBoxLayout()
        for button in (self.keep_button, self.clear_button, self.table_button, self.png_button):
            exports.addWidget(button.native)
        layout.addLayout(exports)

        self.runner = JobRunner(
            self._on_event,
            on_done=self._on_done,
            on_error=self._on_error,
            on_stopped=self._on_stopped,
            description="organ clusters",
        )
        self.result: EmbeddingResult | None = None
        self.volume: Volume | None = None
        self.image_layer: Any = None
        self.labels_layer: Any = None
        self.points_layer: Any = None
        self.index = np.zeros((0, 3))  # patch centres in the image's voxels (snapped)
        self.world = np.zeros((0, 3))  # the same in napari world coordinates
        self.placement: dict[str, list[float]] = {}
        self.selected = np.zeros(0, np.int64)
        self._kept = 0
        self._job_layers: tuple[Any, Any] = (None, None)

    # settings -> config ---------------------------------------------------------------------------------------
    def config(self) -> EmbedConfig:
        """The `EmbedConfig` the form describes (validated: bad values raise `DagmanInputError`)."""
        run = str(self.run.value) if str(self.run.value) not in ("", ".") else None
        config = EmbedConfig(
            checkpoint=run,
            features=self.features.value,
            stage=int(self.stage.value),
            pooling=self.pooling.value,
            patch=int(self.patch.value),
            stride=int(self.stride.value),
            sampling=self.sampling.value,
            method=self.method.value,
            fast=bool(self.fast.value),
            clustering=self.clustering.value,
            clusters=int(self.clusters.value),
            seed=int(self.seed.value),
            device=self.device.value,
        )
        config.validate()
        return config

    # running ----------------------------------------------------------------------------------------------------
    def compute(self, _value: Any = None) -> None:
        """Start the embedding job on the chosen layers (bad input: a one-line notification, nothing starts)."""
        from napari_dagman.core.embeddings import run_embedding

        if self.runner.running:
            return
        try:
            config = self.config()
            image_layer, labels_layer = self.image.value, self.labels.value
            volume = volume_from_layer(image_layer, "image")
            labels = None
            if labels_layer is not None:
                labels = volume_from_layer(labels_layer, "labels")
                names = _label_names(labels_layer)
                if names:
                    labels.metadata["label_names"] = names
            if config.checkpoint is None:
                raise DagmanError("choose a run folder: its encoder describes the patches")
        except DagmanError as err:
            self.status.setText(str(err))
            notify_error(err)
            return
        self.settings.set("run", config.checkpoint)
        self.settings.set("device", config.device)
        self.volume = volume
        self._job_layers = (image_layer, labels_layer)
        self.status.setText("starting...")
        self.compute_button.enabled, self.cancel_button.enabled = False, True
        self.runner.start(lambda token: run_embedding(config, volume, labels, cancel=token))

    def cancel(self, _value: Any = None) -> None:
        self.runner.cancel()
        self.status.setText("cancelling...")

    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import LogEvent, ProgressEvent

        if isinstance(event, ProgressEvent):
            self.status.setText(f"{event.stage}: {event.done}/{event.total} windows")
        elif isinstance(event, LogEvent):
            self.status.setText(event.message)

    def _on_done(self, result: EmbeddingResult | None) -> None:
        if result is None:
            self.status.setText("cancelled")
            return
        self.show_result(result, *self._job_layers)

    def _on_error(self, err: BaseException) -> None:
        self.status.setText(str(err).splitlines()[0] if str(err) else type(err).__name__)

    def _on_stopped(self) -> None:
        self.compute_button.enabled, self.cancel_button.enabled = True, False

    # showing a result ---------------------------------------------------------------------------------------------
    def show_result(self, result: EmbeddingResult, image_layer: Any, labels_layer: Any = None) -> None:
        """Points at the patch centres (features = the table), the scatter, the metrics; links set up."""
        from napari_dagman.core.embeddings import metrics_summary

        emb = result.embeddings
        self.result, self.image_layer = result, image_layer
        if self.volume is None or self.volume.shape != tuple(image_layer.data.shape):
            self.volume = volume_from_layer(image_layer, "image")
        # points in the image's voxel grid (its scale and translate), snapped to voxel centres: the sliders keep
        # the image's steps and each point lies on exactly one displayed slice
        self.index = np.round(emb.centres_index())
        self.placement = {
            "scale": list(image_layer.scale)[-3:],
            "translate": list(image_layer.translate)[-3:],
        }
        self.world = (
            np.asarray(self.placement["translate"]) + np.asarray(self.placement["scale"]) * self.index
        )
        self.selected = np.zeros(0, np.int64)
        stride = (
            emb.patch if emb.settings.get("pooling") == "token" else emb.settings.get("stride", emb.patch[0])
        )
        step_mm = min(float(emb.patch_mm.min()), float(np.min(np.asarray(stride) * emb.model_spacing)))
        voxel_mm = float(np.min(self.placement["scale"]))
        with self._keep_active_layer():
            self.points_layer = upsert_layer(
                self.viewer,
                POINTS_LAYER,
                self.index,
                "points",
                **self.placement,
                features=result.table,
                size=0.6 * step_mm / voxel_mm,
                border_width=0,
                opacity=0.8,
                metadata={OUTPUT_KEY: True, "embedding_key": emb.key},
            )
            if SELECTION_LAYER in self.viewer.layers:
                self.viewer.layers.remove(SELECTION_LAYER)
        self._connect_points(self.points_layer)
        self._connect_labels(labels_layer)
        self.colour_by.enabled = "cluster" in result.table.columns and "organ" in result.table.columns
        if "organ" not in result.table.columns:
            self.colour_by.value = "cluster"
        self.recolour()
        metrics = result.metrics
        self.metrics.setText(metrics_summary(metrics) if metrics else "no label map: no organ metrics")
        self.status.setText(
            f"{len(emb)} patches of {' x '.join(f'{p:g}' for p in emb.patch_mm)} mm; click a point to go to "
            "its patch, drag to select"
        )

    @contextlib.contextmanager
    def _keep_active_layer(self) -> Iterator[None]:
        """Adding or updating our layers must not steal the active layer (its clicks drive the links)."""
        active = self.viewer.layers.selection.active
        yield
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active

    def _groups(self) -> list:
        """Colour groups of the table: by the chosen column, else by whichever exists, else one group."""
        from napari_dagman.core.embeddings import colour_groups

        table = self.result.table  # type: ignore[union-attr]
        columns = [c for c in (self.colour_by.value, "organ", "cluster") if c in table.columns]
        if not columns:  # no labels and no clustering
            return [("patches", (0.85, 0.85, 0.85, 1.0), np.arange(len(table)))]
        return colour_groups(table, columns[0])

    def _colours(self, groups: list) -> np.ndarray:
        colours = np.zeros((len(self.world), 4))
        for _, rgba, rows in groups:
            colours[rows] = rgba
        return colours

    def recolour(self, _value: Any = None) -> None:
        """Redraw the scatter and the points' colours by organ or by cluster."""
        if self.result is None:
            return
        groups = self._groups()
        method = self.result.config.method
        self.scatter.set_data(self.result.projection, groups, axis_name=method.upper())
        self.scatter.set_highlight(self.selected)
        if self.points_layer is not None and self.points_layer in self.viewer.layers:
            self.points_layer.face_color = self._colours(groups)

    # viewer -> plot -------------------------------------------------------------------------------------------------
    def _connect_points(self, layer: Any) -> None:
        if getattr(layer, "_dagman_clusters_linked", False):
            return
        layer.selected_data.events.items_changed.connect(self._on_points_selected)
        layer._dagman_clusters_linked = True

    def _on_points_selected(self, *_args: Any) -> None:
        if self.points_layer is not None:
            self.scatter.set_highlight(sorted(self.points_layer.selected_data))

    def _connect_labels(self, layer: Any) -> None:
        if self.labels_layer is not None and self._on_labels_click in self.labels_layer.mouse_drag_callbacks:
            self.labels_layer.mouse_drag_callbacks.remove(self._on_labels_click)
        self.labels_layer = layer
        if layer is not None:
            layer.mouse_drag_callbacks.append(self._on_labels_click)

    def _on_labels_click(self, layer: Any, event: Any) -> Any:
        """A click (not a drag) on the Labels layer in pan/zoom mode highlights that organ's patches."""
        if layer.mode != "pan_zoom":
            return
        yield
        dragged = False
        while event.type == "mouse_move":
            dragged = True
            yield
        if dragged:
            return
        value = layer.get_value(
            event.position,
            view_direction=getattr(event, "view_direction", None),
            dims_displayed=getattr(event, "dims_displayed", None),
            world=True,
        )
        self.highlight_label(value)

    def highlight_label(self, value: Any) -> np.ndarray:
        """Ring the patches whose majority label is ``value`` (0 or None clears); returns their ids."""
        emb = self.result.embeddings if self.result is not None else None
        if emb is None or emb.organ_id is None or value is None or int(value) == 0:
            ids = np.zeros(0, np.int64)
            self.scatter.set_highlight(ids)
            return ids
        ids = np.flatnonzero(emb.organ_id == int(value))
        self.scatter.set_highlight(ids)
        name = emb.organ_names.get(int(value), f"label {int(value)}")
        self.status.setText(f"{name}: {len(ids)} patches with it as majority label")
        return ids

    # plot -> viewer -----------------------------------------------------------------------------------------------
    def pick(self, patch_id: int) -> None:
        """Go to a patch: sliders and camera on its centre, a square marking it, its row in the status line."""
        if self.result is None:
            return
        emb, table = self.result.embeddings, self.result.table
        jump_to(self.viewer, self.world[patch_id])
        with self._keep_active_layer():
            upsert_layer(
                self.viewer,
                PICKED_LAYER,
                self.index[patch_id][None],
                "points",
                **self.placement,
                symbol="square",
                size=float(emb.patch_mm.min()) / float(np.min(self.placement["scale"])),
                face_color="transparent",
                border_color=_HIGHLIGHT,
                border_width=0.08,
                metadata={OUTPUT_KEY: True},
            )
        self.scatter.set_picked(patch_id)
        row = table.iloc[patch_id]
        parts = [f"patch {patch_id}"]
        if "organ" in table.columns:
            parts.append(f"{row['organ']} (purity {row['purity']:.2f})")
        if "cluster" in table.columns:
            parts.append(f"cluster {row['cluster']}")
        parts.append(f"at x {row['x_mm']:.0f}, y {row['y_mm']:.0f}, z {row['z_mm']:.0f} mm")
        self.status.setText(", ".join(parts))

    def select(self, ids: Any) -> None:
        """Light the patches ``ids`` up in the CT (selection layer), select their points, ring them in the plot."""
        from napari_dagman.core.embeddings import selection_mask

        if self.result is None or self.image_layer is None:
            return
        self.selected = np.unique(np.asarray(ids, np.int64))
        with self._keep_active_layer():
            upsert_layer(
                self.viewer,
                SELECTION_LAYER,
                selection_mask(self.result.embeddings, self.selected),
                "labels",
                **self.placement,
                opacity=0.4,
                colormap={0: "transparent", 1: _HIGHLIGHT, None: _HIGHLIGHT},
                metadata={OUTPUT_KEY: True},
            )
        if self.points_layer is not None and self.points_layer in self.viewer.layers:
            self.points_layer.selected_data = set(self.selected.tolist())
        self.scatter.set_highlight(self.selected)
        self.status.setText(f"{len(self.selected)} patches selected")

    # exports --------------------------------------------------------------------------------------------------------
    def keep_selection(self) -> Any:
        """A new Labels layer of the selected patches, with the image's geometry (File > Save writes NIfTI)."""
        from napari_dagman._layers import labels_layer_data
        from napari_dagman.core.embeddings import selection_mask

        if self.result is None or self.volume is None or not len(self.selected):
            notify_error("nothing selected: draw a lasso or a rectangle in the plot first")
            return None
        self._kept += 1
        name = f"cluster selection {self._kept}"
        mask = selection_mask(self.result.embeddings, self.selected)
        data, kwargs, _ = labels_layer_data(self.volume.with_array(mask), names={1: name}, name=name)
        return self.viewer.add_labels(data, **kwargs)

    def _ask_path(self, title: str, name: str, filters: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(self, title, name, filters)
        return path or None

    def export_table(self, path: str | Path | None = None) -> str | None:
        """Write the patch table (CSV, or Parquet for a .parquet name)."""
        from napari_dagman.core.embeddings import write_table

        if self.result is None:
            notify_error("nothing to export yet: compute the clusters first")
            return None
        path = path or self._ask_path("Export patch table", "patches.csv", "CSV (*.csv);;Parquet (*.parquet)")
        if not path:
            return None
        try:
            return write_table(self.result.table, path)
        except (DagmanError, OSError) as err:
            notify_error(err)
            return None

    def save_plot(self, path: str | Path | None = None) -> str | None:
        """Save the scatter as a PNG."""
        if self.result is None:
            notify_error("nothing to save yet: compute the clusters first")
            return None
        path = path or self._ask_path("Save plot", "clusters.png", "PNG (*.png)")
        if not path:
            return None
        try:
            self.scatter.save_png(path)
        except OSError as err:
            notify_error(err)
            return None
        return str(path)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.runner.cancel()
        self._connect_labels(None)
        super().closeEvent(event)
