"""How fast the organ-clusters scatter draws tens of thousands of points, and how long it holds napari's event loop.

Run under a real X server or Xvfb (never ``QT_QPA_PLATFORM=offscreen``)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/scatter_render.py                 # ~1 minute
    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/scatter_render.py --points 50000

Synthetic data: ``--points`` patches in 20 Gaussian blobs, coloured by 20 organ names (the real code paths:
`colour_groups`, `ScatterPlot`, `ClustersWidget.show_result`). Phases, each repeated ``--repeats`` times:

* ``set-all``: `ScatterPlot.set_data` with every point drawn in colour (threshold raised above N), then its render;
* ``set-density``: the default above 10,000 points: a density image of all points + 10,000 drawn in colour;
* ``redraw``: a full synchronous re-render of the current plot (what a resize or a pan costs);
* ``highlight``: ringing 2,000 points (a selection made in the viewer), then its render;
* ``pick`` and ``lasso``: nearest point under a click, and a polygon selection over all N points;
* ``drag``: a whole lasso drawn with the mouse (press, 40 moves each blitting the outline, release + selection);
* ``dock``: the whole `show_result` in napari (Points layer of N points with its features table + scatter).

For each phase: the wall time of the call and of the next synchronous render (``canvas.draw()``), and the lateness of a
5 ms Qt timer while the phase runs and the event loop settles (p50 / p99 / max, ms): the max is how long the GUI
could not react. The machine's load average is printed (a shared machine shows other people's jobs in every figure).
Results go to stdout and to ``--json`` (default: benchmarks/results/scatter_render.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

INTERVAL_MS = 5


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, Any]:
    """(N, 2) projection in 20 blobs and a patch table with an organ column."""
    import pandas as pd

    from napari_dagman.core.labels import TOTALSEG_V2_NAMES

    rng = np.random.default_rng(seed)
    group = rng.integers(0, 20, n)
    centres = rng.uniform(-10, 10, (20, 2))
    xy = centres[group] + rng.normal(0, 1.2, (n, 2))
    table = pd.DataFrame({"organ": np.asarray(TOTALSEG_V2_NAMES[:20])[group], "cluster": group})
    return xy.astype(np.float32), table


class Lateness:
    """Records how late a 5 ms QTimer fires while the event loop runs."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(INTERVAL_MS)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        self.timer.start()

    def measure(self, action, settle: float = 1.0) -> dict[str, float]:
        """Run ``action`` (in the GUI thread, as a click would) and let the loop settle; timer lateness in ms."""
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        app.processEvents()
        self.ticks.clear()
        start = time.perf_counter()
        action()
        called = time.perf_counter() - start
        while time.perf_counter() - start < called + settle:
            app.processEvents()
            time.sleep(0.001)
        stamps = np.asarray([start, *self.ticks])
        late = np.maximum(np.diff(stamps) * 1000.0 - INTERVAL_MS, 0.0) if len(stamps) > 1 else np.array([0.0])
        return {
            "call_ms": called * 1000.0,
            "late_p50_ms": float(np.percentile(late, 50)),
            "late_p99_ms": float(np.percentile(late, 99)),
            "late_max_ms": float(late.max()),
        }


def drag_lasso(scatter: Any, steps: int = 40) -> None:
    """A real mouse drag: press, ``steps`` moves around a circle (each blits the outline), release.

    The circle stays in the lower left, away from the legend (a drag that starts on it moves the legend).
    """
    from matplotlib.backend_bases import MouseEvent
    from qtpy.QtWidgets import QApplication

    angles = np.linspace(0, 2 * np.pi, steps)
    pixels = scatter.axes.transData.transform(np.c_[5 * np.cos(angles) - 4, 5 * np.sin(angles) - 4])
    MouseEvent("button_press_event", scatter.canvas, *pixels[0], button=1)._process()
    for x, y in pixels[1:]:
        QApplication.processEvents()  # moves arrive one by one, with the event loop running between them
        MouseEvent("motion_notify_event", scatter.canvas, x, y, button=1)._process()
    MouseEvent("button_release_event", scatter.canvas, *pixels[-1], button=1)._process()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1000.0


def scatter_phases(n: int, repeats: int) -> dict[str, list[dict[str, float]]]:
    from qtpy.QtWidgets import QApplication

    from napari_dagman._widgets.clusters.dock import ScatterPlot
    from napari_dagman.core.embeddings import colour_groups

    app = QApplication.instance() or QApplication([])
    xy, table = synthetic(n)
    groups = colour_groups(table, "organ")
    scatter = ScatterPlot()
    scatter.resize(520, 480)
    scatter.show()
    app.processEvents()
    clock = Lateness()
    out: dict[str, list[dict[str, float]]] = {}

    def record(name: str, action, render: bool = True) -> None:
        row = clock.measure(action)
        if render:
            row["render_ms"] = timed(scatter.canvas.draw)
        out.setdefault(name, []).append(row)

    for _ in range(repeats):
        scatter.max_points = n + 1
        record("set-all", lambda: scatter.set_data(xy, groups, axis_name="UMAP"))
        record("redraw", lambda: scatter.canvas.draw())
        chosen = np.random.default_rng(1).choice(n, 2000, replace=False)
        record("highlight", lambda chosen=chosen: scatter.set_highlight(chosen))
        scatter.max_points = 10_000
        record("set-density", lambda: scatter.set_data(xy, groups, axis_name="UMAP"))
        x, y = scatter.axes.transData.transform(xy[0])
        record("pick", lambda x=x, y=y: scatter.nearest(x, y), render=False)
        polygon = [(-5, -5), (5, -5), (5, 5), (-5, 5)]
        record("lasso", lambda polygon=polygon: scatter.select_polygon(polygon), render=False)
        record("drag", lambda: drag_lasso(scatter), render=False)
    scatter.close()
    return out


def dock_phase(n: int, repeats: int) -> list[dict[str, float]]:
    """`ClustersWidget.show_result` with N patches in a shown napari viewer."""
    from qtpy.QtWidgets import QApplication

    import napari
    from napari_dagman._widgets.clusters.dock import ClustersWidget
    from napari_dagman.core.config import EmbedConfig
    from napari_dagman.core.embeddings import EmbeddingResult, PatchEmbeddings, build_table, grid_starts

    xy, _ = synthetic(n)
    rng = np.random.default_rng(0)
    shape = (120, 200, 200)
    starts = grid_starts(shape, (8, 8, 8), (2, 2, 2))  # 536,000 candidates
    starts = starts[np.sort(rng.choice(len(starts), n, replace=False))]
    geometry = {
        "shape": list(shape),
        "spacing": [1.5] * 3,
        "origin": [0.0] * 3,
        "direction": np.eye(3).tolist(),
    }
    emb = PatchEmbeddings(
        features=rng.normal(size=(n, 8)).astype(np.float32),
        starts=starts,
        patch=(8, 8, 8),
        sampled=np.zeros(n, np.uint8),
        model_spacing=(1.5, 1.5, 1.5),
        model_origin=(0.0, 0.0, 0.0),
        model_direction=np.eye(3),
        source_geometry=geometry,
        organ_id=rng.integers(1, 21, n),
        purity=rng.uniform(0.3, 1.0, n).astype(np.float32),
        organ_names={i: f"organ_{i}" for i in range(1, 21)},
        settings={"pooling": "mean", "stride": 4},
    )
    clusters = rng.integers(0, 12, n)
    table = build_table(emb, xy, "umap", clusters)
    result = EmbeddingResult(emb, xy, clusters, None, table, EmbedConfig(method="umap"))

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    image = viewer.add_image(np.zeros(shape, np.float32), scale=(1.5, 1.5, 1.5))
    dock = ClustersWidget(viewer)
    viewer.window.add_dock_widget(dock)
    QApplication.instance().processEvents()
    clock = Lateness()
    rows = [clock.measure(lambda: dock.show_result(result, image), settle=2.0) for _ in range(repeats)]
    viewer.close()
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.median([r[key] for r in rows])) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-dock", action="store_true", help="skip the napari dock phase")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "scatter_render.json"))
    args = parser.parse_args()
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        raise SystemExit("run under Xvfb (xvfb-run -a ...): the offscreen platform cannot render napari")

    load_before = os.getloadavg()
    phases = scatter_phases(args.points, args.repeats)
    if not args.no_dock:
        phases["dock"] = dock_phase(args.points, max(1, args.repeats // 2))
    load_after = os.getloadavg()
    summary = {name: summarise(rows) for name, rows in phases.items()}

    print(
        f"{args.points:,} points, median of {args.repeats} runs; load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    print(f"{'phase':<12} {'call ms':>9} {'render ms':>10} {'late p50':>9} {'late p99':>9} {'late max':>9}")
    for name, row in summary.items():
        render = f"{row['render_ms']:10.1f}" if "render_ms" in row else f"{'-':>10}"
        print(
            f"{name:<12} {row['call_ms']:9.1f} {render} {row['late_p50_ms']:9.1f} {row['late_p99_ms']:9.1f} "
            f"{row['late_max_ms']:9.1f}"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "points": args.points,
                "repeats": args.repeats,
                "load_average": [load_before[0], load_after[0]],
                "cpu_count": os.cpu_count(),
                "summary": summary,
                "runs": phases,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
