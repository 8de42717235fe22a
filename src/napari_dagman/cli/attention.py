"""``napari-dagman attention``: attention maps of a volume, mask previews of a crop, head-diversity figures."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import drive_result, say

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
        "would draw for one crop (NIfTI + PNG), and head-diversity figures (JSON).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="CT file or DICOM series folder")
    p.add_argument(
        "--checkpoint", required=True, help="pretraining run folder (or one of its .safetensors files)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--which",
        choices=("auto", "teacher", "student"),
        default="auto",
        help="network whose attention to show (default: the teacher when there is one)",
    )
    p.add_argument("--weights", default="last", help="last, best or a .safetensors path (default: last)")
    p.add_argument(
        "--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 0.9] (default: 0.25)"
    )
    p.add_argument(
        "--center",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="physical (LPS, mm) centre of the mask-preview crop (default: the body's centre)",
    )
    p.add_argument("--ratio", type=float, default=0.6, help="mask ratio of the previews (default: 0.6)")
    p.add_argument(
        "--noise-rate",
        type=float,
        default=0.2,
        help="input dropout of the noisy-teacher preview (default: 0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random and block previews (default: 0)")
    p.add_argument(
        "--on-input-grid",
        action="store_true",
        help="also write the mean map resampled (linearly) onto the input's voxel grid",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_dagman.core.attention import attention_maps, crop_preview, save_preview_figure
    from napari_dagman.core.checkpoint import load_pretrained_encoder
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.io import read_volume, resample_like, write_volume
    from napari_dagman.core.volume import Volume

    if not 0.0 <= args.overlap <= 0.9:
        raise DagmanInputError(f"--overlap must be within [0, 0.9], got {args.overlap}")
    if not 0.0 <= args.ratio <= 1.0:
        raise DagmanInputError(f"--ratio must be within [0, 1], got {args.ratio}")
    device = resolve_device(args.device)
    pretrained = load_pretrained_encoder(args.checkpoint, args.which, weights=args.weights, device=device)
    volume = read_volume(args.image)
    if not pretrained.trains_class_attention:
        say(
            f"warning: {pretrained.method} does not train the class attention; its maps show an untrained module",
            err=True,
        )
    maps = drive_result(
        attention_maps(pretrained, volume, overlap=args.overlap, device=device),
        desc="attention",
        quiet=args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name, vol in maps.volumes().items():
        written += write_volume(vol, out / f"attention_{name}.nii.gz")
    if args.on_input_grid:
        mean = maps.volumes()["mean"]
        on_grid = resample_like(mean, volume, is_label=False)
        written += write_volume(on_grid, out / "attention_mean_on_input.nii.gz")

    preview = crop_preview(
        pretrained,
        volume,
        args.center,
        ratio=args.ratio,
        noise_rate=args.noise_rate,
        seed=args.seed,
        device=device,
    )
    meta = {k: v for k, v in volume.metadata.items() if k.startswith("source_")}
    for strategy, mask in preview.masks.items():
        vol = Volume(
            mask.astype(np.uint8), preview.mask_scale, preview.mask_translate, maps.direction, dict(meta)
        )
        written += write_volume(vol, out / f"mask_{strategy}.nii.gz", label_names={1: "masked"})
    dropped = Volume(
        preview.teacher_dropped.astype(np.uint8),
        preview.mask_scale,
        preview.mask_translate,
        maps.direction,
        dict(meta),
    )
    written += write_volume(
        dropped, out / "teacher_dropped.nii.gz", label_names={1: "not seen by the noisy teacher"}
    )
    crop = Volume(preview.image, preview.image_scale, preview.image_translate, maps.direction, dict(meta))
    written += write_volume(crop, out / "crop_model_input.nii.gz")
    figure = out / "mask_previews.png"
    save_preview_figure(
        preview, figure, title=f"{pretrained.method} ({pretrained.which}), step {pretrained.step}"
    )
    written.append(str(figure))

    report = {
        "checkpoint": pretrained.source,
        "which": pretrained.which,
        "method": pretrained.method,
        "step": pretrained.step,
        "image": str(args.image),
        "whole_volume": maps.diversity,
        "crop": {k: v for k, v in preview.diversity.items()},
        "crop_start_model_voxels": list(preview.start),
        "mask_ratio": args.ratio,
        "masked_cells": {k: int(v.sum()) for k, v in preview.masks.items()},
        "trains_class_attention": pretrained.trains_class_attention,
    }
    (out / "head_diversity.json").write_text(json.dumps(report, indent=2) + "\n")
    written.append(str(out / "head_diversity.json"))
    say(
        f"head diversity (1 - mean pairwise correlation of the heads' maps; 0 = alike, 1 = unrelated): whole volume "
        f"{maps.diversity['diversity_mean_over_windows']:.4f}, crop {preview.diversity['diversity']:.4f}; "
        f"mean head entropy (1 = uniform) {preview.diversity['entropy_mean']:.4f}"
    )
    say(f"wrote {len(written)} files to {out}")
    return 0
