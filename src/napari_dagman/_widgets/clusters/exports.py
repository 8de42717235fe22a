"""The clusters dock's exports: the selection as a Labels layer, the patch table, the plot as a PNG (a part of
`ClustersWidget`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QFileDialog

from napari_dagman._widgets.common import notify_error
from napari_dagman.core.errors import DagmanError


class ClustersExports:
    """What `ClustersWidget` writes or keeps (its attributes are the dock's)."""

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
        return self._viewer.add_labels(data, **kwargs)

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
