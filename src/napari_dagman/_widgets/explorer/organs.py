"""Attention per organ in the explorer: a table (head, organ, attention share, volume share, enrichment) and a bar
plot of the enrichment; clicking an organ's row asks the dock to move the viewer to it (`organ_clicked`).

The figures come from `core.attention.organs.attention_by_organ`; this module only shows them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_dagman._widgets.explorer.figure import BACKGROUND, TEXT

if TYPE_CHECKING:
    import pandas as pd

    from napari_dagman.core.attention import AttentionMaps
    from napari_dagman.core.events import CancelToken, ProgressEvent
    from napari_dagman.core.volume import Volume

#: The table's columns, the table's column names and what each means (header tooltips).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("head", "head", "the class-attention head ('mean' = the mean of the heads)"),
    ("organ", "organ", "the organ's name (label id in the tooltip)"),
    (
        "enrichment",
        "enrichment",
        "attention share / volume share: 1 = as much as the organ's size earns (a uniform map), 2 = twice, "
        "0 = never looked at",
    ),
    ("attention_share", "attention share", "the fraction of the head's attention that falls on the organ"),
    ("volume_share", "volume share", "the organ's fraction of the voxels the maps cover"),
)
VOLUME_COLUMN = 4  # the table starts sorted by it, largest organs first
#: Organs in the bar plot: the largest ones, by volume share.
BAR_ORGANS = 10
READING = (
    "Enrichment = attention share / volume share: above 1 the head looks at the organ more than its size alone "
    "would earn, below 1 less, 0 never. Click a row to go to the organ."
)


class OrganPanel(QWidget):
    """Each head's attention per organ: a table that can be sorted and clicked, and the enrichment as bars."""

    organ_clicked = Signal(int, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.table_data: pd.DataFrame | None = None
        self.reading = QLabel(READING)
        self.reading.setWordWrap(True)
        self.head = ComboBox(
            label="head",
            choices=["mean"],
            tooltip="the head whose rows the table and the bars show ('all': every head)",
        )
        self.head.native.setToolTip(self.head.tooltip)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([title for _, title, _ in COLUMNS])
        for column, (_, _, tip) in enumerate(COLUMNS):
            self.table.horizontalHeaderItem(column).setToolTip(tip)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(180)
        self.table.setToolTip("click a row to move the viewer to that organ; click a header to sort")
        self.figure = Figure(figsize=(4, 2.4), facecolor=BACKGROUND)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setFixedHeight(230)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.canvas.setToolTip(
            "enrichment of the largest organs the maps cover; the line at 1 is a uniform map"
        )
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.reading)
        layout.addWidget(self.head.native)
        layout.addWidget(self.table)
        layout.addWidget(self.canvas)
        self.head.changed.connect(lambda *_: self._fill())
        self.table.cellClicked.connect(self._on_click)

    def set_table(self, table: pd.DataFrame | None) -> None:
        """The per-organ figures of the shown maps (None: clear)."""
        self.table_data = table
        heads = [] if table is None else list(dict.fromkeys(str(h) for h in table["head"]))
        current = self.head.value
        self.head.choices = (
            (["mean"] if "mean" in heads else []) + [h for h in heads if h != "mean"] + ["all"]
        )
        self.head.value = current if current in self.head.choices else self.head.choices[0]
        self._fill()

    def rows(self) -> pd.DataFrame:
        """The rows shown for the chosen head, largest organs first."""
        table = self.table_data
        if table is None:
            import pandas as pd

            return pd.DataFrame(columns=[c for c, _, _ in COLUMNS])
        shown = (
            table if self.head.value == "all" else table[table["head"].astype(str) == str(self.head.value)]
        )
        return shown.sort_values(["volume_share", "head"], ascending=[False, True], kind="stable")

    def _fill(self) -> None:
        rows = self.rows()
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows.itertuples(index=False)):
            for c, (column, _, _) in enumerate(COLUMNS):
                value = getattr(row, column)
                item = QTableWidgetItem()
                if isinstance(value, float | np.floating):
                    item.setData(Qt.ItemDataRole.DisplayRole, round(float(value), 4))  # sorts as a number
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                else:
                    item.setText(str(value))
                item.setData(Qt.ItemDataRole.UserRole, (int(row.id), str(row.organ)))
                if column == "organ":
                    item.setToolTip(f"{row.organ} (label {int(row.id)})")
                self.table.setItem(r, c, item)
        # sorting on sorts at once by the header's indicator: keep the order of `rows` (largest organs first)
        self.table.horizontalHeader().setSortIndicator(VOLUME_COLUMN, Qt.SortOrder.DescendingOrder)
        self.table.setSortingEnabled(True)
        self._draw_bars(rows)

    def organ_of_row(self, row: int) -> tuple[int, str] | None:
        """(label id, name) of a table row as shown (after sorting)."""
        item = self.table.item(row, 0)
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    def _on_click(self, row: int, _column: int) -> None:
        organ = self.organ_of_row(row)
        if organ is not None:
            self.organ_clicked.emit(int(organ[0]), str(organ[1]))

    def _draw_bars(self, rows: pd.DataFrame) -> None:
        fig = self.figure
        fig.clear()
        if rows.empty:
            self.canvas.draw_idle()
            return
        ax = fig.add_subplot(111)
        ax.set_facecolor(BACKGROUND)
        organs = list(dict.fromkeys(rows["organ"]))[:BAR_ORGANS]
        heads = list(dict.fromkeys(str(h) for h in rows["head"]))
        width = 0.8 / len(heads)
        for k, head in enumerate(heads):
            part = rows[rows["head"].astype(str) == head].set_index("organ")
            values = [float(part["enrichment"].get(o, np.nan)) for o in organs]
            ax.barh(
                np.arange(len(organs)) + k * width - 0.4 + width / 2,
                values,
                height=width,
                label=f"head {head}" if head != "mean" else "mean",
            )
        ax.axvline(1.0, color="#d0d0d0", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(organs)))
        ax.set_yticklabels(organs, fontsize=7, color=TEXT)
        ax.invert_yaxis()
        ax.set_xlabel("enrichment (1 = as much as its size earns)", color=TEXT, fontsize=7)
        ax.tick_params(colors="#d0d0d0", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#8f9294")
        if len(heads) > 1:
            ax.legend(fontsize=6, loc="lower right", facecolor=BACKGROUND, labelcolor=TEXT, framealpha=0.6)
        fig.tight_layout(pad=0.4)
        self.canvas.draw_idle()


def organ_job(
    maps: AttentionMaps, labels: Volume, names: dict[int, str], cancel: CancelToken | None = None
) -> Generator[ProgressEvent, None, pd.DataFrame]:
    """`attention_by_organ` as a job (resampling the maps onto the label map takes a second or more)."""
    from napari_dagman.core.attention.organs import attention_by_organ
    from napari_dagman.core.events import ProgressEvent

    yield ProgressEvent(0, 1, "attention per organ")
    table = attention_by_organ(maps, labels, names)
    yield ProgressEvent(1, 1, "attention per organ")
    return table
