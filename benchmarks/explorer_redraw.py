"""How fast the attention explorer's small multiples follow a slice change, and how long whole-volume sub-token
attention takes on the real CT.

Run under a real X server or Xvfb (never ``QT_QPA_PLATFORM=offscreen``)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/explorer_redraw.py               # a few minutes on CPU
    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/explorer_redraw.py --skip-volume # the redraw only

It makes (or takes, ``--run``) a 3-step tiny DAGMaN run on ``example_ct.nii.gz`` (ROI 32 at 4 mm, 4 class-attention
heads, as the tests' ``tiny_run``), then:

* ``volume``: `attention_job` over the whole CT at ``--subtoken`` (default 2; every shifted window, CPU, no GUI),
  timed, with the number of windows; and at subtoken 1 for reference;
* ``redraw-crop``: napari (shown) with the CT and the explorer dock, a crop computed from the dock, then
  ``--repeats`` slice changes inside the crop: the time of the dock's redraw (cutting every tile at the new slice
  and blitting both figures: 5 head tiles, 7 mask tiles) and of the whole slice change as the user sees it (napari
  reslices its own layers first, then the dock's coalescing timer fires);
* ``redraw-volume``: the same with the whole-volume maps of the first phase (head tiles show the whole slice).

Each redraw figure is given as p50 / p90 / max in ms. The machine's load average is printed with each phase: on a
shared machine other people's jobs show up in every figure. Results go to stdout and to ``--json`` (default:
benchmarks/results/explorer_redraw.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "max": float(ms.max()),
        "n": len(ms),
    }


def make_run(ct_path: Path, out: Path) -> Path:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    config = PretrainConfig(
        images=[str(ct_path)],
        out=str(out),
        preset="tiny",
        roi=32,
        spacing=4.0,
        steps=3,
        batch_size=1,
        preview_every=0,
        seed=0,
    )
    consume(run_pretraining(config))
    return out


def volume_phase(run: Path, ct: Any, subtoken: int) -> tuple[dict[str, Any], Any]:
    """Whole-volume attention at ``subtoken`` (and 1), timed; the sub-token result for the redraw phase."""
    from napari_dagman.cli.common import drive_result
    from napari_dagman.core.attention import attention_job
    from napari_dagman.core.config import AttentionConfig

    rows: dict[str, Any] = {}
    result = None
    for k in dict.fromkeys([subtoken, 1]):
        config = AttentionConfig(checkpoint=str(run), scope="volume", subtoken=k, device="cpu")
        before = load()
        start = time.perf_counter()
        out = drive_result(attention_job(config, ct, keep_encoder=False), desc="attention", quiet=True)
        seconds = time.perf_counter() - start
        rows[f"subtoken {k}"] = {
            "seconds": seconds,
            "windows": out.maps.windows,
            "grid": list(out.maps.maps.shape),
            "load_before": before,
            "load_after": load(),
        }
        print(
            f"volume, subtoken {k}: {seconds:.1f} s for {out.maps.windows} windows, maps {out.maps.maps.shape} "
            f"(load {before} -> {load()})",
            flush=True,
        )
        if result is None:
            result = out
    return rows, result


def spin(seconds: float, until: Any = None) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until is not None and until()):
        QApplication.processEvents()
        time.sleep(0.002)


def slice_changes(viewer: Any, dock: Any, worlds: list[float]) -> dict[str, Any]:
    """Change the viewer's slice to each world z; time the dock's redraw and the whole change."""
    redraws: list[float] = []
    inner = dock.redraw_slice

    def timed() -> None:
        start = time.perf_counter()
        inner()
        redraws.append(time.perf_counter() - start)

    dock.redraw_slice = timed
    dock._slice_timer.timeout.disconnect()
    dock._slice_timer.timeout.connect(timed)
    totals = []
    axis = viewer.dims.ndim - 3
    before = load()
    for world in worlds:
        n = len(redraws)
        start = time.perf_counter()
        viewer.dims.set_point(axis, world)
        spin(5.0, until=lambda n=n: len(redraws) > n)
        totals.append(time.perf_counter() - start)
        spin(0.05)
    dock._slice_timer.timeout.disconnect()
    dock._slice_timer.timeout.connect(inner)
    dock.redraw_slice = inner
    return {"dock_redraw_ms": stats(redraws), "slice_change_ms": stats(totals), "load": before}


def redraw_phases(run: Path, ct_path: Path, volume_result: Any, repeats: int) -> dict[str, Any]:
    import napari
    from napari_dagman._widgets.explorer.dock import AttentionWidget

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open(ct_path, plugin="napari-dagman")
    dock = AttentionWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Attention & mask explorer", area="right")
    dock.image.value = viewer.layers[0]
    dock.device.value = "cpu"
    dock.set_run(str(run))
    assert dock.compute(), dock.status.text()
    spin(900, until=lambda: not dock.running)
    assert dock.result is not None, dock.status.text()
    spin(1.0)
    out: dict[str, Any] = {
        "tiles": {"heads": len(dock.heads_figure.tile_keys()), "masks": len(dock.masks_figure.tile_keys())}
    }
    preview = dock.result.preview
    z0 = preview.image_translate[0]
    z1 = z0 + preview.image_scale[0] * (preview.image.shape[0] - 1)
    worlds = list(np.linspace(z0, z1, repeats))
    out["redraw-crop"] = slice_changes(viewer, dock, worlds)
    if volume_result is not None:
        dock._masks_only = False
        dock._on_done(volume_result)
        spin(1.0)
        layer = viewer.layers[0]
        top = layer.data_to_world((layer.data.shape[0] - 1, 0, 0))[0]
        worlds = list(np.linspace(layer.translate[0], top, repeats))
        out["redraw-volume"] = slice_changes(viewer, dock, worlds)
    viewer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=os.environ.get("DAGMAN_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    )
    parser.add_argument("--run", help="a tiny pretraining run folder (default: make one, 3 steps)")
    parser.add_argument("--subtoken", type=int, default=2, choices=(1, 2, 4))
    parser.add_argument("--repeats", type=int, default=30, help="slice changes per redraw phase")
    parser.add_argument(
        "--skip-volume", action="store_true", help="no whole-volume timing (redraw of a crop only)"
    )
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "explorer_redraw.json"))
    args = parser.parse_args(argv)
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("QT_QPA_PLATFORM=offscreen does not render napari: run under xvfb-run", file=sys.stderr)
        return 2
    os.environ.setdefault("NAPARI_DAGMAN_SETTINGS", tempfile.mktemp(suffix=".ini"))
    from napari_dagman.core.io import read_volume

    ct_path = Path(args.data) / "example_ct.nii.gz"
    ct = read_volume(ct_path)
    print(f"load at start: {load()}", flush=True)
    run = (
        Path(args.run)
        if args.run
        else make_run(ct_path, Path(tempfile.mkdtemp(prefix="explorer-bench-")) / "tiny")
    )
    report: dict[str, Any] = {"ct": str(ct_path), "shape": list(ct.shape), "run": str(run)}
    volume_result = None
    if not args.skip_volume:
        report["volume"], volume_result = volume_phase(run, ct, args.subtoken)
    report.update(redraw_phases(run, ct_path, volume_result, args.repeats))
    print(
        f"\nsmall multiples: {report['tiles']['heads']} head tiles + {report['tiles']['masks']} mask tiles (4 heads)"
    )
    print(f"{'phase':<15} {'dock redraw p50/p90/max ms':>28} {'slice change p50/p90/max ms':>30}  load")
    for phase in ("redraw-crop", "redraw-volume"):
        if phase in report:
            d, s = report[phase]["dock_redraw_ms"], report[phase]["slice_change_ms"]
            print(
                f"{phase:<15} {d['p50']:>10.0f} {d['p90']:>7.0f} {d['max']:>7.0f}  "
                f"{s['p50']:>12.0f} {s['p90']:>7.0f} {s['max']:>7.0f}   {report[phase]['load']}"
            )
    for name, row in report.get("volume", {}).items():
        print(f"volume {name}: {row['seconds']:.1f} s, {row['windows']} windows (load {row['load_before']})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
