"""``napari-dagman embed``: patch embeddings of a CT, their UMAP/PCA/t-SNE, clusters and (with labels) metrics."""

from __future__ import annotations

import argparse
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from napari_dagman.cli.common import drive, read_input, say
from napari_dagman.core.config import EmbedConfig

EXAMPLES = """examples:
  napari-dagman embed ct.nii.gz --checkpoint runs/dagman --labels seg.nii.gz --out clusters/
  napari-dagman embed ct.nii.gz --checkpoint runs/dagman --patch 32 --stride 16 --method pca --out clusters/
  napari-dagman embed ct.nii.gz --checkpoint runs/dagman --labels seg.nii.gz --features intensity --out ctl/
  napari-dagman embed dicom_folder/ --checkpoint runs/dagman --pooling token --stage 4 --fast --out tokens/

outputs: patches.csv (or .parquet): one row per patch with its centre in physical LPS mm and source voxels,
organ id/name and purity (with --labels), the 2D projection, the cluster, and its role in the k-NN evaluation;
metrics.json (with --labels): NMI, ARI, silhouette, slab-cross-validated k-NN accuracy; scatter.png; config.json.
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "embed",
        help="organ clusters: patch embeddings, UMAP/PCA/t-SNE, clusters and cluster-quality metrics",
        description="Embed every patch of a CT with a pretraining run's encoder (or a control on the same "
        "patches), project to 2D, cluster, and with a label map score how well organs separate.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    p.add_argument("--checkpoint", required=True, help="pretraining run folder (or one of its .safetensors)")
    p.add_argument("--labels", help="label map on the image grid: organ names, purity and metrics")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--colour-by", choices=("organ", "cluster"), help="scatter.png colours (default: organ)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    EmbedConfig.add_arguments(p)
    p.set_defaults(func=run)


def _job(config: EmbedConfig, colour_by: str | None) -> Generator[Any, None, None]:
    """Read, embed, write: the whole command as one event generator (driven with a progress bar)."""
    from napari_dagman.core.embeddings import require_parquet, run_embedding, write_results
    from napari_dagman.core.events import FinishedEvent
    from napari_dagman.core.io import check_output_folder
    from napari_dagman.core.report_figures import write_scatter_png

    if config.table_format == "parquet":
        require_parquet()
    check_output_folder(config.out)  # type: ignore[arg-type]
    volume = read_input(config.image)  # type: ignore[arg-type]
    labels = read_input(config.labels) if config.labels else None
    result = yield from run_embedding(config, volume, labels)
    paths = write_results(result, config.out)  # type: ignore[arg-type]
    by = colour_by or ("organ" if "organ" in result.table.columns else "cluster")
    if by in result.table.columns:
        paths["scatter"] = write_scatter_png(
            result.table, config.method, by, Path(config.out) / "scatter.png"
        )  # type: ignore[arg-type]
    yield FinishedEvent(
        run_dir=str(config.out),
        steps_done=len(result.table),
        total_steps=len(result.table),
        paths=paths,
        summary={"metrics": result.metrics, "patches": len(result.table)},
    )


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.embeddings import metrics_summary

    extra = {"image": args.image, "checkpoint": args.checkpoint, "labels": args.labels, "out": args.out}
    config = EmbedConfig.from_args(args, config_file=args.config_file, **extra)
    finished = drive(_job(config, args.colour_by), desc="embed", quiet=args.quiet)
    say(f"{finished.summary['patches']} patches")
    metrics = finished.summary.get("metrics")
    if metrics is not None:
        say(metrics_summary(metrics))
    say("wrote " + ", ".join(Path(p).name for p in finished.paths.values()) + f" in {finished.run_dir}")
    return 0
