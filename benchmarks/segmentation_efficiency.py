"""The segmentation label-efficiency curve (issue 25): validation Dice against 1, 2, 4 labelled slabs, a pretrained
encoder versus scratch, two seeds, with the one-command job of `core.segmentation.efficiency`.

Data: ``example_ct.nii.gz`` with ``example_seg_fast_force_split.nii.gz`` (TotalSegmentator "fast" predictions, not
manual ground truth) from ``../shared/data``. Organs: liver (5), spleen (1), kidney_right (2), kidney_left (3).
Validation: the held-out axial slab of ``benchmarks/finetune_compare.py`` and the pretraining protocol
(``--val-fraction`` 0.12 at ``--val-position`` 0.85, z 84-96 of 112 at 3 mm, 24 mm gaps that are neither trained
nor validated). Labelled pieces: the training slices that hold one of the organs (z 66-75 and 105-111) cut into
``--train-slabs`` 4 equal slabs; a budget of k trains on k of them, drawn by the seed and nested (the slab of k = 1
is among those of k = 2, ...); both arms of one seed train on the same slabs.

Encoder: ``--init RUN``, or (by default) a short pretraining on the same CT with the validation slab and its gaps cut
out (the encoder never sees those voxels, not even unlabelled): DAGMaN, tiny preset, ``--pretrain-steps`` steps, at
the fine-tuning's dims, ROI and spacing, the protocol's other settings. A finished pretraining in ``--work`` is
reused, as are the finished fine-tuning runs.

Fine-tuning (both arms): tiny SwinUNETR on axial slices (``--dims 2``: the 3D setting of finetune_compare.py learned
nothing in 300 steps on this CPU; see docs/results.md for what was tried), ROI 64, 3 mm, batch 8, AdamW lr 3e-4 with
a cosine schedule, ``--steps`` steps, Dice + CE, class-balanced crops. Reported: validation Dice at the last step
(no model selection on the validation slab), per arm and per organ, the mean and spread over seeds and the paired
difference pretrained minus scratch.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python benchmarks/segmentation_efficiency.py --threads 1 > log 2>&1 &

Writes ``--json`` (benchmarks/results/segmentation_efficiency.json) and prints a table; the job's own CSV, JSON
and PNG are in ``--work``/grid.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ORGANS = (5, 1, 2, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with the shared CT")
    p.add_argument("--init", help="pretraining run folder (default: pretrain one in --work first)")
    p.add_argument("--method", default="dagman", help="method of the pretraining made when --init is not given")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-batch-size", type=int, default=8)
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "segmentation_efficiency"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "segmentation_efficiency.json"))
    p.add_argument("--budgets", default="1,2,4", help="labelled slabs per arm")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-slabs", type=int, default=4)
    p.add_argument("--steps", type=int, default=500, help="fine-tuning steps of each arm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dims", type=int, default=2, choices=(2, 3))
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--val-fraction", type=float, default=0.12)
    p.add_argument("--val-position", type=float, default=0.85)
    p.add_argument("--val-gap-mm", type=float, default=24.0)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def pretrained_run(args: argparse.Namespace) -> tuple[Path, float]:
    """``--init``, or a finished pretraining in ``--work`` (made now when there is none); (folder, seconds)."""
    import shutil

    from pretraining_protocol import split  # the protocol's cut: the CT less the validation slab and its gaps

    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import StepEvent
    from napari_dagman.core.runs import RunFolder
    from napari_dagman.core.training import run_pretraining

    if args.init:
        return Path(args.init), 0.0
    out = Path(args.work) / "pretrain" / f"{args.method}_{args.dims}d"
    info = RunFolder(out).read_run_info() if out.is_dir() else {}
    if info.get("status") == "completed" and info.get("steps_done") == args.pretrain_steps:
        return out, float(info.get("wall_seconds", 0.0))
    shutil.rmtree(out, ignore_errors=True)
    settings = {"slab_fraction": args.val_fraction, "slab_position": args.val_position, "gap_mm": args.val_gap_mm}
    pieces, slab_mm = split(settings)
    print(f"pretraining {args.method} on the CT without z {slab_mm[0]:.0f}-{slab_mm[1]:.0f} mm and its gaps", flush=True)
    config = PretrainConfig.from_dict(
        {
            "out": str(out),
            "method": args.method,
            "preset": "tiny",
            "dims": args.dims,
            "roi": args.roi,
            "spacing": args.spacing,
            "steps": args.pretrain_steps,
            "batch_size": args.pretrain_batch_size,
            "seed": 0,
            "preview_every": 0,
            "checkpoint_every": 0,
            "save_every": max(10, args.pretrain_steps // 5),
            "threads": args.threads,
            "device": args.device,
        }
    )
    t0 = time.perf_counter()
    for event in run_pretraining(config, pieces):
        if isinstance(event, StepEvent) and event.step % 50 == 0:
            print(f"  pretrain step {event.step}/{event.total_steps} loss {event.loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    run = RunFolder(out)
    run.write_run_info({**run.read_run_info(), "wall_seconds": seconds})
    return out, seconds


def grid(args: argparse.Namespace, init: Path) -> dict[str, Any]:
    """Run the label-efficiency job (finished arms in ``--work``/grid are reused) and return its result."""
    from napari_dagman.core.config import FinetuneConfig
    from napari_dagman.core.events import FinishedEvent, LogEvent, StepEvent
    from napari_dagman.core.segmentation.efficiency import parse_numbers, run_label_efficiency

    data = Path(args.data)
    config = FinetuneConfig(
        images=[str(data / "example_ct.nii.gz")],
        segmentations=[str(data / "example_seg_fast_force_split.nii.gz")],
        out=str(Path(args.work) / "grid"),
        organs=list(ORGANS),
        init=str(init),
        roi=args.roi,
        spacing=args.spacing,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        val_split="slab",
        val_fraction=args.val_fraction,
        val_position=args.val_position,
        val_gap_mm=args.val_gap_mm,
        val_every=args.val_every,
        train_slabs=args.train_slabs,
        threads=args.threads,
        device=args.device,
    )
    budgets, seeds = parse_numbers(args.budgets, "--budgets"), parse_numbers(args.seeds, "--seeds")
    finished, t0 = None, time.perf_counter()
    for event in run_label_efficiency(config, budgets, seeds):
        if isinstance(event, LogEvent):
            print(f"  {'warning: ' if event.level == 'warning' else ''}{event.message}", flush=True)
        elif isinstance(event, StepEvent) and event.step % 100 == 0:
            print(f"    step {event.step}/{event.total_steps} loss {event.loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        elif isinstance(event, FinishedEvent):
            finished = event
    assert finished is not None and not finished.cancelled
    return finished.summary


def fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "-"


def table(result: dict[str, Any]) -> str:
    """Per arm: mean Dice and Dice per organ at the last step; then mean over seeds and the paired difference."""
    organs = result["organs"]
    lines = [f"{'slabs':>5} {'init':<11} {'seed':>4} {'mean':>6} " + " ".join(f"{o:>12}" for o in organs)]
    for r in result["rows"]:
        cells = " ".join(f"{fmt(r['dice'].get(o)):>12}" for o in organs)
        lines.append(f"{r['budget']:>5} {r['init']:<11} {r['seed']:>4} {fmt(r['mean_dice']):>6} {cells}")
    lines.append("")
    lines.append(f"{'slabs':>5} {'pretrained (mean, min-max)':>28} {'scratch (mean, min-max)':>28} {'pretrained - scratch':>22}")
    curves = {(c["budget"], c["init"]): c["mean_dice"] for c in result["curves"]}
    for p in result["pretrained_minus_scratch"]:
        k = p["budget"]
        cells = [
            f"{fmt(curves[(k, i)]['mean'])} ({fmt(curves[(k, i)]['min'])}-{fmt(curves[(k, i)]['max'])})"
            for i in ("pretrained", "scratch")
        ]
        per_seed = ", ".join(f"{d:+.3f}" for d in p["per_seed"])
        lines.append(f"{k:>5} {cells[0]:>28} {cells[1]:>28} {fmt(p['mean']):>8} [{per_seed}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    init, pretrain_seconds = pretrained_run(args)
    t_grid = time.perf_counter()
    result = grid(args, init)
    shown = table(result)
    print()
    print(f"encoder: {init}; fine-tuning {args.dims}D, {args.steps} steps, ROI {args.roi}, batch {args.batch_size}, lr {args.lr}, {args.spacing} mm")
    print(shown)
    out = {
        "arguments": vars(args),
        "pretrain_run": str(init),
        "pretrain_seconds": pretrain_seconds,
        "grid_seconds": time.perf_counter() - t_grid,
        "total_seconds": time.perf_counter() - t_all,
        "result": result,
        "table": shown,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # pretraining_protocol, beside this file
    sys.exit(main())
