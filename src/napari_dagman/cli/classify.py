"""``napari-dagman classify``: cases or lesions from a table, a pretraining run's frozen encoder and a linear probe,
with patient-bootstrap intervals, few-shot curves and the random-init and intensity controls."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import drive, say
from napari_dagman.core.config.classify import ClassifyConfig

EXAMPLES = """examples:
  napari-dagman classify nodules.csv --checkpoint runs/dagman --out nodules/
  napari-dagman classify nodules.csv --checkpoint runs/dagman --shots 1,2,5,10,all --draws 20 --out curve/
  napari-dagman classify nodules.csv --checkpoint runs/dagman --finetune --finetune-steps 200 --out ft/
  napari-dagman classify outcome.csv --checkpoint runs/mim --which student --stage 4 --positive responder --out io/

the table (CSV or Parquet), one row per case or lesion:
  image    CT file or DICOM folder (relative to the table's folder)
  label    class name, or a 0/1 outcome
  x, y, z  optional lesion centre in world mm, LPS, as napari shows it (without: the whole volume's body)
  size     optional lesion diameter in mm (the pooled box is --context times it; default box --box-mm)
  patient  optional: rows of one patient are never split apart (default: the image)
  split    optional train/test (default: patient-level cross-validation in --folds folds)

outputs: metrics.json (AUC and average precision for two classes, balanced accuracy and per-class recall, each
with a 95% patient-bootstrap interval; confusion matrix; the label-efficiency curve; the encoder minus each
control with a paired interval), predictions.csv (per-row probabilities), curve.csv, curve.png, roc.png, pr.png.
With --finetune, the encoder is also fine-tuned with a classification head, one resumable run per fold (and draw)
in OUT/finetune; metrics.json gains heads.finetune and its paired differences. Rerun the same command to resume.
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "classify",
        help="classify cases or lesions with a pretrained encoder: linear probe, intervals, few-shot curves",
        description="Classify the rows of a table (cases, or lesions at a centre) with a pretraining run's frozen "
        "encoder: features pooled around each lesion, a class-balanced linear probe cross-validated by patient, "
        "metrics with bootstrap intervals, and the same on a random-init encoder and an intensity histogram.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("table", help="CSV or Parquet table: image, label[, x, y, z, size, patient, split]")
    p.add_argument("--checkpoint", required=True, help="pretraining run folder (or one of its .safetensors)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ClassifyConfig.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.classification import classify_job
    from napari_dagman.core.classification.report import summary_lines

    extra = {"table": args.table, "checkpoint": args.checkpoint, "out": args.out}
    config = ClassifyConfig.from_args(args, config_file=args.config_file, **extra)
    finished = drive(classify_job(config), desc="classify", quiet=args.quiet)
    for line in summary_lines(finished.summary):
        say(line)
    say("wrote " + ", ".join(Path(p).name for p in finished.paths.values()) + f" in {finished.run_dir}")
    return 0
