"""Long drawing split over turns of napari's event loop, so the window repaints and answers between the pieces.

The explorer's first result froze napari for 1.8-1.9 s in one piece (four new layers, 1.3 s; twelve tile axes,
0.5 s; `benchmarks/dock_latency.py`): each piece is now a turn of its own.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from qtpy.QtCore import QObject, QTimer


class Turns(QObject):
    """A queue of callables run one per event-loop turn. `start` replaces what is still queued (a newer result
    supersedes an older one); `finish` runs the rest now (tests, scripts, shutdown)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._queue: deque[Callable[[], object]] = deque()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._next)

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def start(self, pieces: Iterable[Callable[[], object]]) -> None:
        self._queue = deque(pieces)
        if self._queue:
            self._timer.start()

    def add(self, pieces: Iterable[Callable[[], object]]) -> None:
        """Queue ``pieces`` after what is queued (each live preview is drawn, in order)."""
        self._queue.extend(pieces)
        if self._queue and not self._timer.isActive():
            self._timer.start()

    def _next(self) -> None:
        if self._queue:
            self._queue.popleft()()
        if self._queue:
            self._timer.start()

    def finish(self, timeout: float = 60.0) -> bool:
        """Run the queued pieces now; True when none is left."""
        end = time.monotonic() + timeout
        while self._queue and time.monotonic() < end:
            self._queue.popleft()()
        self._timer.stop()
        return not self._queue
