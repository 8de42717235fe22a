"""The explorer's actions on a result: attention per organ (and going to an organ), NIfTI export (a part of
`AttentionWidget`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QFileDialog

from napari_dagman._widgets.common import (
    jump_to,
    notify_info,
    notify_warning,
    slice_axis,
)
from napari_dagman._widgets.explorer.organs import organ_job
from napari_dagman.core.errors import DagmanError

if TYPE_CHECKING:
    pass


class ExplorerActions:
    """Organs and export of `AttentionWidget` (its attributes are the dock's)."""

    # --- organs ---------------------------------------------------------------------------------------------
    def _compute_organs(self) -> bool:
        """Each head's attention per organ of the chosen label map, for the maps shown (in the background)."""
        if self.result is None or self._organ_runner.running:
            return False
        if self.organs.value is None:
            self.organ_panel.set_table(None)
            return False
        if self.result.maps is None:
            notify_warning(
                "no attention maps to measure per organ (this method does not train the class attention)"
            )
            return False
        try:
            labels = self._labels_volume()
        except DagmanError as err:
            return self.refuse(err)
        maps, names = self.result.maps, labels.metadata.get("label_names") or {}
        self._organ_runner.start(lambda token: organ_job(maps, labels, names, cancel=token))
        self.status.setText("attention per organ...")
        return True

    def _on_organs(self, table: Any) -> None:
        if self.result is not None:
            self.result.organs = table
        self.organ_panel.set_table(table)
        self.status.setText("attention per organ updated")

    def go_to_organ(self, organ: int) -> bool:
        """Move the viewer to an organ of the label map: its largest slice, the camera on its centre there."""
        from napari_dagman.core.segmentation import organ_focus

        layer = self.organs.value
        if layer is None or layer not in self._viewer.layers:
            notify_warning("choose the organs' label map to go to an organ")
            return False
        index = organ_focus(np.asarray(layer.data), int(organ), slice_axis(self._viewer))
        if index is None:
            notify_warning(f"label {organ} is not in '{layer.name}'")
            return False
        jump_to(self._viewer, layer.data_to_world(index))
        layer.selected_label = int(organ)
        self.status.setText(f"organ {organ}: its largest slice, {index[slice_axis(self._viewer)]}")
        return True

    # --- export ---------------------------------------------------------------------------------------------
    def _ask_export(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export attention maps and masks to")
        if folder:
            self.export(folder)

    def export(self, folder: str) -> bool:
        """Write the shown maps and masks as NIfTI to ``folder`` in the background; True when started."""
        from napari_dagman.core.attention import export_attention_job

        if self.result is None or self._image_volume is None:
            notify_warning("nothing to export yet: Compute first")
            return False
        if self._export_runner.running:
            notify_warning("an export is already running")
            return False
        result, image, on_grid = self.result, self._image_volume, bool(self.on_image_grid.value)
        prefix = f"attention_{result.scope}"
        self._export_runner.start(
            lambda token: export_attention_job(result, image, folder, on_image_grid=on_grid, prefix=prefix)
        )
        self.status.setText(f"exporting to {folder}...")
        return True

    def _on_exported(self, paths: list[str]) -> None:
        folder = str(Path(paths[0]).parent) if paths else ""
        self.status.setText(f"exported {len(paths)} files to {folder}")
        notify_info(f"Exported {len(paths)} NIfTI files to {folder}")
