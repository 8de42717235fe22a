"""``napari-dagman predict``: sliding-window segmentation with a fine-tuned run, and per-organ metrics."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import drive_result, is_cohort, read_input, say
from napari_dagman.core.config import PredictConfig

EXAMPLES = """examples:
  napari-dagman predict ct.nii.gz --checkpoint runs/seg --out ct_seg.nii.gz
  napari-dagman predict ct.nii.gz --checkpoint runs/seg --out ct_seg.nii.gz --reference seg.nii.gz
      # also prints per-organ Dice and HD95 and writes ct_seg.metrics.json and ct_seg.metrics.csv
  napari-dagman predict dicom_folder/ --checkpoint runs/seg/model.safetensors --out seg.nrrd --overlap 0.75
  napari-dagman predict ct.nii.gz --checkpoint runs/seg --out ct_seg.nii.gz --inverse labels
      # arg-max on the model's grid, as an exported bundle by default: its labels, and faster with many organs
  napari-dagman predict dicom_folder/ --checkpoint runs/seg --out seg.dcm
      # a DICOM Segmentation over the series (needs napari-dagman[dicom])
  napari-dagman predict imagesTs/ --checkpoint runs/seg --out predictions/ --reference labelsTs/
      # a cohort: a folder (searched recursively), a dataset.json or a .csv list; the model is loaded once,
      # each case is written to predictions/<case>.nii.gz, with cohort.csv (case x organ) and cohort_summary.json
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
    p.add_argument(
        "image",
        help="image file or DICOM series folder; or a cohort: a folder of CTs, a dataset.json or a .csv/.json list",
    )
    p.add_argument("--checkpoint", required=True, help="fine-tuning run folder (or one of its .safetensors)")
    p.add_argument(
        "--out",
        required=True,
        help="label map to write (.nii.gz, .nii, .mha, .nrrd), or .dcm: a DICOM SEG over a DICOM series input",
    )
    p.add_argument(
        "--reference",
        help="reference label map on the image's grid: report per-organ metrics (a cohort: a folder of label maps "
        "named as the cases, e.g. labelsTs/)",
    )
    p.add_argument("--metrics", help="metrics JSON to write (default: <out>.metrics.json with --reference)")
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    PredictConfig.add_arguments(p)
    p.set_defaults(func=run)


def run_cohort(args: argparse.Namespace) -> int:
    """Every case of a cohort with one loaded model: a file per case, the cohort table and its summary."""
    from dataclasses import replace

    from napari_dagman.core.datasets import case_name, find_cases
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.io import WRITE_SUFFIXES, is_volume_file, suffix_of
    from napari_dagman.core.segmentation.cohort import COHORT_SUMMARY, COHORT_TABLE, cohort_predict_job

    out = Path(args.out)
    if (out.exists() and not out.is_dir()) or suffix_of(out) in (*WRITE_SUFFIXES, ".dcm"):
        raise DagmanInputError(f"{args.image} is a cohort: --out must be a folder, got {out}")
    config = PredictConfig.from_args(args, config_file=args.config_file, checkpoint=args.checkpoint)
    cohort = find_cases([args.image], labels=False)
    for note in cohort.notes:
        say(f"note: {note}", err=True)
    cases = cohort.cases
    if args.reference:
        folder = Path(args.reference)
        if not folder.is_dir():
            raise DagmanInputError(f"for a cohort, --reference is a folder of label maps; {folder} is not one")
        references = {case_name(p): p for p in sorted(folder.rglob("*")) if is_volume_file(p)}
        missing = [c.name for c in cases if c.name not in references]
        if missing:
            say(f"note: no reference in {folder} for {len(missing)} case(s): {', '.join(missing[:5])}", err=True)
        cases = [replace(c, labels=str(references[c.name])) if c.name in references else c for c in cases]
    results = drive_result(cohort_predict_job(config, cases, out), desc="predict", quiet=args.quiet)
    for organ, row in results.summary["organs"].items():
        if row["mean_dice"] is not None:
            worst = ", ".join(f"{w['case']} {w['dice']:.3f}" for w in row["worst"])
            say(f"{organ:<24} Dice mean {row['mean_dice']:.3f} median {row['median_dice']:.3f}  worst: {worst}")
    say(f"wrote {len(results.written)} case(s), {COHORT_TABLE} and {COHORT_SUMMARY} in {out}")
    if results.failed:
        say(f"warning: {len(results.failed)} case(s) skipped: {', '.join(results.failed)}", err=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.errors import DagmanInputError

    if is_cohort(args.image):
        return run_cohort(args)
    from napari_dagman.core.io import WRITE_SUFFIXES, check_output_file, stem_of, suffix_of
    from napari_dagman.core.segmentation import format_table
    from napari_dagman.core.segmentation.jobs import predict_job, write_prediction

    out = Path(args.out)
    dicom_seg = suffix_of(out) == ".dcm"
    if not dicom_seg and suffix_of(out) not in WRITE_SUFFIXES:
        raise DagmanInputError(
            f"cannot write '{out.name}': use one of {', '.join(WRITE_SUFFIXES)}, or .dcm for a DICOM SEG"
        )
    config = PredictConfig.from_args(args, config_file=args.config_file, checkpoint=args.checkpoint)
    # the outputs are checked before minutes of inference, not after
    check_output_file(out)
    if args.metrics:
        check_output_file(args.metrics, "metrics file")
    image = read_input(args.image)
    image.metadata.setdefault("name", stem_of(args.image))
    if dicom_seg:  # a DICOM series input and highdicom, before the inference
        from napari_dagman.core.segmentation.dicom_seg import check_dicom_source

        for note in check_dicom_source(image):
            say(f"warning: {note}", err=True)
    reference = read_input(args.reference) if args.reference else None
    results = drive_result(predict_job(config, image, reference), desc="predict", quiet=args.quiet)
    written = write_prediction(
        results,
        out,
        metrics=args.metrics,
        extra={"image": str(args.image), "reference": str(args.reference) if args.reference else None},
        image=image,
    )
    say(format_table(results.table))
    say(f"wrote {', '.join(written)}")
    if dicom_seg:
        from napari_dagman.core.segmentation.dicom_seg import coding_notes

        for note in coding_notes(results.names):
            say(note, err=True)
    return 0
