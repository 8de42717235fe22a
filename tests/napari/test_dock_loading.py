"""Docks open without freezing napari (issue 27): PyTorch, MONAI and the rest are imported off napari's thread, and
the dock is built when they are there. Timings are the UI-latency benchmark's; this checks where the imports run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from napari_dagman._widgets.common.loading import HEAVY_MODULES

# A fresh interpreter: in the test process torch is imported already, so a dock would be built at once.
CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import napari
    from qtpy.QtWidgets import QApplication

    WATCHED = {watched!r}
    first = {{}}  # module -> the thread that imported it (a finder sees importlib's imports too)

    class Tracer:
        def find_spec(self, fullname, path=None, target=None):
            if fullname in WATCHED and fullname not in first:
                first[fullname] = threading.current_thread().name
            return None

    viewer = napari.Viewer(show=True)
    QApplication.processEvents()
    sys.meta_path.insert(0, Tracer())
    _, widget = viewer.window.add_plugin_dock_widget("napari-dagman", {name!r})
    built_at_once = getattr(widget, "dock", None) is not None
    main_thread_after_open = {{m: t for m, t in first.items()}}
    end = time.monotonic() + 120
    while getattr(widget, "dock", None) is None and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)
    print(json.dumps({{
        "built_at_once": built_at_once,
        "built": type(widget.dock).__name__ if widget.dock is not None else None,
        "imported_by": first,
        "during_open": main_thread_after_open,
    }}))
    viewer.close()
    """
)


@pytest.mark.parametrize(
    ("name", "dock_class"),
    [("Pretraining", "PretrainWidget"), ("Segmentation results", "SegmentationResultsWidget")],
)
def test_a_dock_imports_torch_and_monai_off_napari_thread_then_builds(name, dock_class):
    watched = sorted({m.split(".")[0] for m in HEAVY_MODULES if not m.startswith("napari_dagman")})
    code = CHILD.format(watched=watched, name=name)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # napari got a placeholder at once, and the real dock once the libraries were there
    assert report["built_at_once"] is False
    assert report["built"] == dock_class
    # every heavy library was imported, none of them in napari's (main) thread
    assert set(report["imported_by"]) == set(watched)
    assert "MainThread" not in report["imported_by"].values(), report["imported_by"]
    assert report["during_open"] == {} or "MainThread" not in report["during_open"].values()
