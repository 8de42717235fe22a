"""``napari-dagman demo``: every capability in one headless run, with a report to open in a browser."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import drive_result, say
from napari_dagman.core.config import DemoConfig

EXAMPLES = """examples:
  napari-dagman demo --quick --out demo/                       # the phantom, a few minutes on a laptop CPU
  napari-dagman demo --out demo/                               # the phantom, under a quarter of an hour
  napari-dagman demo --image ct.nii.gz --labels seg.nii.gz --out demo_ct/ --device cuda
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "demo",
        help="pretrain, explore attention, fine-tune, cluster organs: one headless run with an HTML report",
        description="On the built-in phantom (or your CT and label map): pretrain DAGMaN, draw every head's "
        "attention and every strategy's mask, fine-tune and predict a segmentation, embed and project organ "
        "patches; writes PNG figures, summary.json and index.html into --out. No display needed. Ctrl-C keeps "
        "what is done (the report is rewritten after every stage).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="napari-dagman-demo", help="report folder (default: napari-dagman-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    DemoConfig.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.demo import demo_job
    from napari_dagman.core.io import check_output_folder

    config = DemoConfig.from_args(args, out=args.out)
    check_output_folder(config.out)
    report = drive_result(demo_job(config), desc="demo", quiet=args.quiet)
    index = Path(config.out).resolve() / "index.html"
    say(f"report: {index}  (open it in a browser; every number is in summary.json)")
    say("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.summary["timings"].items()))
    return 0
