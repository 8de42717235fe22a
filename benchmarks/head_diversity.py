"""Does attention masking make the class-attention heads alike, and does a noisy teacher keep them apart?

DAGMaN's central claim (Jiang et al., MIDL 2025). Three arms pretrain the same tiny Swin on the real CT of
``../shared/data/example_ct.nii.gz`` with everything equal but the masks and the teacher:

* ``dagman``: attention-high masks chosen by a noisy teacher (input dropout 0.2);
* ``attmask``: attention-high masks chosen by a clean teacher;
* ``smit``: random masks, clean teacher.

Protocol (``--recipe one-ratio``, the default): one mask ratio for all arms (0.6, every image masked, no ratio
jitter), so only what the claim is about differs; ``--recipe presets`` runs each method's own recipe instead
(AttMask's 0.3 +- 0.2 with half the images masked, SMIT's 0.7). Preset tiny, 3D, ROI 64, 2 mm, batch 1, ``--steps``
(default 300) steps, ``--seeds`` (default 0 1 2). Every ``--probe-every`` steps the run measures the clean
teacher's and the student's heads on its fixed probe crops (`core.probes`): centred head diversity
(1 - mean pairwise correlation), Jensen-Shannon divergence between heads and head entropy.

    python benchmarks/head_diversity.py                    # 9 runs, about 45 minutes on 2 idle cores
    python benchmarks/head_diversity.py --steps 60 --seeds 0 --jobs 1   # a quick look

Runs go to ``--work`` (a finished run there is reused). Prints a table (final figures, mean +- std over seeds)
and writes ``--json`` (default benchmarks/results/head_diversity.json) and ``--plot`` (default
docs/images/head_diversity.png).
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
ARMS = ("dagman", "attmask", "smit")
CURVES = (
    "probe_teacher_head_diversity",
    "probe_student_head_diversity",
    "probe_teacher_head_js",
    "probe_teacher_entropy_mean",
)


def shared_data() -> Path:
    return Path(os.environ.get("DAGMAN_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_arm(arm: str, seed: int, args: dict[str, Any]) -> dict[str, Any]:
    """Pretrain one arm (or reuse a finished run) and return its probe curves."""
    import torch

    from napari_dagman.core.checkpoint import RunFolder
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    torch.set_num_threads(args["threads"])
    out = Path(args["work"]) / args["recipe"] / f"{arm}_seed{seed}"
    run = RunFolder(out)
    info = run.read_run_info() if out.is_dir() else {}
    started = time.perf_counter()
    if not (info.get("status") == "completed" and info.get("steps_done") == args["steps"]):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        recipe = (
            {"mask_ratio": 0.6, "masking_prob": 1.0, "mask_ratio_jitter": 0.0}
            if args["recipe"] == "one-ratio"
            else {}
        )
        config = PretrainConfig(
            images=[str(shared_data() / "example_ct.nii.gz")],
            out=str(out),
            method=arm,
            preset="tiny",
            dims=3,
            roi=64,
            spacing=2.0,
            steps=args["steps"],
            batch_size=1,
            seed=seed,
            preview_every=0,
            probe_every=args["probe_every"],
            checkpoint_every=0,
            save_every=max(10, args["steps"] // 5),
            threads=args["threads"],
            **recipe,
        )
        consume(run_pretraining(config))
    rows = run.read_metrics()
    curves = {key: [(r["step"], r[key]) for r in rows if key in r] for key in CURVES}
    overlap = [r["mask_dropped_overlap"] for r in rows if "mask_dropped_overlap" in r]
    warm = int(json.loads((out / "config.json").read_text()).get("mask_warmup_steps") or 0)
    after = [r["mask_dropped_overlap"] for r in rows if "mask_dropped_overlap" in r and r["step"] > warm]
    return {
        "arm": arm,
        "seed": seed,
        "run": str(out),
        "seconds": time.perf_counter() - started,
        "curves": curves,
        "mask_ratio": json.loads((out / "config.json").read_text())["mask_ratio"],
        "mask_dropped_overlap_after_warmup": float(np.mean(after)) if after else None,
        "mask_dropped_overlap_all": float(np.mean(overlap)) if overlap else None,
        "final_loss": rows[-1]["loss"] if rows else None,
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        arm_out: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for key in CURVES:
            finals = [r["curves"][key][-1][1] for r in runs if r["curves"][key]]
            if finals:
                arm_out[key] = {"mean": float(np.mean(finals)), "std": float(np.std(finals)), "values": finals}
        out[arm] = arm_out
    return out


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"dagman": "#d62728", "attmask": "#1f77b4", "smit": "#7f7f7f"}
    panels = (
        ("probe_teacher_head_diversity", "teacher head diversity\n(1 - mean pairwise correlation)"),
        ("probe_student_head_diversity", "student head diversity"),
        ("probe_teacher_head_js", "teacher heads: mean JS divergence (bits)"),
        ("probe_teacher_entropy_mean", "teacher head entropy (1 = uniform)"),
    )
    fig = Figure(figsize=(13, 3.4), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for arm in ARMS:
            runs = [r for r in results if r["arm"] == arm and r["curves"][key]]
            for j, r in enumerate(runs):
                steps, values = zip(*r["curves"][key], strict=True)
                ax.plot(steps, values, color=colours[arm], alpha=0.8, lw=1.2, label=arm if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--recipe", choices=("one-ratio", "presets"), default="one-ratio")
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with --threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "head_diversity"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "head_diversity.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "images" / "head_diversity.png"))
    args = parser.parse_args()
    settings = {
        "steps": args.steps,
        "recipe": args.recipe,
        "probe_every": args.probe_every,
        "threads": args.threads,
        "work": args.work,
    }
    started = time.perf_counter()
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_arm, arm, seed, settings) for arm, seed in jobs]
        results = [f.result() for f in futures]
    summary = summarise(results)
    print(f"{'arm':8s} " + " ".join(f"{k.replace('probe_', ''):>28s}" for k in CURVES))
    for arm, s in summary.items():
        cells = [f"{s[k]['mean']:.3f} +- {s[k]['std']:.3f}" if k in s else "-" for k in CURVES]
        print(f"{arm:8s} " + " ".join(f"{c:>28s}" for c in cells))
    for r in results:
        if r["mask_dropped_overlap_after_warmup"] is not None:
            print(
                f"{r['arm']} seed {r['seed']}: mask_dropped_overlap after the warm-up "
                f"{r['mask_dropped_overlap_after_warmup']:.3f} (mask ratio {r['mask_ratio']})"
            )
    wall = time.perf_counter() - started
    print(f"wall time {wall / 60:.1f} min")
    report = {
        "settings": {**settings, "seeds": args.seeds, "arms": args.arms, "preset": "tiny", "roi": 64},
        "summary": summary,
        "runs": results,
        "wall_seconds": wall,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    recipe = "one mask ratio (0.6) for every arm" if args.recipe == "one-ratio" else "each method's own recipe"
    plot(
        results,
        Path(args.plot),
        f"Probe head diversity, tiny 3D Swin on example_ct, {args.steps} steps, seeds {args.seeds}, {recipe}",
    )
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
