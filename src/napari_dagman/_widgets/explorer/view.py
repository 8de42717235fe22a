"""What the explorer draws: its layout, the result as layers and small multiples that follow the viewer's slice,
the sanity-check sentences, diversity, tiles shown as layers, style and 3D (a part of `AttentionWidget`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QUrl
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets.common import (
    notify_warning,
    slice_axis,
)
from napari_dagman._widgets.common.forms import compact_form
from napari_dagman._widgets.explorer.controls import (
    HELP_FILE,
    READ_CHECKS,
    READ_DIFFERENCE,
    READ_DIVERSITY,
    READ_HEADS,
    READ_MASKS,
    READ_PICTURES,
    check_lines,
    diversity_lines,
    model_lines,
)
from napari_dagman._widgets.explorer.figure import DiversityFigure, TileFigure
from napari_dagman._widgets.explorer.organs import OrganPanel
from napari_dagman._widgets.explorer.tiles import (
    DROPPED,
    SliceView,
    auto_contrast,
    difference_limit,
    difference_row,
    head_row,
    mask_row,
    run_label,
    volume_grid,
)

if TYPE_CHECKING:
    from napari_dagman.core.attention import AttentionResult


class ExplorerView:
    """Drawing of `AttentionWidget`: layout, layers, tiles, style (its attributes are the dock's)."""

    def _layout_dock(self) -> None:
        o = self.options
        inputs = compact_form(
            [self.image, self.run, self.compare, self.organs, self.which, self.weights, o["device"]]
        )
        maps = compact_form(
            [self.scope, self.overlap, self.subtoken, self.smooth, self.colormap, self.stretch, self.checks,
             self.check_seeds]
        )  # fmt: skip
        masks = compact_form(
            [
                self.strategies,
                self.ratio,
                self.noise_rate,
                self.seed,
                self.show_mask,
                self.contour,
                self.follow,
            ]
        )
        view3d = compact_form([self.rendering, self.threshold])
        self._forms += [inputs, maps, masks]
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        for title, form in (("Image and runs", inputs), ("Maps", maps)):
            box = QCollapsible(title, self)
            box.addWidget(form.native)
            box.expand(animate=False)
            layout.addWidget(box)
        buttons = QHBoxLayout()
        self.compute_button = QPushButton("Compute")
        self.compute_button.setToolTip("compute the maps and the masks (Cancel while it runs)")
        self.last_run_button = QPushButton("Last run")
        self.last_run_button.setToolTip("use the run most recently trained from the pretraining dock")
        self.help = QLabel(
            f'<a href="{QUrl.fromLocalFile(str(HELP_FILE)).toString()}">Help: reading the maps</a>'
        )
        self.help.setOpenExternalLinks(True)
        self.help.setToolTip(f"what the maps, masks and figures mean: {HELP_FILE.name} in the project's docs")
        for widget in (self.compute_button, self.last_run_button, self.help):
            buttons.addWidget(widget)
        layout.addLayout(buttons)
        self._toggle = (self.compute_button, "Compute")
        self._start_buttons.append(self.last_run_button)
        self.model_line = QLabel("")
        self.model_line.setWordWrap(True)
        layout.addWidget(self.model_line)

        self.heads_reading, self.masks_reading = QLabel(READ_HEADS), QLabel(READ_MASKS)
        self.checks_reading = QLabel(READ_CHECKS)
        self.checks_panel = QWidget()
        QVBoxLayout(self.checks_panel).setContentsMargins(0, 0, 0, 0)
        self.check_labels: list[QLabel] = []
        self.contrast_line = QLabel("")
        self.heads_figure = TileFigure(empty_text="Compute to see each head's attention on this slice")
        self.masks_figure = TileFigure(empty_text="Compute to see every strategy's mask on this slice")
        self.diversity_text, self.diversity_reading = QLabel(""), QLabel(READ_DIVERSITY)
        self.diversity_figure = DiversityFigure()
        self.organ_panel = OrganPanel()
        self.three_d_button = QPushButton("3D view")
        self.three_d_button.setToolTip(
            "switch napari between its 2D and 3D views (the maps use the rendering above)"
        )
        sections = [
            ("Before reading the maps", [self.checks_reading, self.checks_panel]),
            ("Heads on this slice", [self.heads_reading, self.contrast_line, self.heads_figure]),
            ("Masks on this slice", [masks.native, self.masks_reading, self.masks_figure]),
            ("Attention per organ", [self.organ_panel]),
            ("Head diversity", [self.diversity_reading, self.diversity_text, self.diversity_figure]),
            ("3D view", [view3d.native, self.three_d_button]),
        ]
        for title, widgets in sections:
            box = QCollapsible(title, self)
            for widget in widgets:
                if isinstance(widget, QLabel):
                    widget.setWordWrap(True)
                box.addWidget(widget)
            if title != "3D view":
                box.expand(animate=False)
            layout.addWidget(box)
        export_row = QHBoxLayout()
        self.export_button = QPushButton("Export NIfTI...")
        self.export_button.setEnabled(False)
        self.export_button.setToolTip("write the shown maps (mean and per head) and the masks as NIfTI files")
        export_row.addWidget(self.export_button)
        export_row.addWidget(self.on_image_grid.native)
        layout.addLayout(export_row)
        self.status.setText("choose an image layer and a run folder, then Compute")
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.make_scrollable()

    def _show_result(self) -> None:
        """Layers, small multiples, organ table, diversity and the model line of the current result(s)."""
        result, second = self.result, self.compared
        maps = [r.maps for r in (result, second) if r is not None]
        self.layers.style.contrast = auto_contrast(maps, stretch=bool(self.stretch.value))
        self.layers.style.difference_limit = difference_limit(self.layers.difference)
        if result.maps is not None and not self._masks_only:  # 3D: the top tenth of the mean map shows
            threshold, self.layers.style.top = np.percentile(result.maps.mean, (90.0, 99.9))
            with self.threshold.changed.blocked():
                self.threshold.value = round(float(threshold), 2)
        self._sync_style()
        self.layers.prune()
        # one piece per event-loop turn (`Turns`): napari repaints and answers between the new layers and figures
        keys = [k for k in self.layers.tile_keys() if k[0] == "difference" or k[1] == 0]  # the second run's: on click
        pieces = [lambda k=key: self.layers.layer(k) for key in keys]
        pieces += [self._apply_mask_visibility, self._refresh_figures, self._show_panels]
        self.drawing.start(pieces)

    def _show_panels(self) -> None:
        """The organ table, the model line, diversity and the checks of the current result."""
        result = self.result
        if result is None:
            return
        self.organ_panel.set_table(result.organs)
        if result.organs is None and result.maps is not None and self.organs.value is not None:
            self._compute_organs()
        self.model_line.setText(model_lines(self._shown_runs()))
        self._show_diversity()
        if not self._masks_only:
            self._show_checks()
        self._watch_ct()

    def _show_checks(self) -> None:
        """One sentence per sanity check of the first run (its figures in the tooltip)."""
        layout = self.checks_panel.layout()
        for label in self.check_labels:
            layout.removeWidget(label)
            label.deleteLater()
        self.check_labels = []
        lines = check_lines(self.result)
        if not lines and self.result is not None and self.result.maps is not None:
            lines = [("No checks computed (tick 'sanity checks' and Compute).", "")]
        for text, figures in lines:
            label = QLabel(text)
            label.setWordWrap(True)
            label.setToolTip(figures)
            layout.addWidget(label)
            self.check_labels.append(label)

    def _labels(self) -> tuple[str, str]:
        """Short names of the two runs in titles: method and folder."""
        pairs = zip((self.result, self.compared), self._run_names, strict=True)
        return tuple(run_label(r, Path(n).name) if r is not None else "" for r, n in pairs)  # type: ignore[return-value]

    def _refresh_figures(self) -> None:
        """Lay the tiles out for the current results and draw them on the viewer's slice."""
        if self.result is None or self._image_volume is None:
            return
        ct = volume_grid(self._image_volume)
        labels = self._labels()
        results = [r for r in (self.result, self.compared) if r is not None]
        heads = [head_row(r, ct, i, labels[i]) for i, r in enumerate(results)]
        heads.append(difference_row(self.layers.difference, ct, labels))
        masks = [mask_row(r, i, labels[i]) for i, r in enumerate(results)]
        view = self.slice_view()
        style = self.layers.style
        for figure in (self.heads_figure, self.masks_figure):
            figure.colormap, figure.smooth = style.colormap, style.smooth
            if self._image_layer is not None:
                figure.ct_limits = tuple(self._image_layer.contrast_limits)
        self.heads_figure.set_rows(
            [r for r in heads if r is not None],
            ct,
            view,
            contrast=style.contrast,
            difference_limit=style.difference_limit,
        )
        self.masks_figure.set_rows([r for r in masks if r is not None], ct, view)
        self.contrast_line.setText(style.contrast.text() if style.contrast else "")
        reading = READ_HEADS if self.result.maps is not None else READ_PICTURES
        self.heads_reading.setText(reading + (READ_DIFFERENCE if self.layers.difference is not None else ""))

    def slice_view(self) -> SliceView:
        """The viewer's slice axis (of the CT's three) and its world position."""
        axis = slice_axis(self._viewer)
        return SliceView(axis, float(np.asarray(self._viewer.dims.point)[-3 + axis]))

    def redraw_slice(self) -> None:
        """Cut the small multiples at the viewer's slice (the viewer's dims changed)."""
        if self.result is None or self._viewer.dims.ndim < 3 or self._image_layer not in self._viewer.layers:
            return  # the CT is gone (layers removed): the figures keep their last slice
        view = self.slice_view()
        self.heads_figure.set_slice(view)
        self.masks_figure.set_slice(view)

    def _watch_ct(self) -> None:
        """The tiles' grey window follows the CT layer's contrast limits."""
        layer = self._image_layer
        if layer is not None and self._watched is not layer:
            layer.events.contrast_limits.connect(self._on_ct_limits)
            self._watched = layer

    def _on_ct_limits(self, _event: Any = None) -> None:
        if self._image_layer is not None:
            for figure in (self.heads_figure, self.masks_figure):
                figure.set_ct_limits(tuple(self._image_layer.contrast_limits))

    def _shown_runs(self) -> list[tuple[str, AttentionResult]]:
        """(label, result) of the run and of the run it is compared with."""
        pairs = zip(self._labels(), (self.result, self.compared), strict=True)
        return [(label, result) for label, result in pairs if result is not None]

    def _show_diversity(self) -> None:
        text, figures = diversity_lines(self._shown_runs())
        self.diversity_text.setText(text)
        self.diversity_figure.show_diversity(figures)

    # --- tiles -> layers ------------------------------------------------------------------------------------
    def show_tile(self, key: tuple, *, quiet: bool = False) -> Any:
        """Show a tile's head, mean, mask or picture as the napari layer (alone among its kind)."""
        layer = self.layers.show(key, contour=bool(self.contour.value))
        if layer is None:
            if not quiet:
                notify_warning("nothing to show for this tile")
            return None
        for figure in (self.heads_figure, self.masks_figure):
            if key in figure.tile_keys():
                figure.select(key)
        if key[0] in ("mask", "dropped") and key[1] == 0:
            with self.show_mask.changed.blocked():
                self.show_mask.value = key[2] if key[0] == "mask" else DROPPED
        self.status.setText(f"showing '{layer.name}'")
        return layer

    def _apply_mask_visibility(self, *_: Any) -> None:
        """Show the mask chosen in 'show' alone (the first one there is when the method has not that one)."""
        chosen = self.show_mask.value
        if self.result is None:
            return
        if chosen == "none":
            for layer in self.layers.mask_layers():
                layer.visible = False
            return
        key = ("dropped", 0) if chosen == DROPPED else ("mask", 0, chosen)
        shown = [k for k in self.layers.tile_keys() if k[0] in ("mask", "dropped", "picture") and k[1] == 0]
        if shown:
            self.show_tile(key if key in shown else shown[0], quiet=True)

    # --- style and 3D ---------------------------------------------------------------------------------------
    def _sync_style(self) -> None:
        style = self.layers.style
        style.colormap, style.smooth = self.colormap.value, bool(self.smooth.value)
        style.rendering, style.threshold = self.rendering.value, float(self.threshold.value)

    def _restyle(self) -> None:
        """Colour map, scale, smooth or raw grid, 3D rendering: the layers and the tiles, without recomputing."""
        self._sync_style()
        maps = [r.maps for r in (self.result, self.compared) if r is not None]
        self.layers.style.contrast = auto_contrast(maps, stretch=bool(self.stretch.value))
        self.layers.restyle()
        style = self.layers.style
        for figure in (self.heads_figure, self.masks_figure):
            figure.set_style(colormap=style.colormap, smooth=style.smooth, contrast=style.contrast)
        self.contrast_line.setText(style.contrast.text() if style.contrast else "")

    def toggle_3d(self) -> None:
        """napari's 2D <-> 3D view; the maps switch to the 3D rendering above the threshold."""
        self._viewer.dims.ndisplay = 2 if self._viewer.dims.ndisplay == 3 else 3
