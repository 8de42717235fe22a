"""The results dock's export: the prediction as a label map or DICOM SEG, the table as CSV (a part of
`SegmentationResultsWidget`)."""

from __future__ import annotations

from qtpy.QtWidgets import QFileDialog

from napari_dagman._widgets.common import (
    layer_label_names,
    notify_error,
    notify_info,
    notify_warning,
    volume_from_layer,
)
from napari_dagman.core.errors import DagmanError, DagmanInputError


class ResultsExport:
    """Saving the prediction and the table of `SegmentationResultsWidget` (its attributes are the dock's)."""

    # --- export ---------------------------------------------------------------------------------------------------
    def export_prediction(self, path: str) -> list[str]:
        """The prediction layer (with any edits) as NIfTI/MHA/NRRD with the CT's geometry and organ names, or,
        for a path ending in ``.dcm``, as a DICOM SEG over the DICOM series the prediction was made on."""
        from napari_dagman.core.outputs import label_format, write_labels

        if self.prediction_layer is None:
            raise DagmanInputError("no prediction to save yet")
        volume = volume_from_layer(self.prediction_layer, "labels")
        names = layer_label_names(self.prediction_layer)
        source = None
        if label_format(path).needs_source:  # a DICOM SEG: over the series the prediction was made on
            from napari_dagman.core.segmentation.dicom_seg import check_dicom_source

            if self._image_layer is None:
                raise DagmanInputError("the image the prediction was made on is no longer open")
            source = volume_from_layer(self._image_layer, "image")
            for note in check_dicom_source(source):  # said before the file is written, as predict does
                notify_warning(note)
        written = write_labels(volume, path, names, source=source)
        if source is not None:  # which codes the segments carry, and which are generic
            from napari_dagman.core.segmentation.dicom_seg import coding_notes

            for note in coding_notes(names):
                notify_info(note)
        return written

    def export_table(self, path: str) -> str:
        """The results table as CSV (organ, id, volumes, Dice, HD95, focus and worst slice)."""
        from napari_dagman.core.io import atomic_write_text

        if self.results is None:
            raise DagmanInputError("no results table yet")
        atomic_write_text(path, self.results.table.to_csv(index=False))
        return path

    def _ask_save_prediction(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Save prediction",
            "prediction.nii.gz",
            "Label maps (*.nii.gz *.nii *.mha *.nrrd);;DICOM SEG over the DICOM series (*.dcm)",
        )
        if path:
            try:
                written = self.export_prediction(path)
                notify_info(f"saved {', '.join(written)}")
            except DagmanError as err:
                notify_error(err)

    def _ask_save_table(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save table", "results.csv", "CSV (*.csv)")
        if path:
            try:
                notify_info(f"saved {self.export_table(path)}")
            except DagmanError as err:
                notify_error(err)
