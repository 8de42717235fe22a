"""All seven methods at one budget on real CT, against controls: what each encoder learned about the organs.

Arms: dagman, attmask, smit, simmim, mim, miram, cass (the same tiny 3D Swin, ROI 64 at 3 mm, ``--steps`` steps of
batch 1, the same seeds), and three controls on exactly the same patches: ``random-init`` (an untrained encoder of
the same preset), ``intensity`` (a histogram of each patch's HU in the model window) and ``position`` (the patch
centre in mm: organ identity is tied to position in one body). One mask ratio for every masked arm (0.6, every
image masked, no jitter: only the methods differ); MiM keeps its own per-level ratios (0.5 / 0.6 / 0.5) with 2
and 2 samples per level (the paper's 4 and 4 would cost 21 encoder passes a step; said in docs/results.md); CASS
pairs the Swin with a ResNet-18 of width 0.25.

Data (../shared/data, read its README): ``example_ct.nii.gz`` for pretraining, with the fine-tuning validation
slab and its gaps cut out (the encoders never see the validation voxels, not even unlabelled);
``example_seg_fast_force_split.nii.gz`` (TotalSegmentator predictions) only for evaluation; the DICOM series
``example_ct_dicom/`` with ``example_seg_dicom.nii.gz`` as a second, different scan (another patient, contrast).

Metrics on frozen features of each arm's preferred published encoder (stage 3, patches of 16 voxels every 8 at
3 mm on the training CT; 8 every 4 on the thin DICOM series), `core.embeddings.quality_metrics`: k-means NMI and
ARI, silhouette, k-NN and a linear probe (logistic regression) of organ identity, both cross-validated over axial
slabs with a gap of one patch; the probe head diversity over training (`core.probes`); fine-tuning Dice at a small
fixed budget (tiny SwinUNETR, ``--finetune-steps``) from each arm's encoder and from scratch (the random-init arm),
on the same slab split as benchmarks/finetune_compare.py; wall time of each stage.

    python benchmarks/compare_methods.py --quick        # one seed, 40 + 20 steps: a check, ~10 minutes
    python benchmarks/compare_methods.py                # 3 seeds, 300 + 100 steps: hours on 2 CPU cores
    python benchmarks/compare_methods.py --device cuda --jobs 1 --threads 8   # on a GPU

Finished runs in ``--work`` are reused. Writes ``--json`` (default benchmarks/results/compare_methods.json), a
markdown table (``.md`` beside it) and plots under docs/images/.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dagman", "attmask", "smit", "simmim", "mim", "miram", "cass")
CONTROLS = ("random-init", "intensity", "position")
ORGANS = (5, 1, 2, 3, 21, 20)  # liver, spleen, kidneys, urinary bladder, colon (as finetune_compare)
ONE_RATIO = {"mask_ratio": 0.6, "masking_prob": 1.0, "mask_ratio_jitter": 0.0}
ARM_OPTIONS: dict[str, dict[str, Any]] = {
    "dagman": ONE_RATIO,
    "attmask": ONE_RATIO,
    "smit": ONE_RATIO,
    "simmim": ONE_RATIO,
    "miram": ONE_RATIO,
    "mim": {"samples_mid": 2, "samples_fine": 2},
    "cass": {"cnn_depth": 18, "cnn_width": 0.25},
}
FIGURES = (
    ("ct", "knn_balanced_accuracy"),
    ("ct", "linear_balanced_accuracy"),
    ("ct", "nmi"),
    ("ct", "ari"),
    ("ct", "silhouette"),
    # the DICOM series is 20 slices (40 mm): too thin for slab cross-validation with a gap, so only the
    # clustering agreement is scored there
    ("dicom", "nmi"),
    ("dicom", "ari"),
    ("finetune", "mean_dice_last"),
    ("probe", "teacher_or_student_diversity"),
)


def shared_data() -> Path:
    return Path(os.environ.get("DAGMAN_SHARED_DATA", REPO.parent / "shared" / "data"))


def training_part(settings: dict[str, Any]) -> list[Any]:
    """The CT without the fine-tuning validation slab and its gaps, as pieces (the pretraining data)."""
    from napari_dagman.core.io import read_volume
    from napari_dagman.core.segmentation import slab_ranges

    ct = read_volume(shared_data() / "example_ct.nii.gz")
    gap = max(1, int(round(settings["val_gap_mm"] / ct.spacing[0])))
    ranges, _ = slab_ranges(ct.shape[0], settings["val_fraction"], settings["val_position"], gap)
    from napari_dagman.core.volume import Volume

    pieces = []
    for z0, z1 in ranges:
        origin = tuple(float(o) for o in ct.index_to_physical((z0, 0, 0)))
        meta = {**ct.metadata, "name": f"example_ct z {z0}-{z1}"}
        pieces.append(Volume(ct.array[z0:z1].copy(), ct.spacing, origin, ct.direction.copy(), meta))
    return pieces


def pretrain(arm: str, seed: int, settings: dict[str, Any]) -> tuple[Path, float]:
    """A finished run of ``arm`` for ``seed`` (reused when one is in the work folder); (folder, seconds)."""
    from napari_dagman.core.checkpoint import RunFolder
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    out = Path(settings["work"]) / "runs" / f"{arm}_seed{seed}"
    info = RunFolder(out).read_run_info() if out.is_dir() else {}
    if info.get("status") == "completed" and info.get("steps_done") == settings["steps"]:
        return out, float(info.get("wall_seconds", 0.0))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    config = PretrainConfig.from_dict(
        {
            "out": str(out),
            "method": arm,
            "preset": "tiny",
            "dims": 3,
            "roi": 64,
            "spacing": 3.0,
            "steps": settings["steps"],
            "batch_size": 1,
            "seed": seed,
            "preview_every": 0,
            "probe_every": max(5, settings["steps"] // 12),
            "checkpoint_every": 0,
            "save_every": max(10, settings["steps"] // 5),
            "threads": settings["threads"],
            "device": settings["device"],
            **ARM_OPTIONS[arm],
        }
    )
    t0 = time.perf_counter()
    consume(run_pretraining(config, training_part(settings)))
    seconds = time.perf_counter() - t0
    run = RunFolder(out)
    run.write_run_info({**run.read_run_info(), "wall_seconds": seconds})
    return out, seconds


def evaluate(features: str, run: Path | None, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Organ metrics of one feature source on the training CT and on the DICOM series."""
    from napari_dagman.core.config import EmbedConfig
    from napari_dagman.core.embeddings import run_embedding
    from napari_dagman.core.io import read_volume

    data = shared_data()
    scans = {
        "ct": (data / "example_ct.nii.gz", data / "example_seg_fast_force_split.nii.gz", 16, 8),
        "dicom": (data / "example_ct_dicom", data / "example_seg_dicom.nii.gz", 8, 4),
    }
    out: dict[str, Any] = {}
    for name, (image, labels, patch, stride) in scans.items():
        config = EmbedConfig(
            checkpoint=str(run or settings["any_run"]),
            features=features,
            stage=3,
            patch=patch,
            stride=stride,
            sampling="both",
            method="pca",  # the projection is for display only; the metrics use the features
            clustering="none",
            resample_labels=True,
            seed=seed,
            device=settings["device"],
            cache=False,
        )
        t0 = time.perf_counter()
        result = finish(run_embedding(config, read_volume(image), read_volume(labels)))
        metrics = dict(result.metrics or {})
        metrics.pop("settings", None)
        out[name] = {**metrics, "seconds": time.perf_counter() - t0}
    return out


def finetune(run: Path | None, seed: int, settings: dict[str, Any], name: str) -> dict[str, Any]:
    """Dice per organ after a small fixed fine-tuning budget from ``run``'s encoder (None: from scratch)."""
    from napari_dagman.core.config import FinetuneConfig
    from napari_dagman.core.segmentation import run_finetuning

    data = shared_data()
    config = FinetuneConfig(
        images=[str(data / "example_ct.nii.gz")],
        segmentations=[str(data / "example_seg_fast_force_split.nii.gz")],
        out=str(Path(settings["work"]) / "finetune" / f"{name}_seed{seed}"),
        organs=list(ORGANS),
        init=str(run) if run else None,
        preset="tiny" if run is None else None,
        roi=64,
        spacing=3.0,
        hu_min=-175.0,
        hu_max=250.0,
        steps=settings["finetune_steps"],
        batch_size=2,
        lr=1e-3,
        val_split="slab",
        val_fraction=settings["val_fraction"],
        val_position=settings["val_position"],
        val_gap_mm=settings["val_gap_mm"],
        val_every=max(5, settings["finetune_steps"] // 4),
        seed=seed,
        threads=settings["threads"],
        device=settings["device"],
    )
    import shutil

    shutil.rmtree(config.out, ignore_errors=True)
    t0 = time.perf_counter()
    finished = finish(run_finetuning(config))
    last = finished.summary.get("last_validation", {}) or {}
    return {
        "dice_last": last.get("dice", {}),
        "mean_dice_last": last.get("mean_dice"),
        "best_mean_dice": finished.summary.get("best_mean_dice"),
        "seconds": time.perf_counter() - t0,
    }


def finish(generator: Any) -> Any:
    try:
        while True:
            next(generator)
    except StopIteration as stop:
        return stop.value


def probe_curve(run: Path) -> list[tuple[int, float]]:
    """(step, head diversity) of the run's probes: the teacher's when it has one, else the trained encoder's."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for key in ("probe_teacher_head_diversity", "probe_transformer_head_diversity", "probe_student_head_diversity"):
        curve = [(r["step"], r[key]) for r in rows if key in r]
        if curve:
            return curve
    return []


def arm_job(arm: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Pretrain (methods), evaluate the frozen features, fine-tune; everything one arm and seed needs."""
    import torch

    torch.set_num_threads(settings["threads"])
    result: dict[str, Any] = {"arm": arm, "seed": seed}
    run = None
    if arm in METHODS:
        run, result["pretrain_seconds"] = pretrain(arm, seed, settings)
        result["run"] = str(run)
        curve = probe_curve(run)
        result["probe"] = {"curve": curve, "teacher_or_student_diversity": curve[-1][1] if curve else None}
        result.update(evaluate("encoder", run, seed, settings))
    else:
        result.update(evaluate(arm, None, seed, settings))
    if arm in METHODS or arm == "random-init":
        result["finetune"] = finetune(run, seed, settings, arm)
    return result


def summarise(results: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        summary: dict[str, Any] = {}
        for section, key in FIGURES:
            values = [r.get(section, {}).get(key) for r in rows]
            values = [float(v) for v in values if v is not None and np.isfinite(v)]
            if values:
                summary[f"{section}.{key}"] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                    "min": float(np.min(values)),
                    "max": float(np.max(values)),
                    "values": values,
                }
        seconds = [r.get("pretrain_seconds") for r in rows if r.get("pretrain_seconds")]
        if seconds:
            summary["pretrain_seconds"] = float(np.mean(seconds))
        out[arm] = summary
    return out


def separated(summary: dict[str, Any], a: str, b: str, figure: str) -> str | None:
    """'above' / 'below' when every seed of ``a`` lies above / below every seed of ``b``; None when they overlap."""
    sa, sb = summary.get(a, {}).get(figure), summary.get(b, {}).get(figure)
    if not sa or not sb:
        return None
    if sa["min"] > sb["max"]:
        return "above"
    if sa["max"] < sb["min"]:
        return "below"
    return None


def markdown(summary: dict[str, Any], arms: list[str], settings: dict[str, Any]) -> str:
    heads = [f"{s} {k.replace('_balanced_accuracy', ' bal. acc.').replace('teacher_or_student_', '')}" for s, k in FIGURES]
    lines = ["| arm | " + " | ".join(heads) + " | pretraining s |", "|---" * (len(FIGURES) + 2) + "|"]
    for arm in arms:
        cells = []
        for section, key in FIGURES:
            s = summary[arm].get(f"{section}.{key}")
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "-")
        sec = summary[arm].get("pretrain_seconds")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {sec:.0f} |" if sec else f"| {arm} | " + " | ".join(cells) + " | - |")
    lines.append("")
    lines.append(
        "Differences that exceed the seed spread (every seed of one arm above every seed of the other; "
        f"{len(settings['seeds'])} seeds):"
    )
    if len(settings["seeds"]) < 2:  # one value per arm: any two differ, and nothing says by how much noise
        lines.append("* not assessed: one seed has no spread (run 3 seeds for this list)")
        return "\n".join(lines) + "\n"
    found = False
    for figure in [f"{s}.{k}" for s, k in FIGURES]:
        for a in arms:
            for b in ("random-init", "dagman"):
                if a == b or b not in arms:
                    continue
                side = separated(summary, a, b, figure)
                if side:
                    found = True
                    lines.append(f"* {figure}: {a} {side} {b}")
    if not found:
        lines.append("* none")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], summary: dict[str, Any], arms: list[str], folder: Path) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    figures = [f for f in FIGURES if f[0] != "probe"]
    fig = Figure(figsize=(3.2 * 4, 2.9 * 2), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (section, key) in enumerate(figures):
        ax = fig.add_subplot(2, 4, i + 1)
        names, means, errs = [], [], []
        for arm in arms:
            s = summary[arm].get(f"{section}.{key}")
            if s:
                names.append(arm)
                means.append(s["mean"])
                errs.append(s["std"])
        colours = ["#d62728" if n == "dagman" else "#7f7f7f" if n in CONTROLS else "#1f77b4" for n in names]
        ax.bar(range(len(names)), means, yerr=errs, color=colours, capsize=2)
        for j, arm in enumerate(names):  # every seed as a dot: the spread is visible, not only its std
            values = summary[arm][f"{section}.{key}"]["values"]
            ax.plot([j] * len(values), values, "k.", ms=3)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_title(f"{section}: {key}", fontsize=8)
    bars = folder / "compare_methods.png"
    fig.savefig(str(bars), dpi=110)
    fig = Figure(figsize=(6, 3.4), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        curve = r.get("probe", {}).get("curve") or []
        if curve:
            steps, values = zip(*curve, strict=True)
            ax.plot(steps, values, label=f"{r['arm']} {r['seed']}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("probe head diversity")
    ax.legend(fontsize=6, ncol=2)
    curves = folder / "compare_methods_diversity.png"
    fig.savefig(str(curves), dpi=110)
    return [str(bars), str(curves)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 40 pretraining and 20 fine-tuning steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--arms", nargs="+", default=[*METHODS, *CONTROLS], choices=[*METHODS, *CONTROLS])
    parser.add_argument("--jobs", type=int, default=2, help="arms run in parallel, each with --threads")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--val-position", type=float, default=0.72)
    parser.add_argument("--val-gap-mm", type=float, default=15.0)
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "compare_methods"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "compare_methods.json"))
    parser.add_argument("--plots", default=str(REPO / "docs" / "images"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.finetune_steps = [0], 40, 20
        args.work = str(Path(args.work).with_name(Path(args.work).name + "_quick"))
        args.json = str(Path(args.json).with_name("compare_methods_quick.json"))
    settings = {
        "steps": args.steps,
        "finetune_steps": args.finetune_steps,
        "threads": args.threads,
        "device": args.device,
        "work": args.work,
        "seeds": args.seeds,
        "val_fraction": args.val_fraction,
        "val_position": args.val_position,
        "val_gap_mm": args.val_gap_mm,
    }
    started = time.perf_counter()
    methods = [a for a in args.arms if a in METHODS]
    controls = [a for a in args.arms if a in CONTROLS]
    jobs = [(arm, seed) for seed in args.seeds for arm in methods]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(arm_job, *zip(*jobs, strict=True), [settings] * len(jobs))) if jobs else []
        if controls:  # the controls need a run for the architecture and the input convention
            settings["any_run"] = results[0]["run"] if results else pretrain("dagman", args.seeds[0], settings)[0]
            cjobs = [(arm, seed) for seed in args.seeds for arm in controls]
            results += list(pool.map(arm_job, *zip(*cjobs, strict=True), [settings] * len(cjobs)))
    arms = [*methods, *controls]
    summary = summarise(results, arms)
    table = markdown(summary, arms, settings)
    print(table)
    wall = time.perf_counter() - started
    print(f"wall time {wall / 60:.1f} min")
    plots = plot(results, summary, arms, Path(args.plots)) if len(arms) > 1 else []
    report = {
        "settings": {**settings, "arms": arms, "preset": "tiny", "roi": 64, "spacing": 3.0, "arm_options": ARM_OPTIONS},
        "summary": summary,
        "results": results,
        "wall_seconds": wall,
        "machine": {"cpus": os.cpu_count(), "load_at_end": os.getloadavg()},
        "plots": plots,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    Path(args.json).with_suffix(".md").write_text(table)
    print(f"wrote {args.json} and its .md table; plots {plots}")


if __name__ == "__main__":
    main()
