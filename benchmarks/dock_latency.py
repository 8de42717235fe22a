"""How long napari's GUI thread stalls while a dock opens, and during the attention explorer's first Compute.

Run under a real X server or Xvfb (never ``QT_QPA_PLATFORM=offscreen``)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/dock_latency.py               # every case, minutes
    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/dock_latency.py --cases pretraining explorer-compute
    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/dock_latency.py --repeat 3    # median of 3

Each case runs in a fresh Python process (this interpreter), so the first import of PyTorch, MONAI and the dock's
modules is paid as a user pays it. The process opens napari (shown) with the synthetic CT phantom, lets it settle
(1 s idle), starts a 10 ms Qt timer (`ui_latency.LatencyProbe`: how late each tick fires, 0 = on time), lets it
tick for 0.1 s (a stall is only seen after a first tick) and then:

* ``pretraining``, ``explorer``, ``clusters``, ``finetune``, ``results``, ``window``: docks the plugin's widget
  the way napari's Plugins menu does (``viewer.window.add_plugin_dock_widget("napari-dagman", NAME)``) and runs
  the real Qt event loop until the real dock is built (`DeferredDock.dock`; the CT window is a plain widget, ready
  at once);
* ``results-draw``: opens the real CT and its label map, docks the segmentation results, chooses a 2-step tiny
  fine-tuning run (made by the parent, or ``--ft-run``) and clicks Predict; ready when the prediction, the
  disagreement layer and the table are drawn;
* ``explorer-compute``: docks the attention explorer, waits for it to be built, chooses the run folder (a 3-step
  tiny DAGMaN run on ``example_ct.nii.gz``, ROI 32 at 4 mm, as the tests' ``tiny_run``; made once by the parent
  with the CLI, or ``--run``) and the phantom CT, lets it settle (2 s), then clicks Compute (default settings: a
  crop around the view centre) and runs the loop until the job has ended and its maps are drawn (the
  ``attention: mean`` layer is there, whatever verdict its name carries, and no explorer job is running).

After the case is ready the loop runs 1 s more (the first paint of what was just added) before the probe stops.

How to read it (one row per case; the median of ``--repeat`` fresh processes):

* ``call ms``: how long the ``add_plugin_dock_widget`` call itself blocked (napari can do nothing meanwhile);
  for explorer-compute, how long Compute's click handler blocked (``click_ms``; the JSON's ``open_call_ms`` and
  ``open_ready_s`` are then those of docking the explorer first, outside the probe);
* ``ready s``: seconds from the action until the real dock is built (explorer-compute: until the maps are drawn);
  the GUI should stay live in between, the libraries load in a background thread;
* ``p99 ms`` / ``max ms``: the timer's lateness, i.e. how long the GUI thread could not answer. The issue's target
  is a longest stall (``max``) under 200 ms: ``target`` says yes or no;
* the JSON (``--json``, default benchmarks/results/dock_latency.json) also has each process's 5 longest stalls,
  each with when it began (``at_s``, seconds after the action) and what was going on (``during``: ``open call``,
  ``dock build`` (the stall contains the moment the real dock was made), ``loading`` (the background import),
  ``click`` (Compute's own handler), ``job``, ``drawing maps`` or ``after ready``), and the moments themselves
  (``marks``).

The machine's load average is printed before and after: on a shared machine, other people's jobs show up as stalls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ui_latency import LatencyProbe, load, median_of, spin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-dagman"
#: case -> napari widget name (the display name in napari.yaml)
OPEN_CASES = {
    "pretraining": "Pretraining",
    "explorer": "Attention & mask explorer",
    "clusters": "Organ clusters",
    "finetune": "Fine-tuning",
    "results": "Segmentation results",
    "window": "CT window",
}
ALL_CASES = (*OPEN_CASES, "explorer-compute", "results-draw")
TARGET_MS = 200.0
#: the shared real CT and its label map (results-draw)
SHARED = "/work/shared/data"
#: napari_dagman._widgets.explorer.layers.MEAN_LAYER (not imported: it is heavy); the name may end in " (flat)"
MEAN_LAYER = "attention: mean"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(ALL_CASES), choices=ALL_CASES)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every case N times, each in a fresh process (interleaved); the table shows the medians",
    )
    p.add_argument("--run", help="a pretraining run folder for explorer-compute (default: make a 3-step tiny one)")
    p.add_argument(
        "--ft-run", help="a fine-tuning run folder for results-draw (default: make a 2-step tiny one from --run)"
    )
    p.add_argument(
        "--ct",
        default="/work/shared/data/example_ct.nii.gz",
        help="the CT the tiny run trains on (default: the shared example_ct.nii.gz)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one case may take (default: 300)")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "dock_latency.json"))
    p.add_argument("--child", choices=ALL_CASES, help=argparse.SUPPRESS)  # one case, in this process
    return p.parse_args(argv)


# --- in the child process ---------------------------------------------------------------------------------------
class TimedProbe(LatencyProbe):
    """`LatencyProbe` that also keeps when each gap between two ticks began and ended (perf_counter seconds)."""

    def __init__(self, interval_ms: int = 10) -> None:
        super().__init__(interval_ms)
        self.spans: list[tuple[float, float]] = []

    def _tick(self) -> None:
        last, now = self._last, time.perf_counter()
        super()._tick()
        if last is not None:
            self.spans.append((last, now))

    def start(self) -> None:
        self.spans = []
        super().start()

    def longest(self, t0: float, marks: dict[str, float], n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` longest stalls: lateness, when the gap began and ended (s after ``t0``) and what went on."""
        late = [now - last - self.interval for last, now in self.spans]
        out = []
        for i in np.argsort(late)[::-1][:n]:
            last, now = self.spans[i]
            out.append(
                {
                    "ms": round(1000.0 * max(0.0, late[i]), 1),
                    "at_s": round(last - t0, 3),
                    "end_s": round(now - t0, 3),
                    "during": during(last, now, marks),
                }
            )
        return out


#: the order of the marks a case sets; a stall is labelled by the mark inside it, else by the phase it lies in
MARK_STEPS = (
    ("open call", "open returned"),
    ("dock build", "dock built"),
    ("click", "click returned"),
    ("drawing maps", "maps drawn"),
    ("job", "job stopped"),
)


def during(start: float, end: float, marks: dict[str, float]) -> str:
    inside = [step for step, mark in MARK_STEPS if mark in marks and start <= marks[mark] <= end]
    if inside:
        return " + ".join(inside)
    if "ready" in marks and start >= marks["ready"]:
        return "after ready"
    if "click returned" in marks:
        return "job" if start >= marks["click returned"] else "click"
    if "open returned" in marks and start < marks["open returned"]:
        return "open call"
    return "loading"


def open_viewer() -> Any:
    from qtpy.QtWidgets import QApplication

    import napari
    from napari_dagman._sample_data import sample_phantom

    viewer = napari.Viewer(show=True)
    for data in sample_phantom():
        viewer._add_layer_from_data(*data)
    QApplication.processEvents()
    spin(1.0)
    return viewer


def open_dock(viewer: Any, name: str, marks: dict[str, float]) -> tuple[Any, float]:
    """Dock a plugin widget as the Plugins menu does; returns (what napari docked, ms the call took). The moment the
    real dock is built goes in ``marks["dock built"]``."""
    t = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    marks["open returned"] = time.perf_counter()
    if hasattr(widget, "call_when_built"):
        widget.call_when_built(lambda _dock: marks.setdefault("dock built", time.perf_counter()))
    else:  # a plain widget (the CT window): built by the call
        marks["dock built"] = marks["open returned"]
    return widget, 1000.0 * (marks["open returned"] - t)


def real_dock(widget: Any) -> Any:
    return widget.dock if hasattr(widget, "call_when_built") else widget


def child(case: str, run: str | None, timeout: float) -> dict[str, Any]:
    viewer = open_viewer()
    probe = TimedProbe()
    marks: dict[str, float] = {}
    out: dict[str, Any] = {"case": case, "load_before": load()}
    if case in OPEN_CASES:
        probe.start()
        spin(0.1)  # ticking already: a first tick only starts the clock, so the action's stall must come after one
        t0 = time.perf_counter()
        widget, out["open_call_ms"] = open_dock(viewer, OPEN_CASES[case], marks)
        spin(timeout, until=lambda: real_dock(widget) is not None)
        if real_dock(widget) is None:
            raise RuntimeError(f"the {case} dock was not built in {timeout:.0f} s: {widget.note.text()}")
        marks["ready"] = marks["dock built"]
        out["ready_s"] = round(marks["ready"] - t0, 3)
    elif case == "results-draw":
        t0 = results_draw(viewer, probe, run, timeout, marks, out)
    else:
        widget, out["open_call_ms"] = open_dock(viewer, OPEN_CASES["explorer"], marks)
        spin(timeout, until=lambda: real_dock(widget) is not None)
        dock = real_dock(widget)
        if dock is None:
            raise RuntimeError(f"the explorer dock was not built in {timeout:.0f} s: {widget.note.text()}")
        out["open_ready_s"] = round(marks["dock built"] - marks["open returned"] + out["open_call_ms"] / 1000.0, 3)
        dock.run.value = run
        dock.image.value = viewer.layers["phantom CT"]
        out["organs"] = getattr(dock.organs.value, "name", None)
        out["scope"] = dock.scope.value
        spin(2.0)
        marks.clear()
        viewer.layers.events.inserted.connect(
            lambda event: event.value.name.startswith(MEAN_LAYER) and marks.setdefault("maps drawn", time.perf_counter())
        )
        dock.after_next_job(lambda: marks.setdefault("job stopped", time.perf_counter()))

        def finished() -> bool:
            return (
                "click returned" in marks
                and not dock.running
                and not dock._organ_runner.running
                and any(layer.name.startswith(MEAN_LAYER) for layer in viewer.layers)
            )

        t0 = click_and_wait(probe, dock, dock.compute_button.click, finished, timeout, marks, out)
    spin(1.0)  # the first paint of what was just added
    out.update(probe.stop())
    out["open_call_ms"] = round(out["open_call_ms"], 1)
    out["longest"] = probe.longest(t0, marks)
    out["marks"] = {name: round(t - t0, 3) for name, t in marks.items()}
    out["load_after"] = load()
    viewer.close()
    return out


def results_draw(viewer: Any, probe: Any, run: str | None, timeout: float, marks: dict, out: dict) -> float:
    """Predict the real CT with a fine-tuned run in the results dock, against its reference, until the results are
    drawn (prediction and disagreement layers, the table); returns the moment Predict was clicked."""
    from qtpy.QtWidgets import QApplication

    for name in ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"):
        viewer.open(str(Path(SHARED) / name), plugin=PLUGIN)
    QApplication.processEvents()
    widget, out["open_call_ms"] = open_dock(viewer, OPEN_CASES["results"], marks)
    spin(timeout, until=lambda: real_dock(widget) is not None)
    dock = real_dock(widget)
    if dock is None:
        raise RuntimeError(f"the results dock was not built in {timeout:.0f} s: {widget.note.text()}")
    dock.image.value = viewer.layers["example_ct"]
    dock.reference.value = viewer.layers["example_seg_fast_force_split"]
    dock.checkpoint.value = run
    spin(2.0)
    marks.clear()

    def finished() -> bool:
        return "click returned" in marks and not dock.running and not dock.drawing.pending and dock.results is not None

    def stopped_then_finished() -> bool:
        if not dock.running:
            marks.setdefault("job stopped", time.perf_counter())
        return finished()

    return click_and_wait(probe, dock, dock.predict, stopped_then_finished, timeout, marks, out)


def click_and_wait(
    probe: Any, dock: Any, click: Any, finished: Any, timeout: float, marks: dict, out: dict
) -> float:
    """Start the probe, click (``click()``), run the loop until ``finished()``; the click's own time and the time
    until ready go in ``out``. Returns the moment of the click."""
    probe.start()
    spin(0.1)  # ticking already: a first tick only starts the clock
    t0 = time.perf_counter()
    click()
    marks["click returned"] = time.perf_counter()
    out["click_ms"] = round(1000.0 * (marks["click returned"] - t0), 1)
    spin(timeout, until=finished)
    if not finished():
        raise RuntimeError(f"the job did not finish in {timeout:.0f} s: {dock.status.text()}")
    marks["ready"] = time.perf_counter()
    out["ready_s"] = round(marks["ready"] - t0, 3)
    out["status"] = dock.status.text()
    return t0


def child_main(args: argparse.Namespace) -> int:
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("QT_QPA_PLATFORM=offscreen does not render napari: run under xvfb-run instead", file=sys.stderr)
        return 2
    result = child(args.child, args.run, args.timeout)
    print("\n" + json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: the daemon import thread and napari's atexit hooks are not measured


# --- in the parent ------------------------------------------------------------------------------------------------
def make_run(ct: str, out: Path) -> Path:
    """A 3-step tiny DAGMaN run (the tests' ``tiny_run``), with the command line."""
    command = [
        sys.executable, "-m", "napari_dagman.cli", "pretrain", ct, "--out", str(out), "--preset", "tiny",
        "--roi", "32", "--spacing", "4", "--steps", "3", "--batch-size", "1", "--preview-every", "0",
        "--seed", "0", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"tiny run in {out} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def make_ft_run(run: Path, out: Path) -> Path:
    """A 2-step tiny fine-tuning run from ``run`` on the real CT (the tests' ``ft_run``), with the command line."""
    command = [
        sys.executable, "-m", "napari_dagman.cli", "finetune", f"{SHARED}/example_ct.nii.gz",
        f"{SHARED}/example_seg_fast_force_split.nii.gz", "--init", str(run), "--out", str(out), "--roi", "64",
        "--spacing", "6", "--steps", "2", "--val-every", "2", "--labels", "liver,spleen,kidney_right,kidney_left",
        "--device", "cpu", "--quiet",
    ]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"tiny fine-tuning run in {out} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def run_case(case: str, run: str | None, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    settings = Path(tempfile.mktemp(suffix=".ini"))  # fresh settings: no remembered run
    env["NAPARI_DAGMAN_SETTINGS"] = str(settings)
    command = [sys.executable, __file__, "--child", case, "--timeout", str(timeout)]
    if run:
        command += ["--run", run]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout + 120)
    finally:
        settings.unlink(missing_ok=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"case {case} failed (exit {proc.returncode}):\n{tail}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("QT_QPA_PLATFORM=offscreen does not render napari: run under xvfb-run instead", file=sys.stderr)
        return 2
    import platform

    run = args.run
    scratch = None
    ft_run = args.ft_run
    if ({"explorer-compute", "results-draw"} & set(args.cases) and not run) or ("results-draw" in args.cases and not ft_run):
        scratch = tempfile.TemporaryDirectory(prefix="dock-latency-")
        run = run or str(make_run(args.ct, Path(scratch.name) / "tiny3d"))
        if "results-draw" in args.cases and not ft_run:
            ft_run = str(make_ft_run(Path(run), Path(scratch.name) / "seg"))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load()},
        "target_ms": TARGET_MS,
        "repeat": args.repeat,
        "runs": {case: [] for case in args.cases},
    }
    print(f"load average (1 min) before: {load()}", flush=True)
    for repeat in range(args.repeat):
        for case in args.cases:
            t = time.perf_counter()
            out = run_case(case, ft_run if case == "results-draw" else run, args.timeout)
            results["runs"][case].append(out)
            print(
                f"--- {case} #{repeat + 1}: {time.perf_counter() - t:.0f} s, max {out.get('max_ms')} ms, "
                f"longest {[(s['ms'], s['during']) for s in out['longest']]}",
                flush=True,
            )
    results["cases"] = {case: median_of(rs) for case, rs in results["runs"].items()}
    for r in results["cases"].values():
        r["target_met"] = bool(r.get("max_ms", float("inf")) < TARGET_MS)
    results["machine"]["load_after"] = load()

    print(f"\nmedian of {args.repeat} fresh process(es) per case; target: longest stall < {TARGET_MS:.0f} ms")
    print("case                call ms   ready s   p50 ms   p99 ms   max ms  target  load")
    for case, r in results["cases"].items():
        call = r.get("click_ms", r.get("open_call_ms", "-"))  # the action's own call: the open, or Compute's click
        print(
            f"{case:18s} {call:>8} {r.get('ready_s', '-'):>9} {r.get('p50_ms', '-'):>8} "
            f"{r.get('p99_ms', '-'):>8} {r.get('max_ms', '-'):>8}  {'yes' if r['target_met'] else 'no':>6}  "
            f"{r.get('load_before')}->{r.get('load_after')}"
        )
    print(f"load average (1 min) after: {load()}; {os.cpu_count()} CPUs")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
