"""``napari-dagman predict``: sliding-window segmentation with a fine-tuned run, and per-organ metrics."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import drive, say
from napari_dagman.core.config import PredictConfig

EXAMPLES = """examples:
  napari-dagman predict ct.nii.gz --checkpoint runs/seg --out ct_seg.nii.gz
  napari-dagman predict ct.nii.gz --checkpoint runs/seg --out ct_seg.nii.gz --reference seg.nii.gz
      # also prints per-organ Dice and HD95 and writes ct_seg.metrics.json and ct_seg.metrics.csv
  napari-dagman predict dicom_folder/ --checkpoint runs/seg/model.safetensors --out seg.nrrd --overlap 0.75
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "predict",
        help="segment a CT with a fine-tuned run (sliding window); metrics against a reference",
        description="Segment a CT with a fine-tuned run (napari-dagman finetune): MONAI sliding-window "
        "inference at the run's spacing, probabilities resampled back onto the input grid, written in the "
        "input's geometry and orientation with a .labels.json sidecar of organ names. With --reference, "
        "per-organ volume, Dice and 95%% Hausdorff distance are printed and written as JSON and CSV.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="image file or DICOM series folder")
    p.add_argument("--checkpoint", required=True, help="fine-tuning run folder (or one of its .safetensors)")
    p.add_argument("--out", required=True, help="label map to write (.nii.gz, .nii, .mha, .nrrd)")
    p.add_argument("--reference", help="reference label map on the image's grid: report per-organ metrics")
    p.add_argument(
        "--resample-reference",
        action="store_true",
        help="resample a reference on another grid onto the image (nearest neighbour) instead of refusing it",
    )
    p.add_argument("--metrics", help="metrics JSON to write (default: <out>.metrics.json with --reference)")
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    PredictConfig.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.events import PredictionEvent
    from napari_dagman.core.io import WRITE_SUFFIXES, read_volume, stem_of, suffix_of, write_volume
    from napari_dagman.core.segmentation import (
        evaluate,
        format_table,
        load_segmenter,
        results_summary,
        run_prediction,
    )

    out = Path(args.out)
    if suffix_of(out) not in WRITE_SUFFIXES:
        raise DagmanInputError(f"cannot write '{out.name}': use one of {', '.join(WRITE_SUFFIXES)}")
    config = PredictConfig.from_args(args, config_file=args.config_file, checkpoint=args.checkpoint)
    if config.threads:
        torch.set_num_threads(config.threads)
    # everything is read and checked before the (possibly long) inference
    segmenter = load_segmenter(config.checkpoint, weights=config.weights, device=config.device)
    image = read_volume(args.image)
    reference = read_volume(args.reference) if args.reference else None
    if reference is not None and not args.resample_reference and not reference.same_grid(image):
        raise DagmanInputError(
            f"reference {Path(args.reference).name} is not on the grid of {Path(args.image).name} "
            f"(shape {reference.shape} vs {image.shape}); pass --resample-reference to resample it"
        )
    labels = None
    events = run_prediction(
        image,
        segmenter,
        roi=config.roi,
        overlap=config.overlap,
        sw_batch_size=config.sw_batch_size,
        name=stem_of(args.image),
    )

    def keep(events):
        nonlocal labels
        for event in events:
            if isinstance(event, PredictionEvent):
                labels = event.labels
            yield event

    drive(keep(events), desc="predict", quiet=args.quiet)
    if labels is None:
        say("prediction cancelled; nothing written", err=True)
        return 1
    names = labels.metadata["label_names"]
    written = write_volume(labels, out, label_names=names)
    say(f"wrote {', '.join(written)}")
    table = evaluate(labels, reference, names, hd95=config.hd95, resample_reference=args.resample_reference)
    say(format_table(table))
    if reference is not None or args.metrics:
        metrics_path = Path(args.metrics) if args.metrics else out.with_name(stem_of(out) + ".metrics.json")
        summary = results_summary(table)
        summary.update(
            image=str(args.image),
            reference=str(args.reference) if args.reference else None,
            checkpoint=segmenter.source,
            checkpoint_step=segmenter.step,
            roi=config.roi or segmenter.roi,
            overlap=config.overlap,
        )
        from napari_dagman.core.io import atomic_write_text

        atomic_write_text(metrics_path, json.dumps(summary, indent=2) + "\n")
        csv_path = metrics_path.with_suffix(".csv")
        atomic_write_text(csv_path, table.to_csv(index=False))
        say(f"wrote {metrics_path} and {csv_path}")
    return 0
