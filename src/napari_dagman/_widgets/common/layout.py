"""A dock's body that scrolls vertically inside its napari dock."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import (
    QFrame,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    pass


# --- layout ----------------------------------------------------------------------------------------------------
class VerticalScrollArea(QScrollArea):
    """Scrolls vertically only: as wide as its content needs, as tall as it is given (a dock's body)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def setWidget(self, widget: QWidget) -> None:  # noqa: N802 (Qt's name)
        super().setWidget(widget)
        widget.installEventFilter(self)

    def eventFilter(self, obj: Any, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        # the content's needs changed (a longer status line, a rebuilt form): the dock follows its width
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def _width(self, content: int) -> int:
        return content + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = super().minimumSizeHint()
        if self.widget() is not None:
            hint.setWidth(self._width(self.widget().minimumSizeHint().width()))
        return hint

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        if self.widget() is not None:
            hint.setWidth(self._width(self.widget().sizeHint().width()))
        return hint


def scroll_body(widget: QWidget) -> VerticalScrollArea | None:
    """Move ``widget``'s layout (and the widgets it holds) into a vertical scroll area that becomes its only
    child; returns the scroll area (None when the widget has no layout yet).

    Qt supports taking a laid-out widget's layout for another widget; references to the layout and its widgets
    stay valid (a magicgui Container keeps adding to its layout).
    """
    layout = widget.layout()
    if layout is None:
        return None
    body = QWidget()
    body.setLayout(layout)  # Qt moves the layout, and the widgets it holds, to the body
    scroll = VerticalScrollArea()
    scroll.setWidget(body)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    # napari adds a stretch below docks that do not ask for height: this one fills its dock instead
    widget.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
    return scroll
