"""``napari-dagman attention``: attention maps of a volume, mask previews of a crop, head-diversity figures."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import drive_result, say
from napari_dagman.core.config import AttentionConfig

EXAMPLES = """examples:
  napari-dagman attention ct.nii.gz --checkpoint runs/dagman --out attention/
  napari-dagman attention dicom_folder/ --checkpoint runs/dagman --out att/ --which student --on-input-grid
  napari-dagman attention ct.nii.gz --checkpoint runs/dagman --out att/ --center -20 -150 30 --ratio 0.6
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "attention",
        help="attention maps, mask previews and head diversity of a pretrained encoder",
        description="Write the semantic class attention of a pretraining run over a whole volume (sliding "
        "window; per head and mean, NIfTI aligned with the image in physical space), the mask each strategy "
        "would draw for one crop and the cells the noisy teacher dropped (NIfTI + PNG), and head-diversity "
        "figures (JSON).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="CT file or DICOM series folder")
    p.add_argument(
        "--checkpoint", required=True, help="pretraining run folder (or one of its .safetensors files)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    AttentionConfig.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.attention import attention_job, write_attention
    from napari_dagman.core.io import read_volume, resample_like, write_volume

    config = AttentionConfig.from_args(args, config_file=args.config_file, checkpoint=args.checkpoint)
    volume = read_volume(args.image)
    result = drive_result(attention_job(config, volume), desc="attention", quiet=args.quiet)
    out = Path(args.out)
    written = write_attention(result, volume, out, figure=True)
    if config.on_input_grid and result.maps is not None:
        mean = resample_like(result.maps.volumes()["mean"], volume, is_label=False)
        written += write_volume(mean, out / "attention_mean_on_input.nii.gz")
    if not result.model.get("trains_class_attention", True):
        say(f"warning: {result.model.get('method')} does not train the class attention", err=True)
    d, crop = result.diversity, result.preview.diversity
    say(
        f"head diversity (1 - mean pairwise correlation of the heads' maps; 0 = alike, 1 = unrelated): "
        f"{result.scope} {d['diversity']:.4f}, crop {crop['diversity']:.4f}; "
        f"mean head entropy (1 = uniform) {crop['entropy_mean']:.4f}"
    )
    say(f"wrote {len(written)} files to {out}")
    return 0
