"""The results dock's cohort table (a part of `SegmentationResultsWidget`): a folder written by
``napari-dagman predict FOLDER --out DIR`` opens as one row per case, worst mean Dice first; a click opens the case
(its CT, the prediction, the reference) with its organ table and disagreement layer, read in the background."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
)

from napari_dagman._widgets.common import OUTPUT_KEY, upsert_layer
from napari_dagman._widgets.results.view import make_table
from napari_dagman.core.errors import DagmanError

if TYPE_CHECKING:
    from napari_dagman.core.segmentation.cohort import Cohort, CohortCase

#: The cohort table's columns and what each one means (header tooltips).
COHORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("case", "the case's name (its file, or its dataset.json entry)"),
    ("organs", "organs in the prediction or the reference"),
    ("mean Dice", "mean Dice over the organs the reference holds ('-': the case has no reference)"),
    ("worst organ", "the organ with the lowest Dice in this case, and its Dice"),
)


class ResultsCohort:
    """The cohort table of `SegmentationResultsWidget` (its attributes are the dock's)."""

    cohort: Cohort | None = None

    def _make_cohort_controls(self) -> tuple[QPushButton, QTableWidget]:
        button = QPushButton("Open cohort...")
        button.setToolTip("a folder written by `napari-dagman predict FOLDER --out DIR`: one row per case")
        table = make_table(COHORT_COLUMNS, min_height=120)
        table.setVisible(False)  # until a cohort is opened
        button.clicked.connect(self._ask_open_cohort)
        table.cellClicked.connect(lambda row, _col: self.open_case(row))
        return button, table

    def _ask_open_cohort(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a cohort's predictions")
        if folder:
            self.open_cohort(folder)

    def open_cohort(self, folder: str) -> bool:
        """List the cases of a cohort folder (refused in one line when it is not one)."""
        from napari_dagman.core.segmentation.cohort import read_cohort

        try:
            cohort = read_cohort(folder)
        except DagmanError as err:
            return self.refuse(err)
        self.cohort = cohort
        self._fill_cohort(cohort)
        failed = f"; {len(cohort.failed)} case(s) failed: {', '.join(cohort.failed)}" if cohort.failed else ""
        self.status.setText(f"{len(cohort.cases)} case(s), worst mean Dice first{failed}; click a case to open it")
        return True

    def _fill_cohort(self, cohort: Cohort) -> None:
        def dice(value: float) -> str:
            return f"{value:.3f}" if np.isfinite(value) else "-"

        table = self.cohort_table
        table.setRowCount(len(cohort.cases))
        for r, row in enumerate(cohort.cases.itertuples(index=False)):
            worst = f"{row.worst_organ} ({dice(row.worst_dice)})" if row.worst_organ else "-"
            for c, text in enumerate((str(row.case), str(row.organs), dice(row.mean_dice), worst)):
                item = QTableWidgetItem(text)
                if c in (1, 2):
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                table.setItem(r, c, item)
        table.setVisible(True)

    def open_case(self, row: int) -> bool:
        """Open the case of the cohort table's ``row``: its CT, prediction and reference, with the organ table and
        the disagreement layer (read and scored in the background)."""
        from napari_dagman.core.segmentation.cohort import cohort_case_job

        if self.cohort is None or not 0 <= row < len(self.cohort.cases) or self._busy():
            return False
        name = str(self.cohort.cases["case"].iloc[row])
        files = self.cohort.files.get(name)
        if files is None:
            return self.refuse(DagmanError(f"{name} is not in the cohort summary's list of files"))
        self.cohort_table.selectRow(row)
        self._runner.start(lambda token: cohort_case_job(name, files, cancel=token))
        self._started(f"opening {name}...")
        return True

    def case_pieces(self, case: CohortCase) -> list[Any]:
        """The CT and the reference as layers, then what a prediction draws (`result_pieces`), one per turn."""
        from napari_dagman._layers import image_layer_data, labels_layer_data

        def image() -> None:
            data, kwargs, _ = image_layer_data(case.image, name=case.name)
            self._image_layer = upsert_layer(self._viewer, kwargs.pop("name"), data, "image", **kwargs)

        def reference() -> None:
            self.reference_layer = None
            if case.results.reference is not None:
                data, kwargs, _ = labels_layer_data(case.results.reference, case.results.names, f"{case.name} reference")
                kwargs["metadata"][OUTPUT_KEY] = "reference"
                self.reference_layer = upsert_layer(self._viewer, kwargs.pop("name"), data, "labels", **kwargs)

        return [image, reference, *self.result_pieces(case.results)]
