"""``napari-dagman export``: a run for MONAI (encoder weights in SwinUNETR's layout, or a MONAI Bundle)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from napari_dagman.cli.common import say
from napari_dagman.core.config.jobs import INVERSE_MODES

EXAMPLES = """examples:
  napari-dagman export runs/dagman --format monai-swinunetr --out encoder.pt
      # encoder.pt (swinViT.* tensors), encoder.json (SwinUNETR arguments), encoder.input.json (spacing, HU)
  napari-dagman export runs/dagman --format safetensors --out encoder.safetensors --which student
  napari-dagman export runs/seg --format monai-bundle --out seg_bundle
      # --inverse probabilities: smoother borders, but memory grows with the class count
  python -m monai.bundle run --config_file seg_bundle/configs/inference.json --bundle_root seg_bundle \\
      --image ct.nii.gz --output_dir out
"""

FORMATS = ("monai-swinunetr", "safetensors", "monai-bundle")


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "export",
        help="write a run for MONAI: encoder weights in SwinUNETR's layout, or a MONAI Bundle",
        description="Write a run for the tools users already have. monai-swinunetr / safetensors: a pretraining "
        "run's published Swin encoder as a state dict in MONAI SwinUNETR's layout (swinViT.*, tensors only), "
        "with SwinUNETR's arguments in a JSON beside it. monai-bundle: a fine-tuning run as a MONAI Bundle whose "
        "inference.json segments like `napari-dagman predict` with the same --inverse.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder (pretraining for encoder formats, fine-tuning for monai-bundle)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="what to write")
    p.add_argument("--out", required=True, help="weights file (.pt / .safetensors) or bundle folder")
    p.add_argument(
        "--which", default="auto", help="published encoder to export (default: the run's preferred one)"
    )
    p.add_argument(
        "--weights",
        choices=("last", "best"),
        help="which weights of the run (default: last for encoders, best for bundles)",
    )
    bundle = p.add_argument_group("monai-bundle: sliding window (default: predict's)")
    bundle.add_argument(
        "--roi", type=int, help="window side in voxels, a multiple of 32 (default: the training ROI)"
    )
    bundle.add_argument("--overlap", type=float, help="window overlap (default 0.5)")
    bundle.add_argument("--sw-batch-size", type=int, help="windows per forward pass (default 4)")
    bundle.add_argument(
        "--inverse",
        choices=INVERSE_MODES,
        help="how class scores go back onto the input grid: labels (default: arg-max on the model's grid, one "
        "channel resampled nearest, memory independent of the class count) or probabilities (every class "
        "resampled linearly before the arg-max: smoother borders, memory grows with the class count); "
        "`napari-dagman predict --inverse` with the same value gives the same labels",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.export import export_bundle, export_encoder

    if args.fmt == "monai-bundle":
        if args.which != "auto":
            raise DagmanInputError(
                "--which names a pretraining run's encoder; a bundle exports a fine-tuning run"
            )
        written = export_bundle(
            args.run,
            args.out,
            weights=args.weights or "best",
            roi=args.roi,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            # the bundle's default when not given (`pipeline.BUNDLE_INVERSE`)
            **({"inverse": args.inverse} if args.inverse else {}),
        )
        say(f"wrote {', '.join(written)}")
        say(
            "run it with: python -m monai.bundle run --config_file "
            f"{shlex.quote(args.out + '/configs/inference.json')} --bundle_root {shlex.quote(args.out)} "
            "--image CT --output_dir OUT"
        )
        return 0
    if any(v is not None for v in (args.roi, args.overlap, args.sw_batch_size, args.inverse)):
        raise DagmanInputError("--roi, --overlap, --sw-batch-size and --inverse apply to --format monai-bundle")
    written = export_encoder(
        args.run, args.out, fmt=args.fmt, which=args.which, weights=args.weights or "last"
    )
    say(f"wrote {', '.join(written)}")
    return 0
