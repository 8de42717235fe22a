"""``napari-dagman attention``: attention maps of a volume, mask previews of a crop, head-diversity figures."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from napari_dagman.cli.common import drive_result, read_input, say
from napari_dagman.core.config import AttentionConfig

if TYPE_CHECKING:
    from napari_dagman.core.volume import Volume

EXAMPLES = """examples:
  napari-dagman attention ct.nii.gz --checkpoint runs/dagman --out attention/
  napari-dagman attention dicom_folder/ --checkpoint runs/dagman --out att/ --which student --on-input-grid
  napari-dagman attention ct.nii.gz --checkpoint runs/dagman --out att/ --center -20 -150 30 --ratio 0.6
  napari-dagman attention ct.nii.gz --checkpoint runs/dagman --out att/ --subtoken 2 --smooth --labels seg.nii.gz
  napari-dagman attention ct.nii.gz --checkpoint runs/dagman --compare runs/attmask --out att_vs/
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "attention",
        help="attention maps, mask previews and head diversity of a pretrained encoder",
        description="Write the semantic class attention of a pretraining run over a whole volume (sliding "
        "window; per head and mean, NIfTI aligned with the image in physical space), the mask the run itself "
        "draws for one crop (every strategy with --strategies all) and the cells its noisy teacher dropped (NIfTI + "
        "PNG), head-diversity figures and per-head sanity checks (JSON).",
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
    from napari_dagman.core.attention.job import attention_job, compare_job, write_attention
    from napari_dagman.core.io import check_output_folder, resample_like, write_volume

    config = AttentionConfig.from_args(args, config_file=args.config_file, checkpoint=args.checkpoint)
    out = Path(args.out)
    check_output_folder(out)  # before the run is loaded and the maps computed, not after
    volume = read_input(args.image)
    check_center(volume, config.center)
    labels = read_input(config.labels) if config.labels else None
    if (
        config.compare
    ):  # two runs: the same CT, crop and seed; the second in out/compare, the difference beside
        comparison = drive_result(
            compare_job(config, volume, labels=labels), desc="attention", quiet=args.quiet
        )
        result = comparison.first
        written = write_attention(comparison.second, volume, out / "compare", figure=True)
        if comparison.difference is not None:
            written += write_volume(
                comparison.difference.volumes()["mean"], out / "attention_difference_mean.nii.gz"
            )
        report_two(comparison)
    else:
        result = drive_result(
            attention_job(config, volume, labels=labels), desc="attention", quiet=args.quiet
        )
        written = []
    written += write_attention(result, volume, out, figure=True)
    if config.on_input_grid and result.maps is not None:
        mean = resample_like(result.maps.volumes()["mean"], volume, is_label=False)
        written += write_volume(mean, out / "attention_mean_on_input.nii.gz")
    if result.model.get("trains_class_attention", True):
        d, crop = result.diversity, result.preview.diversity
        scopes = f"crop {crop['diversity']:.4f}"
        if result.scope != "crop":  # the crop's figure is the scope's own when the scope is the crop
            scopes = f"{result.scope} {d['diversity']:.4f}, " + scopes
        say(
            f"head diversity (1 - mean pairwise correlation of the heads' maps; 0 = alike, 1 = unrelated): "
            f"{scopes}; mean head entropy (1 = uniform) {crop['entropy_mean']:.4f}"
        )
    if result.stats is not None:
        say_stats(result.stats)
    if result.preview is not None and result.preview.recipe:
        say(f"mask preview: the run's own recipe ({result.preview.recipe})")
    say(f"wrote {len(written)} files to {out}")
    return 0


def say_stats(stats: dict) -> None:
    """Each head's verdict (flat or not, entropy, peak) and one sentence per check with its figures."""
    for h, v in stats["heads"].items():
        say(
            f"head {h}: {'flat' if v['flat'] else 'not flat'} (normalised entropy {v['normalised_entropy']:.4f}, "
            f"peak {v['peak_x_uniform']:.2f} x uniform)"
        )
    m = stats["mean"]
    say(
        f"mean map: {'flat' if m['flat'] else 'not flat'} (normalised entropy {m['normalised_entropy']:.4f}, peak {m['peak_x_uniform']:.2f} x uniform)"
    )
    for sentence in stats["sentences"]:
        say(f"{sentence['check']}: {sentence['text']} ({sentence['figures']})")
    if "comparison" in stats:
        c = stats["comparison"]
        say(
            f"the two runs' mean maps: correlation {c['correlation']:.3f}, JS divergence {c['js_divergence']:.5f} bits"
        )


def report_two(comparison) -> None:
    """One line per run: method, head diversity of the maps shown, and the run's last probe figure."""
    for label, result in (("first", comparison.first), ("second", comparison.second)):
        m, probe = result.model, result.model.get("probe", {})
        shown = f"{result.diversity['diversity']:.3f}" if m.get("trains_class_attention", True) else "n/a"
        logged = probe.get("head_diversity")
        say(
            f"{label}: {m.get('method')} step {m.get('step')}: head diversity of these maps {shown}"
            + (
                f"; on its probe crops at step {probe.get('step')}: {logged:.3f}"
                if logged is not None
                else ""
            )
        )


def check_center(volume: Volume, center: Sequence[float]) -> None:
    """Refuse a ``--center`` outside the image: its crop would be moved inside without a word."""
    from napari_dagman.core.errors import DagmanInputError

    if center and not volume.contains(center):
        shown = " ".join(f"{c:g}" for c in center)
        raise DagmanInputError(
            f"--center {shown} (z y x, mm) lies outside the image, which spans {volume.describe_extent()} "
            "(physical LPS millimetres, as napari shows them)"
        )
