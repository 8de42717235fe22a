"""Acceptance experiment: fine-tuning from a DAGMaN-pretrained encoder versus from scratch, at the same budget.

Data: ``example_ct.nii.gz`` with ``example_seg_fast_force_split.nii.gz`` (TotalSegmentator "fast" predictions,
not manual ground truth) from ``../shared/data``. Organs: liver (5), spleen (1), kidney_right (2), kidney_left (3),
urinary_bladder (21), colon (20).

Split: one held-out axial slab of the volume (``--val-fraction`` of its slices at ``--val-position`` along z)
with a gap of ``--val-gap-mm`` on both sides that is neither trained nor validated. The default slab (z 73-83
of 112 at 3 mm, the level of the kidneys) holds the lower liver, the top of the spleen, both kidneys and colon
while leaving most of the liver (z 89-111) for training; a slab higher up (e.g. 0.8) leaves only the liver dome
to train on, and no model of this size learns the liver from it. The urinary bladder lies far below any slab
that holds the other organs, so it is trained but cannot be validated here (its Dice is reported as "-").

Pretraining (the DAGMaN arm only): DAGMaN, preset tiny, on the *training part* of the same CT only (the
validation slab and the gaps are cut out, so the encoder never saw the validation voxels, not even unlabelled),
``--pretrain-steps`` steps at ROI ``--pretrain-roi``. Its cost is reported separately from the fine-tuning budget.

Fine-tuning (both arms, identical except the encoder initialisation): tiny SwinUNETR, 3 mm, ROI 64, batch 2,
``--steps`` steps, AdamW with cosine schedule, Dice+CE, class-balanced crops, same seed (same crops, same
decoder initialisation). Reported: per-organ validation Dice at the last step (no model selection on the
validation slab) and the best over the validation points, wall time per arm.

Run::

    python benchmarks/finetune_compare.py --out benchmarks/results/finetune_compare

It writes ``results.json`` and prints a table. CPU only, threads set by ``--threads``.
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
ORGANS = (5, 1, 2, 3, 21, 20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with the shared CT")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "finetune_compare"))
    p.add_argument("--pretrain-run", default=None, help="reuse this DAGMaN run folder instead of pretraining")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-roi", type=int, default=32)
    p.add_argument("--pretrain-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=500, help="fine-tuning steps of each arm")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-position", type=float, default=0.72)
    p.add_argument("--val-gap-mm", type=float, default=15.0)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument(
        "--encoders",
        nargs="+",
        default=["teacher"],
        choices=["teacher", "student"],
        help="which encoder(s) of the DAGMaN run start a fine-tuning arm (each is one arm, plus scratch)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def training_part(ct, args: argparse.Namespace):
    """The CT at the fine-tuning spacing, cut into the training z-ranges of the slab split (list of Volumes)."""
    from napari_dagman.core.io import resample_to_spacing
    from napari_dagman.core.segmentation import slab_ranges
    from napari_dagman.core.volume import Volume

    vol = resample_to_spacing(ct, (args.spacing,) * 3, is_label=False)
    gap = int(math.ceil(args.val_gap_mm / vol.spacing[0] - 1e-9))
    ranges, slab = slab_ranges(vol.shape[0], args.val_fraction, args.val_position, gap)
    pieces = []
    for k, (a, b) in enumerate(ranges):
        origin = vol.index_to_physical((a, 0, 0))
        meta = dict(vol.metadata, name=f"example_ct z{a}-{b - 1}")
        pieces.append(Volume(vol.array[a:b], vol.spacing, tuple(origin), vol.direction.copy(), meta))
        print(f"  pretraining piece {k}: z {a}-{b - 1}", flush=True)
    return pieces, ranges, slab


def pretrain(ct, args: argparse.Namespace, out: Path) -> tuple[Path, float]:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import FinishedEvent, StepEvent
    from napari_dagman.core.training import run_pretraining

    run = out / "pretrain_dagman"
    pieces, _, _ = training_part(ct, args)
    config = PretrainConfig(
        out=str(run),
        method="dagman",
        preset="tiny",
        roi=args.pretrain_roi,
        spacing=args.spacing,
        steps=args.pretrain_steps,
        batch_size=args.pretrain_batch,
        preview_every=0,
        seed=args.seed,
        threads=args.threads,
        save_every=25,
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    for event in run_pretraining(config, pieces):
        if isinstance(event, StepEvent) and (event.step % 25 == 0 or event.step == 1):
            print(
                f"  pretrain step {event.step}/{event.total_steps} loss {event.loss:.4f} "
                f"({event.seconds_per_step:.2f} s/step, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        elif isinstance(event, FinishedEvent):
            print(f"  pretraining done: {event.summary}", flush=True)
    print(f"  pretraining CPU time {time.process_time() - cpu0:.0f} s", flush=True)
    return run, time.perf_counter() - t0


def encoder_shift(run: Path, which: str, seed: int) -> float:
    """||pretrained - initial|| / ||initial|| over the Swin encoder weights: how far pretraining moved them.

    The scratch arm starts from exactly the initial weights (same seed, MONAI builds the Swin encoder first in
    both networks), so this is the only difference between an arm initialised from the run and scratch.
    """
    from napari_dagman.core.checkpoint import load_tensors
    from napari_dagman.core.models.architecture import architecture_for
    from napari_dagman.core.segmentation import SegmentationNet

    tensors, _ = load_tensors(run / "model.safetensors")
    torch.manual_seed(seed)
    net = SegmentationNet(architecture_for("tiny", 3), len(ORGANS) + 1)
    num = den = 0.0
    for key, value in net.state_dict().items():
        if key.startswith("swinViT.") and value.is_floating_point():
            trained = tensors[f"{which}.encoder.swin.{key[len('swinViT.') :]}"]
            num += float(((trained - value) ** 2).sum())
            den += float((value**2).sum())
    return math.sqrt(num / den)


def finetune(
    args: argparse.Namespace, out: Path, init: Path | None, name: str, encoder: str = "auto"
) -> dict:
    from napari_dagman.core.config import FinetuneConfig
    from napari_dagman.core.events import FinishedEvent, LogEvent, StepEvent, ValidationEvent
    from napari_dagman.core.segmentation import run_finetuning

    data = Path(args.data)
    config = FinetuneConfig(
        images=[str(data / "example_ct.nii.gz")],
        segmentations=[str(data / "example_seg_fast_force_split.nii.gz")],
        out=str(out / f"finetune_{name}"),
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
        seed=args.seed,
        threads=args.threads,
        device="cpu",
    )
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


def fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_dagman.core.io import read_volume
    from napari_dagman.core.labels import TOTALSEG_V2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ct = read_volume(Path(args.data) / "example_ct.nii.gz")
    t_all = time.perf_counter()
    if args.pretrain_run:
        run, pretrain_seconds = Path(args.pretrain_run), None
    else:
        print("pretraining DAGMaN (tiny) on the training part of the CT", flush=True)
        run, pretrain_seconds = pretrain(ct, args, out)
    shifts = {which: encoder_shift(run, which, args.seed) for which in args.encoders}
    for which, shift in shifts.items():
        print(
            f"DAGMaN {which} encoder: relative change from the scratch initialisation {shift:.4f}", flush=True
        )
    arms = []
    plan = [(f"dagman-{which}", run, which) for which in args.encoders] + [("scratch", None, "auto")]
    for name, init, which in plan:
        print(f"fine-tuning: {name}", flush=True)
        arms.append(finetune(args, out, init, name, which))

    organs = [TOTALSEG_V2[i] for i in ORGANS]
    lines = [
        f"{'organ':<18}" + "".join(f"{a['arm'] + ' final':>22}{a['arm'] + ' best':>20}" for a in arms),
        "-" * (18 + 42 * len(arms)),
    ]
    for organ in organs:
        lines.append(
            f"{organ:<18}"
            + "".join(
                f"{fmt(a['final_dice'].get(organ)):>22}{fmt(a['best_dice'].get(organ)):>20}" for a in arms
            )
        )
    lines.append(
        f"{'mean (validated)':<18}"
        + "".join(f"{fmt(a['final_mean_dice']):>22}{fmt(a['best_mean_dice']):>20}" for a in arms)
    )
    lines.append(f"{'wall time (s)':<18}" + "".join(f"{a['wall_seconds']:>15.0f}{'':>20}" for a in arms))
    table = "\n".join(lines)
    print()
    print(f"split: {arms[0]['split']}")
    print(
        f"pretraining: DAGMaN tiny, {args.pretrain_steps} steps, ROI {args.pretrain_roi}, batch {args.pretrain_batch}"
        + (f", {pretrain_seconds:.0f} s" if pretrain_seconds is not None else " (reused run)")
    )
    print(
        f"fine-tuning: {args.steps} steps, ROI {args.roi}, batch {args.batch_size}, lr {args.lr}, {args.spacing} mm"
    )
    print(table)
    results = {
        "arguments": vars(args),
        "organs": dict(zip(ORGANS, organs, strict=True)),
        "pretrain_run": str(run),
        "pretrain_seconds": pretrain_seconds,
        "encoder_shift_from_scratch_init": shifts,
        "total_seconds": time.perf_counter() - t_all,
        "arms": arms,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "table": table,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
