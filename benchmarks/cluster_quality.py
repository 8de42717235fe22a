"""Do organs separate better in a DAGMaN encoder's features than in the controls? The acceptance experiment.

On the real CT of ``../shared/data`` (``example_ct.nii.gz`` with ``example_seg_fast_force_split.nii.gz``, a
TotalSegmentator "fast" prediction, not manual ground truth), every feature source describes exactly the same
patches, and the same metrics are computed (`core.embeddings.quality_metrics`):

* ``dagman``: the teacher encoder of a DAGMaN run (pretrained here if ``--run`` is not given);
* ``random-init``: an untrained encoder of the same architecture (several initialisation seeds);
* ``intensity``: the histogram (32 bins) of each patch's model input, i.e. its HU in the run's window;
* ``position``: the patch-centre coordinates (organ identity is strongly tied to position in one body), scored
  with the cosine distance like everything else and, as a stronger control, with the Euclidean one.

Patches: 16 voxels (48 mm) every 8 voxels at the run's 3 mm spacing (the shared data README's 32^3 at 1.5 mm,
stride 16); evaluated patches: majority organ covering >= 50 % of the patch, organs with >= 5 such patches.
Metrics: k-means (k = number of organs) NMI and ARI, silhouette of the organs (cosine), k-NN (k = 5, cosine)
accuracy and balanced accuracy in 5-fold cross-validation over axial slabs, training patches >= 48 mm (one
patch) from the tested slab so none shares a voxel with a test patch; the majority-class baseline of the same
folds. One volume: differences within the seed spread are noise.

Pretraining budget when no run is given (per seed): DAGMaN defaults, preset tiny, ROI 32 (96 mm), 3 mm
spacing, batch 4, ``--steps`` (default 300) steps on the CPU: minutes to an hour on a shared 2-core machine.

    python benchmarks/cluster_quality.py                                  # pretrain seed 0, evaluate
    python benchmarks/cluster_quality.py --run runs/dagman --stages 2 3 4 # an existing run
    python benchmarks/cluster_quality.py --pretrain-seeds 0 1 2           # three DAGMaN runs

Runs and embeddings are kept in ``--work`` (a finished run there is reused; embeddings are cached), so a rerun
only recomputes what changed. Results: a table on stdout and ``--json`` (default
benchmarks/results/cluster_quality.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = ("nmi", "ari", "silhouette", "knn_accuracy", "knn_balanced_accuracy", "knn_majority_baseline")


def shared_data() -> Path:
    return Path(os.environ.get("DAGMAN_SHARED_DATA", REPO.parent / "shared" / "data"))


def pretrain(out: Path, image: Path, seed: int, steps: int) -> Path:
    """A DAGMaN run with the stated budget; a finished run already in ``out`` is reused."""
    from napari_dagman.core.checkpoint import RunFolder
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    info = RunFolder(out).read_run_info() if out.is_dir() else {}
    if info.get("status") == "completed" and info.get("steps_done") == steps:
        print(f"reusing {out} ({steps} steps)")
        return out
    config = PretrainConfig(
        images=[str(image)],
        out=str(out),
        method="dagman",
        preset="tiny",
        roi=32,
        spacing=3.0,
        steps=steps,
        batch_size=4,
        seed=seed,
        preview_every=0,
        checkpoint_every=0,
    )
    start = time.perf_counter()
    print(f"pretraining DAGMaN seed {seed}: {steps} steps, tiny, ROI 32, 3 mm, batch 4 -> {out}")
    consume(run_pretraining(config, resume=(out / "resume.safetensors").is_file()))
    print(f"  done in {(time.perf_counter() - start) / 60:.1f} min")
    return out


def returned(generator: Any) -> Any:
    """Run a core job generator to its end and return what it returns."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def evaluate(emb: Any, config: Any, distance: str) -> dict[str, Any]:
    from napari_dagman.core.embeddings import embedding_quality

    quality = embedding_quality(
        emb,
        min_purity=config.min_purity,
        min_patches=config.min_patches,
        knn=config.knn,
        slabs=config.slabs,
        gap_mm=config.gap_mm,
        distance=distance,
        seed=config.seed,
    )
    return quality.metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", nargs="+", help="DAGMaN run folder(s); default: pretrain them here")
    parser.add_argument("--pretrain-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per run")
    parser.add_argument("--random-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3], help="encoder stages to compare")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--work", default="/tmp/napari-dagman-cluster-quality")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "cluster_quality.json"))
    args = parser.parse_args()

    from napari_dagman.core.config import EmbedConfig
    from napari_dagman.core.embeddings import EmbeddingCache, embed_volume, load_encoder
    from napari_dagman.core.io import read_volume

    data = shared_data()
    image_path, labels_path = data / "example_ct.nii.gz", data / "example_seg_fast_force_split.nii.gz"
    work = Path(args.work)
    runs = (
        [Path(r) for r in args.run]
        if args.run
        else [pretrain(work / f"dagman_seed{s}", image_path, s, args.steps) for s in args.pretrain_seeds]
    )
    image, labels = read_volume(image_path), read_volume(labels_path)
    cache = EmbeddingCache(work / "cache")
    base = EmbedConfig(patch=args.patch, stride=args.stride, cache_dir=str(work / "cache"))
    rows: list[dict[str, Any]] = []

    def add(
        name: str, seed: int | None, stage: int | None, pretrained: Any, config: Any, distance: str = "cosine"
    ):
        start = time.perf_counter()
        emb = returned(embed_volume(image, pretrained, config, labels=labels, cache=cache))
        metrics = evaluate(emb, config, distance)
        row = {
            "features": name,
            "seed": seed,
            "stage": stage,
            "distance": distance,
            "dims": emb.features.shape[1],
        }
        row.update({k: metrics.get(k) for k in METRICS})
        row.update(
            evaluated=metrics["evaluated_patches"],
            organs=len(metrics["organs"]),
            patches=len(emb),
            seconds=time.perf_counter() - start,
        )
        rows.append(row)
        print(
            f"  {name:<12} seed {seed!s:<4} stage {stage!s:<4} {distance:<9} "
            + "  ".join(f"{k} {row[k]:.3f}" for k in METRICS if row[k] is not None)
        )
        return metrics

    load_before = os.getloadavg()[0]
    first = None
    for run in runs:
        pretrained = load_encoder(base.replace(checkpoint=str(run)))
        first = first or pretrained
        seed = int(pretrained.run_config.get("seed", 0))
        for stage in args.stages:
            metrics = add("dagman", seed, stage, pretrained, base.replace(stage=stage))
    for seed in args.random_seeds:
        for stage in args.stages:
            add(
                "random-init",
                seed,
                stage,
                first,
                base.replace(features="random-init", seed=seed, stage=stage),
            )
    add("intensity", None, None, first, base.replace(features="intensity"))
    add("position", None, None, first, base.replace(features="position"))
    add("position", None, None, first, base.replace(features="position"), distance="euclidean")

    # mean +- std over seeds for each (features, stage, distance)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["features"], row["stage"], row["distance"]), []).append(row)
    summary = []
    print()
    print(f"{'features':<12} {'stage':>5} {'dist':>9} {'n':>2} " + " ".join(f"{k[:14]:>14}" for k in METRICS))
    for (name, stage, distance), group in groups.items():
        entry: dict[str, Any] = {"features": name, "stage": stage, "distance": distance, "n": len(group)}
        cells = []
        for key in METRICS:
            values = np.array([g[key] for g in group if g[key] is not None], float)
            entry[key] = {"mean": float(values.mean()), "std": float(values.std())} if len(values) else None
            cells.append(
                f"{values.mean():6.3f}+-{values.std():5.3f}" if len(values) > 1 else f"{values.mean():14.3f}"
            )
        summary.append(entry)
        print(f"{name:<12} {stage!s:>5} {distance:>9} {len(group):>2} " + " ".join(f"{c:>14}" for c in cells))
    print(
        f"\nevaluated {metrics['evaluated_patches']} patches of {len(metrics['organs'])} organs: {metrics['organs']}"
    )

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "image": str(image_path),
                "labels": str(labels_path),
                "runs": [str(r) for r in runs],
                "pretraining": {
                    "method": "dagman",
                    "preset": "tiny",
                    "roi": 32,
                    "spacing_mm": 3.0,
                    "batch_size": 4,
                    "steps": args.steps,
                    "seeds": args.pretrain_seeds,
                }
                if not args.run
                else "given",
                "patches": {"patch_voxels": args.patch, "stride_voxels": args.stride, "sampling": "grid"},
                "metric_settings": metrics["settings"],
                "evaluated_organs": metrics["organs"],
                "load_average": [load_before, os.getloadavg()[0]],
                "summary": summary,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
