"""Fine-tuning from a pretrained encoder versus from scratch, at the same budget, over seeds.

Data: ``example_ct.nii.gz`` with ``example_seg_fast_force_split.nii.gz`` (TotalSegmentator "fast" predictions,
not manual ground truth) from ``../shared/data``. Organs: liver (5), spleen (1), kidney_right (2), kidney_left (3).

Split: the held-out axial slab of the pretraining protocol (``benchmarks/pretraining_protocol.py``:
``--val-fraction`` 0.12 of the slices at ``--val-position`` 0.85, z 84-96 of 112 at 3 mm) with ``--val-gap-mm`` 24
on both sides that is neither trained nor validated; the protocol's encoders never saw these voxels. The slab cuts
liver, spleen and both kidneys in their middle, so each organ has training slices on at least one side (liver and
kidneys below; liver, spleen and the kidney tops above) and thousands of validation voxels: a Dice that does not
swing with a handful of voxels (the old slab, z 73-83, held the spleen's lowest tip only).

Arms (identical but for the encoder initialisation): ``--init`` (a pretraining run: its preferred encoder) and
scratch, each at every ``--seeds`` (same crops and decoder initialisation per seed). Tiny SwinUNETR, 3 mm, ROI 64,
batch 2, ``--steps`` steps, AdamW with cosine schedule, Dice+CE, class-balanced crops. Reported: per-organ
validation Dice at the last step (no model selection on the validation slab), the validation curve, and its largest
swing between consecutive evaluations per organ.

Run::

    python benchmarks/finetune_compare.py --init benchmarks/work/pretraining_protocol/runs/mim_seed0 --lr 1e-3

(the figures in docs/results.md: MiM seed 0, the protocol's best encoder by the slab probe, lr 1e-3, 300 steps)

It writes ``--json`` and prints a table. CPU only, threads set by ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ORGANS = (5, 1, 2, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with the shared CT")
    p.add_argument("--init", required=True, help="pretraining run folder whose encoder starts one arm")
    p.add_argument("--encoder", default="auto", help="which encoder of the run (default: its preferred one)")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "finetune_compare"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "finetune_compare.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each arm")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--val-fraction", type=float, default=0.12)
    p.add_argument("--val-position", type=float, default=0.85)
    p.add_argument("--val-gap-mm", type=float, default=24.0)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def encoder_shift(run: Path, which: str, seed: int) -> float:
    """||pretrained - initial|| / ||initial|| over the Swin encoder weights: how far pretraining moved them from the
    scratch arm's initialisation of the same seed (MONAI builds the Swin encoder first in both networks)."""
    from napari_dagman.core.checkpoint import load_pretrained_encoder
    from napari_dagman.core.models.architecture import architecture_for
    from napari_dagman.core.segmentation import SegmentationNet

    trained = load_pretrained_encoder(run, which).encoder.swin.state_dict()
    torch.manual_seed(seed)
    net = SegmentationNet(architecture_for("tiny", 3), len(ORGANS) + 1)
    num = den = 0.0
    for key, value in net.state_dict().items():
        if key.startswith("swinViT.") and value.is_floating_point():
            num += float(((trained[key[len("swinViT.") :]] - value) ** 2).sum())
            den += float((value**2).sum())
    return math.sqrt(num / den)


def finetune(
    args: argparse.Namespace, out: Path, init: Path | None, name: str, seed: int, encoder: str = "auto"
) -> dict:
    from napari_dagman.core.config import FinetuneConfig
    from napari_dagman.core.events import FinishedEvent, LogEvent, StepEvent, ValidationEvent
    from napari_dagman.core.segmentation import run_finetuning

    data = Path(args.data)
    config = FinetuneConfig(
        images=[str(data / "example_ct.nii.gz")],
        segmentations=[str(data / "example_seg_fast_force_split.nii.gz")],
        out=str(out / f"{name}_seed{seed}"),
        organs=list(ORGANS),
        init=str(init) if init else None,
        init_encoder=encoder,
        preset="tiny" if init is None else None,
        roi=args.roi,
        spacing=args.spacing,
        hu_min=-175.0,
        hu_max=250.0,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        val_split="slab",
        val_fraction=args.val_fraction,
        val_position=args.val_position,
        val_gap_mm=args.val_gap_mm,
        val_every=args.val_every,
        seed=seed,
        threads=args.threads,
        device="cpu",
    )
    import shutil

    shutil.rmtree(config.out, ignore_errors=True)
    history, finished = [], None
    t0, cpu0 = time.perf_counter(), time.process_time()
    for event in run_finetuning(config):
        if isinstance(event, LogEvent):
            print(f"  [{name}] {event.message}", flush=True)
        elif isinstance(event, StepEvent) and (event.step % 25 == 0 or event.step == 1):
            print(
                f"  [{name}] step {event.step}/{event.total_steps} loss {event.loss:.4f} "
                f"({event.seconds_per_step:.2f} s/step, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        elif isinstance(event, ValidationEvent):
            history.append({"step": event.step, "mean_dice": event.mean_dice, "dice": event.dice})
            shown = ", ".join(f"{k} {v:.3f}" for k, v in event.dice.items() if math.isfinite(v))
            print(f"  [{name}] validation @ {event.step}: mean {event.mean_dice:.3f} ({shown})", flush=True)
        elif isinstance(event, FinishedEvent):
            finished = event
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert finished is not None
    last = history[-1]
    return {
        "arm": name,
        "seed": seed,
        "swing": swing(history),
        "init": str(init) if init else None,
        "wall_seconds": wall,
        # CPU seconds of this process (all its threads): what the arm costs on a machine nobody else uses
        "cpu_seconds": cpu,
        "final_dice": last["dice"],
        "final_mean_dice": last["mean_dice"],
        "best_mean_dice": finished.summary["best_mean_dice"],
        "best_step": finished.summary["best_step"],
        "best_dice": finished.summary["best_dice"],
        "history": history,
        "init_report": finished.summary["init"]["summary"],
        "split": finished.summary["split"],
    }


def swing(history: list[dict]) -> dict[str, float]:
    """Per organ, the largest change of validation Dice between two consecutive evaluations."""
    out: dict[str, float] = {}
    for organ in history[0]["dice"] if history else []:
        values = [h["dice"].get(organ) for h in history]
        values = [v for v in values if v is not None and math.isfinite(v)]
        out[organ] = max((abs(b - a) for a, b in zip(values, values[1:], strict=False)), default=0.0)
    return out


def fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_dagman.core.labels import TOTALSEG_V2

    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.init)
    t_all = time.perf_counter()
    arms = []
    for seed in args.seeds:
        for name, init in (("pretrained", run), ("scratch", None)):
            print(f"fine-tuning: {name}, seed {seed}", flush=True)
            arms.append(finetune(args, out, init, name, seed, args.encoder))
    organs = [TOTALSEG_V2[i] for i in ORGANS]
    columns = [f"{a['arm']} s{a['seed']}" for a in arms]
    lines = [f"{'organ':<16}" + "".join(f"{c:>16}" for c in columns), "-" * (16 + 16 * len(arms))]
    for organ in organs:
        lines.append(f"{organ:<16}" + "".join(f"{fmt(a['final_dice'].get(organ)):>16}" for a in arms))
    lines.append(f"{'mean':<16}" + "".join(f"{fmt(a['final_mean_dice']):>16}" for a in arms))
    lines.append(f"{'largest swing':<16}" + "".join(f"{fmt(max(a['swing'].values(), default=0.0)):>16}" for a in arms))
    lines.append(f"{'wall time (s)':<16}" + "".join(f"{a['wall_seconds']:>16.0f}" for a in arms))
    table = "\n".join(lines)
    print()
    print(f"split: {arms[0]['split']}")
    print(f"fine-tuning: {args.steps} steps, ROI {args.roi}, batch {args.batch_size}, lr {args.lr}, {args.spacing} mm")
    print(table)
    results = {
        "arguments": vars(args),
        "organs": dict(zip(ORGANS, organs, strict=True)),
        "pretrain_run": str(run),
        "encoder_shift_from_scratch_init": {s: encoder_shift(run, args.encoder, s) for s in args.seeds},
        "total_seconds": time.perf_counter() - t_all,
        "arms": arms,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "table": table,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
