"""How responsive napari stays while the docks work: Qt event-loop lateness and training throughput.

Run under a real X server or Xvfb (never ``QT_QPA_PLATFORM=offscreen``)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/ui_latency.py            # ~10 minutes
    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/ui_latency.py --seconds 20 --phases thread process

It opens napari (shown) with the synthetic CT phantom, docks the pretraining and attention docks and, for each
phase, samples the lateness of a 10 ms Qt timer (how late each tick fires; 0 = on time) for ``--seconds``:

* ``idle``: napari alone (the floor of this machine);
* ``headless``: no GUI at all, pretraining in a plain process (the training speed to compare with);
* ``thread``: pretraining started from the dock in a thread of the napari process;
* ``thread-1``: the same with torch limited to one intra-op thread (the usual mitigation);
* ``process``: started from the dock in a child process at the same priority as napari (nice 0);
* ``process-nice``: the same at a lower priority (nice 10);
* ``explorer-thread`` / ``explorer-process``: the attention dock computing whole-volume maps again and again.

* ``process-nice-nopreview``: the child at nice 10 with the live previews off (what the previews cost);
* ``process-nice2``, ``process-nice5``: the child at nice 2 or 5 (between the two);

``--competitor`` runs a second pretraining from the command line (nice 0, the phantom, the same settings) beside
every phase, as on a machine someone else also uses: its steps per second are reported beside the dock's
(``competitor_steps_per_s``), so the child's priority can be judged for fairness as well as for the viewer.

Lateness is reported as p50 / p99 / max in ms, training as steps per second after the first step and as a
fraction of the headless phase's. Where the time goes: the CPU time of the napari process (all its threads,
including the software OpenGL renderer's under Xvfb) and of the training process, each per second of the
phase, and the milliseconds the dock spent in its event handler per step and per preview. The machine's
load average is printed with each phase: on a shared machine, other people's jobs show up in every figure.
Results go to stdout as a table and to ``--json`` (default: benchmarks/results/ui_latency.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ALL_PHASES = (
    "idle",
    "headless",
    "thread",
    "thread-1",
    "process",
    "process-nice",
    "process-nice-nopreview",
    "process-nice2",
    "process-nice5",
    "explorer-thread",
    "explorer-process",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="sampling time per phase (default: 60)")
    p.add_argument("--phases", nargs="+", default=list(ALL_PHASES), choices=ALL_PHASES)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the phase sequence N times (interleaved, so that a shared machine's load drift hits every "
        "phase alike); the table shows the median of the repeats",
    )
    p.add_argument("--preset", default="tiny", help="encoder preset (default: tiny)")
    p.add_argument("--roi", type=int, default=64, help="crop side in voxels (default: 64)")
    p.add_argument("--spacing", type=float, default=3.0, help="training spacing in mm (default: 3)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--preview-every", type=int, default=5, help="live preview every N steps (default: 5)")
    p.add_argument(
        "--competitor",
        action="store_true",
        help="run a command-line pretraining (nice 0) beside every phase: a loaded machine",
    )
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "ui_latency.json"))
    return p.parse_args(argv)


# --- measuring ----------------------------------------------------------------------------------------------
class LatencyProbe:
    """A 10 ms precise Qt timer; each tick records how late it fired relative to the previous tick + 10 ms."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import Qt, QTimer

        self.interval = interval_ms / 1000.0
        self.lateness: list[float] = []
        self._last: float | None = None
        self._timer = QTimer()
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.lateness.append(max(0.0, now - self._last - self.interval))
        self._last = now

    def start(self) -> None:
        self.lateness.clear()
        self._last = None
        self._timer.start()

    def stop(self) -> dict[str, float]:
        self._timer.stop()
        a = np.asarray(self.lateness) * 1000.0
        if not a.size:
            return {"ticks": 0}
        return {
            "ticks": int(a.size),
            "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 1),
        }


def steps_per_second(times: list[float]) -> float | None:
    """Throughput from the arrival times of step events, first step excluded (start-up is not a step)."""
    if len(times) < 3:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def spin(seconds: float, until: Any = None) -> None:
    """Run the Qt event loop for ``seconds`` (or until ``until()`` is true), as napari's own loop runs.

    A real event loop sleeps in the OS until an event is due. The first version polled ``processEvents()``
    every 2 ms instead: 500 wake-ups a second of napari's main thread, each of which preempts the training
    process (nice 10 yields at once), so it measured the benchmark's own polling as much as napari.
    """
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    end = time.monotonic() + seconds
    checker = QTimer()
    checker.setInterval(50)

    def check() -> None:
        if time.monotonic() >= end or (until is not None and until()):
            loop.quit()

    checker.timeout.connect(check)
    if until is not None:  # a 50 ms check only when there is something to check
        checker.start()
    QTimer.singleShot(max(0, int(seconds * 1000)), loop.quit)
    loop.exec()
    checker.stop()


def phase_nice(phase: str) -> int:
    """The child's nice value of a phase: process 0, process-nice 10, process-niceN N."""
    if not phase.startswith("process-nice"):
        return 0
    digits = phase.removeprefix("process-nice").split("-")[0]
    return int(digits) if digits.isdigit() else 10


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median of the numeric results of repeated runs of one phase (other keys: the last run's)."""
    out = dict(runs[-1])
    for key, value in runs[-1].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, int | float) and all(isinstance(v, int | float) for v in values):
            out[key] = round(float(np.median(values)), 3)
    return out


def load() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (all its threads); this one by default."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return float("nan")
    return times.user + times.system


class CpuMeter:
    """CPU seconds per wall second of this process (and of a child, once its pid is known) over a phase."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.own0 = cpu_seconds()
        self.child: int | None = None
        self.child0 = 0.0
        self.child_t0 = 0.0

    def watch(self, pid: int) -> None:
        self.child, self.child0, self.child_t0 = pid, cpu_seconds(pid), time.perf_counter()

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        out = {"gui_cpu_per_s": round((cpu_seconds() - self.own0) / (now - self.t0), 3)}
        if self.child is not None:
            out["training_cpu_per_s"] = round((cpu_seconds(self.child) - self.child0) / (now - self.child_t0), 3)
        return out


# --- the headless baseline (child process, no Qt) -------------------------------------------------------------
def _headless(config_dict: dict[str, Any], seconds: float, out: Any) -> None:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import CancelToken, StepEvent
    from napari_dagman.core.phantom import make_phantom
    from napari_dagman.core.training import run_pretraining

    ct, _ = make_phantom()
    token = CancelToken()
    times: list[float] = []
    start = time.perf_counter()
    cpu0 = 0.0
    for event in run_pretraining(PretrainConfig.from_dict(config_dict), [ct], cancel=token):
        if isinstance(event, StepEvent):
            times.append(time.perf_counter())
            if len(times) == 1:
                cpu0 = cpu_seconds()
        if time.perf_counter() - start > seconds:
            token.cancel()
    cpu = (cpu_seconds() - cpu0) / (times[-1] - times[0]) if len(times) > 1 else None
    out.put(
        {
            "steps": len(times),
            "steps_per_s": steps_per_second(times),
            "first_step_s": times[0] - start,
            "training_cpu_per_s": None if cpu is None else round(cpu, 3),
        }
    )


def headless_phase(config: dict[str, Any], seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_headless, args=(config, seconds, queue))
    before = load()
    proc.start()
    result = queue.get(timeout=seconds + 600)
    proc.join()
    return {**result, "load_before": before, "load_after": load()}


# --- a competing command-line run (a loaded machine) -------------------------------------------------------------
class Competitor:
    """``napari-dagman pretrain`` on the phantom in the background at nice 0; its steps are read from its
    metrics.jsonl, so its speed over a phase is (steps at the end - steps at the start) / seconds."""

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        import subprocess

        from napari_dagman.core.io import write_volume
        from napari_dagman.core.phantom import make_phantom

        folder.mkdir(parents=True, exist_ok=True)
        ct = folder / "phantom.nii.gz"
        write_volume(make_phantom()[0], ct)
        self.out = folder / "run"
        argv = [
            sys.executable, "-m", "napari_dagman.cli", "pretrain", str(ct), "--out", str(self.out),
            "--preset", str(config["preset"]), "--roi", str(config["roi"]), "--spacing", str(config["spacing"]),
            "--batch-size", str(config["batch_size"]), "--steps", "1000000", "--preview-every", "0", "--quiet",
            "--device", "cpu",
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.mark: tuple[int, float] | None = None

    def steps(self) -> int:
        path = self.out / "metrics.jsonl"
        return sum(1 for _ in path.open()) if path.is_file() else 0

    def start_phase(self) -> None:
        spin(600, until=lambda: self.steps() >= 2)  # past its start-up
        self.mark = (self.steps(), time.perf_counter())

    def end_phase(self) -> float | None:
        if self.mark is None:
            return None
        steps, t0 = self.mark
        return round((self.steps() - steps) / (time.perf_counter() - t0), 4)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


# --- phases with the GUI ---------------------------------------------------------------------------------------
def training_phase(
    viewer: Any,
    widget: Any,
    probe: LatencyProbe,
    seconds: float,
    *,
    in_process: bool,
    nice: int,
    threads: int | None,
    previews: bool = True,
) -> dict[str, Any]:
    import torch

    from napari_dagman.core.events import PreviewEvent, StepEvent

    times: list[float] = []
    handler_ms: dict[str, list[float]] = {"step": [], "preview": []}
    original = widget._on_event
    meter = CpuMeter()

    def record(event: Any) -> None:
        if isinstance(event, StepEvent):
            times.append(time.perf_counter())
            job = widget._runner.process_job
            if len(times) == 1 and job is not None and job.process is not None:
                meter.watch(job.process.pid)  # from the first step on: training, not start-up
        t0 = time.perf_counter()
        original(event)
        kind = "step" if isinstance(event, StepEvent) else "preview" if isinstance(event, PreviewEvent) else None
        if kind:
            handler_ms[kind].append(1000.0 * (time.perf_counter() - t0))

    widget._runner.on_event = record
    widget.in_process.value = in_process
    widget.process_nice = nice
    widget.run_name.value = (
        f"bench-{'process' if in_process else 'thread'}-{nice}-{threads}-{time.time():.0f}"
    )
    preview_every = widget.preview_every.value
    if not previews:
        widget.preview_every.value = 0
    torch_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    before = load()
    probe.start()
    t0 = time.perf_counter()
    if not widget.start():
        raise RuntimeError("the dock refused to start")
    spin(seconds)
    stats = probe.stop()
    cpu = meter.read()
    widget.cancel()
    cancel_t = time.perf_counter()
    widget._runner.wait(300)
    stopped = time.perf_counter() - cancel_t
    widget._runner.on_event = original
    widget.preview_every.value = preview_every
    torch.set_num_threads(torch_threads)
    return {
        **stats,
        **cpu,
        "handler_ms_per_step": round(float(np.mean(handler_ms["step"])), 2) if handler_ms["step"] else None,
        "handler_ms_per_preview": round(float(np.mean(handler_ms["preview"])), 1) if handler_ms["preview"] else None,
        "steps": len(times),
        "steps_per_s": steps_per_second(times),
        "first_step_s": round(times[0] - t0, 1) if times else None,
        "cancel_to_stopped_s": round(stopped, 1),
        "load_before": before,
        "load_after": load(),
        "run": widget.last_finished.run_dir if widget.last_finished else None,
    }


def explorer_phase(widget: Any, probe: LatencyProbe, seconds: float, *, in_process: bool) -> dict[str, Any]:
    widget.scope.value = "volume"
    widget.volume_in_process = in_process
    done = 0
    before = load()
    probe.start()
    t0 = time.perf_counter()
    durations = []
    while time.perf_counter() - t0 < seconds:
        start = time.perf_counter()
        if not widget.compute():
            raise RuntimeError("the explorer refused to start")
        spin(seconds + 600, until=lambda: not widget.running)
        durations.append(time.perf_counter() - start)
        done += 1
    stats = probe.stop()
    return {
        **stats,
        "computations": done,
        "seconds_per_computation": round(float(np.mean(durations)), 1),
        "windows": widget.result.maps.windows if widget.result and widget.result.maps else None,
        "load_before": before,
        "load_after": load(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("NAPARI_DAGMAN_SETTINGS", tempfile.mktemp(suffix=".ini"))
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("QT_QPA_PLATFORM=offscreen does not render napari: run under xvfb-run instead", file=sys.stderr)
        return 2
    import torch

    import napari
    from napari_dagman._sample_data import sample_phantom
    from napari_dagman._widgets.explorer.dock import AttentionWidget
    from napari_dagman._widgets.training.pretrain import PretrainWidget

    runs = tempfile.mkdtemp(prefix="ui-latency-")
    config = {
        "preset": args.preset,
        "roi": args.roi,
        "spacing": args.spacing,
        "batch_size": args.batch,
        "steps": 100_000,
        "preview_every": args.preview_every,
        "device": "cpu",
    }
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "napari": napari.__version__,
        },
        "config": {k: v for k, v in config.items() if k not in ("out", "steps")},
        "seconds": args.seconds,
        "phases": {},
    }

    viewer = napari.Viewer(show=True)
    for data, kwargs, kind in sample_phantom():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    pretrain = PretrainWidget(viewer)
    explorer = AttentionWidget(viewer)
    viewer.window.add_dock_widget(pretrain, name="Pretraining", area="right")
    viewer.window.add_dock_widget(explorer, name="Attention & mask explorer", area="right")
    pretrain.layers.value = [viewer.layers["phantom CT"]]
    pretrain.preset.value = args.preset
    pretrain.roi.value = args.roi
    pretrain.spacing.value = args.spacing
    pretrain.batch_size.value = args.batch
    pretrain.length.value = 100_000
    pretrain.preview_every.value = args.preview_every
    pretrain.device.value = "cpu"
    pretrain.runs_folder.value = runs
    probe = LatencyProbe()
    spin(3.0)  # let the window settle

    competitor = Competitor(config, Path(runs) / "competitor") if args.competitor else None
    last_run = None
    runs_by_phase: dict[str, list[dict[str, Any]]] = {phase: [] for phase in args.phases}
    for repeat in range(args.repeat):
        for phase in args.phases:
            print(f"--- {phase} #{repeat + 1} ({args.seconds:.0f} s) load {load()}", flush=True)
            if competitor is not None:
                competitor.start_phase()
            if phase == "idle":
                before = load()
                meter = CpuMeter()
                probe.start()
                spin(args.seconds)
                out = {**probe.stop(), **meter.read(), "load_before": before, "load_after": load()}
            elif phase == "headless":
                out = headless_phase(config | {"out": str(Path(runs) / f"headless-{repeat}")}, args.seconds)
            elif phase in ("thread", "thread-1") or phase.startswith("process"):
                out = training_phase(
                    viewer,
                    pretrain,
                    probe,
                    args.seconds,
                    in_process=phase.startswith("process"),
                    nice=phase_nice(phase),
                    threads=1 if phase == "thread-1" else None,
                    previews=not phase.endswith("nopreview"),
                )
                last_run = out.get("run") or last_run
            else:
                if last_run is None:
                    print("    (no run folder yet: run a training phase first)", flush=True)
                    continue
                explorer.set_run(last_run)
                explorer.image.value = viewer.layers["phantom CT"]
                out = explorer_phase(explorer, probe, args.seconds, in_process=phase == "explorer-process")
            if competitor is not None:
                out["competitor_steps_per_s"] = competitor.end_phase()
            runs_by_phase[phase].append(out)
            print("    " + json.dumps(out), flush=True)
    if competitor is not None:
        competitor.stop()
    results["runs"] = runs_by_phase
    results["competitor"] = bool(args.competitor)
    results["phases"] = {phase: median_of(rs) for phase, rs in runs_by_phase.items() if rs}

    print(f"\nmedian of {args.repeat} run(s) per phase; load = 1-min load average before -> after")
    headless = (results["phases"].get("headless") or {}).get("steps_per_s")
    for r in results["phases"].values():
        if headless and r.get("steps_per_s"):
            r["of_headless"] = round(r["steps_per_s"] / headless, 3)
    print(
        "phase                    p50 ms   p99 ms   max ms   steps/s  x headless  GUI cpu/s  train cpu/s  "
        "ms/step  ms/preview  CLI steps/s   load"
    )
    for phase, r in results["phases"].items():
        sps = r.get("steps_per_s")
        print(
            f"{phase:23s} {r.get('p50_ms', '-'):>7} {r.get('p99_ms', '-'):>8} {r.get('max_ms', '-'):>8} "
            f"{(f'{sps:.3f}' if sps else '-'):>9} {r.get('of_headless', '-'):>11} {r.get('gui_cpu_per_s', '-'):>10} "
            f"{r.get('training_cpu_per_s', '-'):>12} {r.get('handler_ms_per_step') or '-':>8} "
            f"{r.get('handler_ms_per_preview') or '-':>11} {r.get('competitor_steps_per_s') or '-':>11}   "
            f"{r.get('load_before')}->{r.get('load_after')}"
        )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    viewer.close()
    return 0


if __name__ == "__main__":  # the spawn start method re-imports this module in each child: keep the guard
    sys.exit(main())
