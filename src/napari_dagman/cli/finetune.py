"""``napari-dagman finetune``: segmentation fine-tuning of a SwinUNETR whose encoder comes from a pretraining run."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import is_cohort, run_training, say
from napari_dagman.core.config import FinetuneConfig

EXAMPLES = """examples:
  napari-dagman finetune ct.nii.gz seg.nii.gz --init runs/dagman --out runs/seg --labels 5,1,2,3,21,20 --steps 500
  napari-dagman finetune ct.nii.gz seg.nii.gz --out runs/seg_scratch --preset tiny --labels liver,spleen
  napari-dagman finetune a.nii.gz a_seg.nii.gz b.nii.gz b_seg.nii.gz c.nii.gz c_seg.nii.gz --init runs/dagman \\
      --out runs/seg3 --val-split cases                    # train on a and b, validate on c
  napari-dagman finetune --out runs/seg --resume --steps 1000   # continue where it stopped
  napari-dagman finetune ct.nii.gz seg.nii.gz --init runs/dagman --out runs/efficiency --labels 5,1,2,3 \
      --label-efficiency 1,2,4 --seeds 0,1 --steps 300   # Dice vs 1, 2, 4 labelled slabs, pretrained vs scratch

Validation: with one pair, a held-out axial slab (--val-fraction, --val-position) with a gap of --val-gap-mm on
each side that is neither trained nor validated; with several pairs, the last --val-cases pairs.

Label efficiency (--label-efficiency K1,K2,...): one run per budget, init (the --init run and scratch) and seed in
--out/<init>/k<K>_seed<S>, each on K labelled pieces (training cases, or --train-slabs slabs of each volume)
drawn by the seed; then --out/label_efficiency.csv, .json and .png. Finished runs are reused when run again.
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a segmentation model (SwinUNETR) from a pretraining run or from scratch",
        description="Fine-tune MONAI's SwinUNETR on CT/label-map pairs. With --init, its Swin encoder is loaded "
        "from a pretraining run folder (the teacher by default) and the decoder starts fresh; without it the "
        "whole network starts from scratch. Writes a run folder: config.json, model.safetensors, "
        "best.safetensors (best validation Dice), resume.safetensors, metrics.jsonl, run.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "pairs",
        nargs="*",
        metavar="IMAGE LABELS",
        help="image file (or DICOM folder) followed by its label map, one or more pairs",
    )
    p.add_argument("--out", required=True, help="run folder to write (must be new unless --resume)")
    p.add_argument(
        "--labels",
        dest="organ_spec",
        metavar="IDS",
        help="organs to segment: label ids or names, comma-separated (e.g. 5,1,2,3 or liver,spleen); "
        "default: every id in the label maps",
    )
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--label-efficiency",
        dest="budgets",
        metavar="K1,K2,...",
        help="a label-efficiency curve: fine-tune on each number of labelled pieces (training cases, or slabs "
        "with a slab split), from --init and from scratch, at every --seeds; --out holds the runs and the tables",
    )
    p.add_argument(
        "--seeds", metavar="S1,S2,...", help="with --label-efficiency: the seeds of the arms (default: --seed)"
    )
    FinetuneConfig.add_arguments(p)
    p.set_defaults(func=run)


def organ_names(labels_path: str | None) -> dict[int, str]:
    """Names that ``--labels`` may use: the first label map's own (`core.label_names`), and TotalSegmentator v2's
    when the user says the maps are TotalSegmentator's."""
    from napari_dagman.core.io import read_label_names
    from napari_dagman.core.label_names import totalsegmentator_asked
    from napari_dagman.core.labels import TOTALSEG_V2

    names = dict(TOTALSEG_V2) if totalsegmentator_asked() else {}
    if labels_path and Path(labels_path).is_file():
        names.update(read_label_names(labels_path) or {})
    elif labels_path and Path(labels_path).is_dir():  # a TotalSegmentator segmentations/ folder: its masks' names
        from napari_dagman.core.datasets import mask_names

        names.update(mask_names(labels_path))
    return names


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.checkpoint import CONFIG_FILE
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.segmentation import parse_organs, run_finetuning
    from napari_dagman.core.segmentation.data import slab_warning

    if len(args.pairs) == 1 and is_cohort(args.pairs[0]):  # a dataset: its image/label pairs
        from napari_dagman.core.datasets import find_cases

        cohort = find_cases([args.pairs[0]], labels=True)
        for note in cohort.notes:
            say(f"note: {note}", err=True)
        args.pairs = [path for case in cohort.cases for path in (case.image, case.labels)]
    if len(args.pairs) % 2:
        raise DagmanInputError(
            f"give IMAGE LABELS pairs: got {len(args.pairs)} path(s), the last one ({args.pairs[-1]}) has no partner"
        )
    if not args.pairs and not args.resume:
        raise DagmanInputError("give at least one IMAGE LABELS pair")
    config_file = args.config_file
    if args.resume and config_file is None and (Path(args.out) / CONFIG_FILE).is_file():
        config_file = str(Path(args.out) / CONFIG_FILE)
    # a file the user gives must hold known options only (a typo is refused with the closest name); the run's
    # own config.json, read to resume, may come from an older version
    strict = config_file == args.config_file
    base = FinetuneConfig.load(config_file, strict=strict).to_dict() if config_file else {}
    base.update({k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__})
    if args.pairs:
        base["images"] = [str(p) for p in args.pairs[0::2]]
        base["segmentations"] = [str(p) for p in args.pairs[1::2]]
    if args.organ_spec:
        base["organs"] = parse_organs(args.organ_spec, organ_names(base.get("segmentations", [None])[0]))
    base["out"] = args.out
    config = FinetuneConfig.from_dict(base)
    if args.budgets is not None or args.seeds is not None:
        return run_efficiency(args, config)
    if not args.resume:  # the dock's check at Start, said before the work (a warning: a script cannot answer)
        line = slab_warning(config, organ_names(config.segmentations[0] if config.segmentations else None))
        if line:
            say(f"warning: {line}", err=True)
    finished, status = run_training(
        run_finetuning, config, resume=args.resume, name="finetune", quiet=args.quiet
    )
    summary = finished.summary
    best = summary.get("best_dice") or {}
    if best:
        say(f"best validation (step {summary['best_step']}): mean Dice {summary['best_mean_dice']:.3f}")
        for organ, value in best.items():
            shown = (
                f"{value:.3f}"
                if isinstance(value, float) and math.isfinite(value)
                else "- (not in validation)"
            )
            say(f"  {organ:<24} {shown}")
    return status


def run_efficiency(args: argparse.Namespace, config: FinetuneConfig) -> int:
    """``--label-efficiency``: every arm of the grid, then the table of mean Dice per budget and init."""
    from napari_dagman.cli.common import drive, stop_on_signals
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.segmentation.data import slab_warning
    from napari_dagman.core.segmentation.efficiency import check_grid, parse_numbers, run_label_efficiency

    if args.budgets is None:
        raise DagmanInputError("--seeds goes with --label-efficiency K1,K2,...")
    if args.resume:
        raise DagmanInputError("--label-efficiency resumes unfinished runs by itself: leave out --resume")
    if config.train_pieces:
        raise DagmanInputError("--label-efficiency sets --train-pieces for each run: leave it out")
    budgets = parse_numbers(args.budgets, "--label-efficiency")
    seeds = parse_numbers(args.seeds, "--seeds") if args.seeds is not None else [config.seed]
    check_grid(config, budgets, seeds)  # bad input ends here, before any image is read
    line = slab_warning(config, organ_names(config.segmentations[0]))
    if line:  # the same slab validates every run: an organ it misses has no Dice in any
        say(f"warning: {line}", err=True)
    command = "napari-dagman " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with stop_on_signals() as stop:
        finished = drive(
            run_label_efficiency(config, budgets, seeds, cancel=stop, command=command),
            desc="label efficiency",
            quiet=args.quiet,
        )
    if finished.cancelled:
        say(f"cancelled after {finished.steps_done} of {finished.total_steps} runs; run the same command to go on")
        return stop.exit_status
    say(f"mean validation Dice (last step) over seeds {', '.join(map(str, seeds))}:")
    say(f"  {'pieces':>6}  {'pretrained':>19}  {'scratch':>19}  {'pretrained - scratch':>20}")
    curves = {(c["budget"], c["init"]): c["mean_dice"] for c in finished.summary["curves"]}
    paired = {p["budget"]: p for p in finished.summary["pretrained_minus_scratch"]}
    for k in budgets:
        cells = [_mean_spread(curves[(k, init)]) for init in ("pretrained", "scratch")]
        say(f"  {k:>6}  {cells[0]:>19}  {cells[1]:>19}  {_mean_spread(paired[k]):>20}")
    for path in finished.paths.values():
        say(f"wrote {path}")
    return 0


def _mean_spread(stats: dict) -> str:
    """``0.412 ± 0.031`` (mean and standard deviation over seeds), ``-`` when there is none."""
    if stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"
