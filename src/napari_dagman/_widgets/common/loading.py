"""Docks that open at once: PyTorch, MONAI and the dock's own module load in a background thread; the dock is built
in napari's thread when they are there.

Opening the pretraining dock used to freeze napari for 5-7 s (issue 27): its device list imported torch, its method
forms imported every method (MONAI, scikit-learn, pydicom), its plots matplotlib, all in the GUI thread. Now napari
docks a `DeferredDock` at once (a line saying what loads), a worker thread imports the libraries, and the real dock
is made inside it when they are loaded (0.2-0.3 s of building). A process that has torch and MONAI already (a dock
opened after another, a script, the tests) gets the real dock at once.

A plain ``import torch`` in a thread still froze the GUI for 0.3-0.4 s: Python holds the GIL while the dynamic
loader runs libtorch's static initialisers. `ctypes` releases the GIL around ``dlopen``, so the big shared libraries
are opened through it first and the import then finds them loaded (``import torch`` alone: longest stall 0.39 s ->
0.15 s). Opening a whole dock still stalls napari up to 0.3 s while MONAI and the rest import
(`benchmarks/dock_latency.py`, docs/pretraining.md#opening-a-dock).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

if TYPE_CHECKING:
    import napari

#: What the docks need before they can be built; imported once per process, off napari's thread.
HEAVY_MODULES: tuple[str, ...] = (
    "torch",
    "monai",
    "sklearn",
    "SimpleITK",
    "matplotlib.figure",
    "matplotlib.backends.backend_qtagg",
    "napari_dagman.core.segmentation",
    "napari_dagman.core.embeddings",
)

#: Shared libraries opened through ctypes before their module is imported (the GIL is free while they load).
_LIBRARIES: tuple[tuple[str, str], ...] = (
    ("torch", "lib/libc10.so"),
    ("torch", "lib/libtorch_cpu.so"),
    ("torch", "lib/libtorch.so"),
    ("torch", "lib/libtorch_python.so"),
    ("SimpleITK", "_SimpleITK*.so"),
)

_lock = threading.Lock()


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


def _open_shared_libraries() -> None:
    """dlopen the big libraries with the GIL released; a library that is not there (another platform) is skipped:
    the import that follows loads it the ordinary way."""
    for package, pattern in _LIBRARIES:
        if package in sys.modules:
            continue
        folder = _package_dir(package)
        for path in glob.glob(os.path.join(folder, pattern)) if folder else []:
            with contextlib.suppress(OSError):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


#: Once these are imported (by a dock that trained, a script, the tests), the rest loads in well under a second:
#: the dock is then built at once, so a caller that docks it (the training docks' "Explore attention") gets it.
SLOWEST_MODULES: tuple[str, ...] = ("torch", "monai")


def loaded() -> bool:
    """True when the slowest libraries are imported already (`load` then takes a fraction of a second)."""
    return all(name in sys.modules for name in SLOWEST_MODULES)


def load(modules: tuple[str, ...] = ()) -> None:
    """Import the heavy libraries, every registered method and ``modules`` (in the calling thread)."""
    from napari_dagman.core.methods.registry import REGISTRY

    with _lock:
        _open_shared_libraries()
        for name in HEAVY_MODULES:
            importlib.import_module(name)
        for spec in list(REGISTRY.values()):
            spec.load()
    for name in modules:
        importlib.import_module(name)


class _Finished(QObject):
    """Carries a worker thread's end to napari's thread (a queued signal: the receiver lives there)."""

    done = Signal(str)  # "" when loaded, else the reason


#: The import thread starts this long after the dock is made: napari first docks it, saves its settings and
#: repaints (with the thread holding the GIL, that first turn took 0.4-0.7 s instead of 0.05 s).
START_DELAY_MS = 400


def when_loaded(
    callback: Callable[[str], None],
    modules: tuple[str, ...] = (),
    parent: QObject | None = None,
    delay_ms: int = 0,
) -> None:
    """Call ``callback("")`` in napari's thread once `load` has run (now, if it has), or ``callback(reason)`` if an
    import failed. The import runs in a daemon thread (started after ``delay_ms``): closing napari meanwhile does
    not wait for it."""
    if loaded():
        callback(_load_reason(modules))
        return
    from qtpy.QtCore import QTimer

    finished = _Finished(parent)
    finished.done.connect(callback)

    def start() -> None:
        threading.Thread(
            target=lambda: _emit(finished, _load_reason(modules)), name="napari-dagman-load", daemon=True
        ).start()

    timer = QTimer(finished)  # dies with the dock: a dock closed before the delay starts nothing
    timer.setSingleShot(True)
    timer.timeout.connect(start)
    timer.start(delay_ms)


def _load_reason(modules: tuple[str, ...]) -> str:
    """`load`, and "" when it worked, else why not in one line."""
    try:
        load(modules)
    except Exception as err:  # noqa: BLE001 (any import failure becomes the dock's one line)
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return ""


def _emit(finished: _Finished, reason: str) -> None:
    with contextlib.suppress(RuntimeError):  # the dock (the signal's parent) was closed while loading
        finished.done.emit(reason)


class DeferredDock(QWidget):
    """What napari docks: a line while the libraries load, then the real dock (``.dock``) inside it. A subclass
    names the dock (``target``, "module:Class") and says what it is for (``what``)."""

    target: ClassVar[str] = ""
    what: ClassVar[str] = ""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._module, self._class_name = self.target.split(":")
        what = self.what
        self.dock: QWidget | None = None
        self._on_built: list[Callable[[QWidget], Any]] = []
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.note = QLabel(f"Loading PyTorch and MONAI for the {what} dock (the first dock of a session)...")
        self.note.setWordWrap(True)
        layout.addWidget(self.note)
        layout.addStretch(1)
        when_loaded(self._build, (self._module,), parent=self, delay_ms=START_DELAY_MS)

    def _build(self, reason: str) -> None:
        if reason:
            from napari_dagman._widgets.common.notify import notify_error

            self.note.setText(f"cannot open this dock: {reason}")
            notify_error(f"cannot open the dock: {reason}")
            return
        dock_class = getattr(importlib.import_module(self._module), self._class_name)
        dock = dock_class(self._viewer)
        dock._tabbed = True  # this wrapper tabbed itself when napari showed it
        layout = self.layout()
        layout.removeWidget(self.note)
        self.note.deleteLater()
        layout.takeAt(0)  # the stretch
        layout.addWidget(dock)
        self.dock = dock
        for callback in self._on_built:
            callback(dock)
        self._on_built.clear()

    def call_when_built(self, callback: Callable[[QWidget], Any]) -> None:
        """``callback(dock)`` now if the dock is built, else once it is."""
        if self.dock is not None:
            callback(self.dock)
        else:
            self._on_built.append(callback)

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if not getattr(self, "_tabbed", False):
            self._tabbed = True
            from napari_dagman._widgets.common.dock import tab_with_open_docks

            tab_with_open_docks(self)


def inner_dock(widget: Any) -> Any:
    """The real dock of what napari docked (a `DeferredDock`'s, once built; the widget itself otherwise)."""
    return widget.dock if isinstance(widget, DeferredDock) else widget


def _dock(name: str, target: str, what: str) -> type[DeferredDock]:
    """A `DeferredDock` class for the manifest (napari instantiates a class, passing ``napari_viewer``)."""
    return type(name, (DeferredDock,), {"target": target, "what": what, "__module__": __name__})


PretrainDock = _dock("PretrainDock", "napari_dagman._widgets.training.pretrain:PretrainWidget", "pretraining")
AttentionDock = _dock("AttentionDock", "napari_dagman._widgets.explorer.dock:AttentionWidget", "attention explorer")
ClustersDock = _dock("ClustersDock", "napari_dagman._widgets.clusters.dock:ClustersWidget", "organ clusters")
FinetuneDock = _dock("FinetuneDock", "napari_dagman._widgets.training.finetune:FinetuneWidget", "fine-tuning")
ClassifyDock = _dock("ClassifyDock", "napari_dagman._widgets.classify.dock:ClassifyWidget", "classification")
ResultsDock = _dock(
    "ResultsDock", "napari_dagman._widgets.results.dock:SegmentationResultsWidget", "segmentation results"
)
