"""One protocol, one command: does self-supervised pretraining learn anything a random network does not have?

Arms (the same tiny 3D Swin, ROI 64 at 3 mm, batch 2, ``--steps`` steps (250), the same views for every method:
the defaults of `PretrainConfig`): dagman, smit and simmim at two seeds each, attmask, mim, miram and cass at one;
every method at its own defaults (mask recipe, teacher noise, objective form), but MiM at 2 middle and 2 fine
samples per region and batch 1 (its 4 and 4 cost 21 encoder passes a sample: 70-90 s a step here). Controls on exactly the same patches:
five random-init encoders (the null distribution; weights seeded 0-4), the intensity histogram and the position.

Data (``../shared/data``): pretraining on ``example_ct.nii.gz`` with a held-out axial slab and ``--gap-mm`` on
each side cut out (the encoders never see those voxels, not even unlabelled); ``--phantoms N`` adds N phantoms of
the project's generator (varied anatomy) to the pretraining data. Evaluation:

* ``slab``: organ identity of the patches centred in the held-out slab (stage-3 features pooled over 16-voxel
  patches every 4 voxels, grid and organ-centred; left and right merged), by a linear probe (logistic regression)
  and k-NN trained on the patches more than ``--gap-mm`` outside the slab; only organs seen in training are scored,
  and how many patches were left out is reported (`core.embeddings.quality_metrics`);
* ``cv``: the same, cross-validated over five axial slabs of the whole CT (secondary: pretraining saw most of it);
* ``dicom``: k-means NMI/ARI against the organs on the DICOM series (another patient, contrast phase);
* ``attention``: the published encoder's class attention on every window of the DICOM series: normalised entropy
  (also over body tokens only), peak, intensity correlation, and the model-randomisation distance against the
  five random-init networks (`core.attention.sanity`);
* ``collapse``: the run's last probe figures (stage-3 token cosine of different crops, the compared outputs'
  cosine) and the global KL over the last tenth of the steps.

A pretrained seed "beats the null" on a figure when it is above every one of the five random inits.

    python benchmarks/pretraining_protocol.py                 # the protocol: about 90 min on 2 CPU cores
    python benchmarks/pretraining_protocol.py --quick         # one seed per method, 40 steps: a check
    python benchmarks/pretraining_protocol.py --device cuda --jobs 1 --threads 8 --steps 3000   # a GPU

Finished runs in ``--work`` are reused. Writes ``--json`` (default benchmarks/results/pretraining_protocol.json),
a markdown table beside it and plots under docs/images/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: arm -> seeds (the issue's protocol: the three headline methods at two seeds, every other method at one)
ARMS: dict[str, tuple[int, ...]] = {
    "dagman": (0, 1),
    "smit": (0, 1),
    "simmim": (0, 1),
    "attmask": (0,),
    "mim": (0,),
    "miram": (0,),
    "cass": (0,),
}
RANDOM_SEEDS = (0, 1, 2, 3, 4)
#: Departures from a method's defaults that the CPU budget forces, said in docs/results.md: MiM's 4 middle and 4 fine
#: samples per region cost 21 encoder passes per sample (70-90 s a step here); 2 and 2 cost 7, at batch 1.
ARM_OVERRIDES: dict[str, dict[str, Any]] = {"mim": {"samples_mid": 2, "samples_fine": 2, "batch_size": 1}}
#: organ figure -> higher is better (the headline figures of the targets first); a seed "beats the null" on one
#: when it is better than every random init
FIGURES: dict[str, bool] = {
    "slab.linear_balanced_accuracy": True,
    "slab.knn_balanced_accuracy": True,
    "dicom.nmi": True,
    "dicom.ari": True,
    "cv.linear_balanced_accuracy": True,
    "cv.knn_balanced_accuracy": True,
}
#: attention figures, reported beside them (random networks' class attention is uniform under CaiT's
#: initialisation, so "better than every random init" would be met by any ripple: the targets judge them instead)
ATTENTION = ("attention.mean_head_normalised_entropy", "attention.body_normalised_entropy", "attention.peak_x_uniform")


def shared_data() -> Path:
    return Path(os.environ.get("DAGMAN_SHARED_DATA", REPO.parent / "shared" / "data"))


# --- data -----------------------------------------------------------------------------------------------------
def split(settings: dict[str, Any]) -> tuple[list[Any], tuple[float, float]]:
    """The pretraining pieces of example_ct (the slab and its gaps cut out) and the slab's z range in mm."""
    from napari_dagman.core.io import read_volume
    from napari_dagman.core.segmentation import slab_ranges
    from napari_dagman.core.volume import Volume

    ct = read_volume(shared_data() / "example_ct.nii.gz")
    gap = max(1, int(math.ceil(settings["gap_mm"] / ct.spacing[0] - 1e-9)))
    ranges, (v0, v1) = slab_ranges(ct.shape[0], settings["slab_fraction"], settings["slab_position"], gap)
    pieces = []
    for z0, z1 in ranges:
        origin = tuple(float(o) for o in ct.index_to_physical((z0, 0, 0)))
        meta = {**ct.metadata, "name": f"example_ct z {z0}-{z1 - 1}"}
        pieces.append(Volume(ct.array[z0:z1].copy(), ct.spacing, origin, ct.direction.copy(), meta))
    z_mm = sorted(float(ct.index_to_physical((k, 0, 0))[0]) for k in (v0, v1 - 1))
    return pieces, (z_mm[0], z_mm[1])


def pretraining_volumes(settings: dict[str, Any]) -> list[Any]:
    pieces, _ = split(settings)
    if settings["phantoms"]:
        from napari_dagman.core.phantom import make_phantom

        pieces += [make_phantom(seed=100 + k)[0] for k in range(settings["phantoms"])]
    return pieces


# --- pretraining ----------------------------------------------------------------------------------------------
def pretrain(arm: str, seed: int, settings: dict[str, Any]) -> tuple[Path, float]:
    """A finished run of ``arm`` for ``seed`` (reused when the work folder holds one); (folder, seconds)."""
    import shutil

    from napari_dagman.core.checkpoint import RunFolder
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    out = Path(settings["work"]) / "runs" / f"{arm}_seed{seed}"
    info = RunFolder(out).read_run_info() if out.is_dir() else {}
    if info.get("status") == "completed" and info.get("steps_done") == settings["steps"]:
        return out, float(info.get("wall_seconds", 0.0))
    shutil.rmtree(out, ignore_errors=True)
    config = PretrainConfig.from_dict(
        {
            "out": str(out),
            "method": arm,
            "preset": "tiny",
            "dims": 3,
            "roi": 64,
            "spacing": 3.0,
            "steps": settings["steps"],
            "batch_size": settings["batch_size"],
            **ARM_OVERRIDES.get(arm, {}),
            "seed": seed,
            "preview_every": 0,
            "probe_every": max(5, settings["steps"] // 12),
            "probe_crops": 8,
            "checkpoint_every": 0,
            "save_every": max(10, settings["steps"] // 5),
            "threads": settings["threads"],
            "device": settings["device"],
        }
    )
    t0 = time.perf_counter()
    consume(run_pretraining(config, pretraining_volumes(settings)))
    seconds = time.perf_counter() - t0
    run = RunFolder(out)
    run.write_run_info({**run.read_run_info(), "wall_seconds": seconds})
    return out, seconds


def collapse_figures(run: Path) -> dict[str, Any]:
    """The run's last probe figures and its global KL over the last tenth of the steps."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out: dict[str, Any] = {}
    probed = [r for r in rows if "probe_token_cosine" in r]
    if probed:
        last = probed[-1]
        out.update({k: last[k] for k in last if k.startswith(("probe_token_cosine", "probe_output_cosine"))})
    tail = rows[-max(1, len(rows) // 10) :]
    kl = [r["global_kl"] for r in tail if "global_kl" in r]
    if kl:
        out["global_kl_end"] = float(np.mean(kl))
    return out


# --- evaluation -----------------------------------------------------------------------------------------------
def finish(generator: Any) -> Any:
    try:
        while True:
            next(generator)
    except StopIteration as stop:
        return stop.value


def organ_figures(features: str, run: Path, init_seed: int | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The slab probe, the cross-validated probe and the DICOM clusters of one feature source (the CT's patches are
    embedded once and scored both ways)."""
    from napari_dagman.core.config import EmbedConfig
    from napari_dagman.core.embeddings import embed_volume, embedding_quality, load_encoder
    from napari_dagman.core.io import read_volume

    data = shared_data()
    scans = {
        "ct": (read_volume(data / "example_ct.nii.gz"), read_volume(data / "example_seg_fast_force_split.nii.gz")),
        # the DICOM series is 40 mm thick: too thin for slabs, so only the clusters are scored there
        "dicom": (read_volume(data / "example_ct_dicom"), read_volume(data / "example_seg_dicom.nii.gz")),
    }
    common = {
        "checkpoint": str(run),
        "features": features,
        "init_seed": init_seed,
        "stage": 3,
        "resample_labels": True,
        "merge_sides": True,
        "seed": 0,  # the same patches, k-means and probe seeds for every feature source
        "device": settings["device"],
        "cache": False,
        "sampling": "both",
    }
    out: dict[str, Any] = {}
    for scan, patch, stride in (("ct", 16, 4), ("dicom", 8, 4)):
        config = EmbedConfig(**common, patch=patch, stride=stride)
        emb = finish(embed_volume(*scans[scan][:1], load_encoder(config), config, labels=scans[scan][1]))
        splits = {"slab": settings["slab_mm"], "cv": None} if scan == "ct" else {"dicom": None}
        for name, slab in splits.items():
            quality = embedding_quality(
                emb,
                gap_mm=settings["gap_mm"] if slab else None,
                merge_sides=True,
                seed=0,
                test_slab_mm=tuple(slab) if slab else None,
            )
            metrics = dict(quality.metrics)
            metrics.pop("settings", None)
            out[name] = metrics
    return out


def dicom_windows(run: Path) -> np.ndarray:
    """Every window of the DICOM series at the run's spacing and HU window (the attention check's input)."""
    from napari_dagman.core.attention.sanity import volume_windows
    from napari_dagman.core.checkpoint import load_pretrained_encoder
    from napari_dagman.core.data import model_volume
    from napari_dagman.core.io import read_volume

    pretrained = load_pretrained_encoder(run, "auto")
    pv = model_volume(
        read_volume(shared_data() / "example_ct_dicom"),
        dims=3,
        spacing=pretrained.spacing,
        hu_range=pretrained.hu_range,
    )
    return volume_windows(pv.array, pretrained.roi, 3, pretrained.roi // 2)


def attention_figures(run: Path | None, settings: dict[str, Any], init_seed: int | None = None) -> dict[str, Any]:
    """`attention_sanity` of the run's preferred encoder (or of a random-init one) on the DICOM windows."""
    from napari_dagman.core.attention.sanity import attention_sanity
    from napari_dagman.core.checkpoint import load_pretrained_encoder
    from napari_dagman.core.embeddings.features import random_init_encoder

    any_run = run or Path(settings["any_run"])
    pretrained = load_pretrained_encoder(any_run, "auto")
    if pretrained.kind != "swin":
        return {}
    encoder = pretrained.encoder if init_seed is None else random_init_encoder(pretrained.arch, init_seed)
    if init_seed is None and not pretrained.class_attention_trained:
        return {"trained": False}
    seeds = [s + 100 for s in RANDOM_SEEDS]  # the null networks of the check, apart from the control's seeds
    result = attention_sanity(encoder, dicom_windows(any_run), random_seeds=seeds, device=settings["device"])
    return {
        "trained": init_seed is None,
        **result["mean"],
        "heads": result["heads"],
        "head_diversity": result["head_diversity"],
        "body_share": result["body_share"],
    }


def arm_job(arm: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Pretrain (methods) and evaluate, or evaluate a control: everything one arm and seed needs."""
    import torch

    torch.set_num_threads(settings["threads"])
    result: dict[str, Any] = {"arm": arm, "seed": seed}
    if arm in ARMS:
        run, result["pretrain_seconds"] = pretrain(arm, seed, settings)
        result["run"] = str(run)
        result["collapse"] = collapse_figures(run)
        result.update(organ_figures("encoder", run, None, settings))
        result["attention"] = attention_figures(run, settings)
    elif arm == "random-init":
        result.update(organ_figures("random-init", Path(settings["any_run"]), seed, settings))
        if seed == RANDOM_SEEDS[0]:  # an untrained network's attention figures, once (they are uniform: CaiT init)
            result["attention"] = attention_figures(None, settings, init_seed=seed)
    else:
        result.update(organ_figures(arm, Path(settings["any_run"]), None, settings))
    return result


# --- summary --------------------------------------------------------------------------------------------------
def value(result: dict[str, Any], figure: str) -> float | None:
    section, key = figure.split(".", 1)
    v = result.get(section, {}).get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def beats_null(results: list[dict[str, Any]]) -> dict[str, dict[str, list[bool]]]:
    """Per method and figure, for each seed: is it better than every one of the five random inits?"""
    null = [r for r in results if r["arm"] == "random-init"]
    out: dict[str, dict[str, list[bool]]] = {}
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        out[arm] = {}
        for figure, higher in FIGURES.items():
            nulls = [v for v in (value(r, figure) for r in null) if v is not None]
            seeds = [value(r, figure) for r in rows]
            if not nulls or any(v is None for v in seeds):
                continue
            out[arm][figure] = [(v > max(nulls)) if higher else (v < min(nulls)) for v in seeds]
    return out


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, each with its figure and whether it is met."""
    methods = [r for r in results if r["arm"] in ARMS]
    codistill = [r for r in methods if r["arm"] in ("dagman", "smit", "attmask")]
    out: dict[str, Any] = {}
    def judged(values: dict[str, Any], good: Any) -> dict[str, Any]:
        met = all(v is not None and good(v) for v in values.values()) if values else None
        return {"values": values, "met": met}

    kl = {f"{r['arm']}_{r['seed']}": r["collapse"].get("global_kl_end") for r in codistill}
    out["global_kl_above_0.05"] = judged(kl, lambda v: v > 0.05)
    tokens = {f"{r['arm']}_{r['seed']}": r["collapse"].get("probe_token_cosine") for r in methods}
    out["token_cosine_below_0.95"] = judged(tokens, lambda v: v < 0.95)
    outputs = {f"{r['arm']}_{r['seed']}": r["collapse"].get("probe_output_cosine") for r in methods if r["arm"] in ("cass", "mim")}
    out["cass_mim_output_cosine_below_0.9"] = judged(outputs, lambda v: v < 0.9)
    entropy = {
        f"{r['arm']}_{r['seed']}": r["attention"].get("mean_head_normalised_entropy")
        for r in methods
        if r.get("attention", {}).get("trained")
    }
    out["attention_entropy_at_most_0.95"] = {
        "values": entropy, "met_by": sorted(k for k, v in entropy.items() if v is not None and v <= 0.95)
    }
    trained = [r for r in methods if r.get("attention", {}).get("trained")]
    beyond = {f"{r['arm']}_{r['seed']}": r["attention"].get("beyond_random") for r in trained}
    out["attention_beyond_random"] = {"values": beyond, "met_by": sorted(k for k, v in beyond.items() if v)}
    distinct = {f"{r['arm']}_{r['seed']}": r["attention"].get("distinguishable") for r in trained}
    out["attention_beyond_random_and_flat_floor"] = {
        "values": distinct, "met_by": sorted(k for k, v in distinct.items() if v)
    }
    wins = beats_null(results)
    both = [
        arm
        for arm, figures in wins.items()
        if all(figures.get("slab.linear_balanced_accuracy", [False])) and all(figures.get("dicom.nmi", [False]))
    ]
    out["every_seed_beats_all_random_inits_on_slab_probe_and_dicom_nmi"] = {"methods": both, "met": bool(both)}
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    arms = list(dict.fromkeys(r["arm"] for r in results))
    out: dict[str, Any] = {}
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        summary: dict[str, Any] = {}
        for figure in [*FIGURES, *ATTENTION, "collapse.probe_token_cosine", "collapse.probe_output_cosine", "collapse.global_kl_end"]:
            values = [v for v in (value(r, figure) for r in rows) if v is not None]
            if values:
                summary[figure] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)), "values": values}
        seconds = [r["pretrain_seconds"] for r in rows if r.get("pretrain_seconds")]
        if seconds:
            summary["pretrain_seconds"] = float(np.mean(seconds))
        out[arm] = summary
    return out


def markdown(summary: dict[str, Any], wins: dict[str, Any], goals: dict[str, Any]) -> str:
    figures = [*FIGURES, *ATTENTION, "collapse.probe_token_cosine", "collapse.probe_output_cosine", "collapse.global_kl_end"]
    short = {
        f: f.replace("balanced_accuracy", "bal.acc")
        .replace("mean_head_normalised_entropy", "head entropy")
        .replace("normalised_entropy", "entropy")
        for f in figures
    }
    lines = ["| arm | " + " | ".join(short[f] for f in figures) + " | pretraining s |", "|---" * (len(figures) + 2) + "|"]
    for arm, s in summary.items():
        cells = []
        for f in figures:
            v = s.get(f)
            if not v:
                cells.append("-")
            elif len(v["values"]) == 1:
                cells.append(f"{v['mean']:.3f}")
            else:
                cells.append(f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]")
        sec = s.get("pretrain_seconds")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {sec:.0f} |" if sec else f"| {arm} | " + " | ".join(cells) + " | - |")
    lines += ["", "Seeds better than all five random inits (per seed, in seed order):", ""]
    for arm, figures_ in wins.items():
        good = [f"{f}: {''.join('Y' if b else 'n' for b in bs)}" for f, bs in figures_.items()]
        lines.append(f"* {arm}: " + "; ".join(good))
    lines += ["", "Targets:", ""]
    for name, goal in goals.items():
        lines.append(f"* {name}: {json.dumps(goal, default=float)}")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], folder: Path) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    shown = ["slab.linear_balanced_accuracy", "slab.knn_balanced_accuracy", "dicom.nmi", "attention.mean_head_normalised_entropy"]
    fig = Figure(figsize=(3.4 * len(shown), 3.2), tight_layout=True)
    FigureCanvasAgg(fig)
    arms = list(dict.fromkeys(r["arm"] for r in results))
    for i, figure in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        for j, arm in enumerate(arms):
            values = [v for v in (value(r, figure) for r in results if r["arm"] == arm) if v is not None]
            colour = "#d62728" if arm == "dagman" else "#7f7f7f" if arm not in ARMS else "#1f77b4"
            ax.plot([j] * len(values), values, "o", color=colour, ms=4)
        null = [v for v in (value(r, figure) for r in results if r["arm"] == "random-init") if v is not None]
        if null:
            ax.axhspan(min(null), max(null), color="#cccccc", alpha=0.5, lw=0)
        ax.set_xticks(range(len(arms)), arms, rotation=60, fontsize=7)
        ax.set_title(figure, fontsize=8)
    path = folder / "pretraining_protocol.png"
    fig.savefig(str(path), dpi=110)
    return [str(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed per method, 40 steps")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--phantoms", type=int, default=0, help="phantoms of varied anatomy added to the pretraining data")
    # one job on both cores: two single-thread jobs ran a tiny step 1.6x slower in total on this 2-core machine
    parser.add_argument("--jobs", type=int, default=1, help="arms run in parallel, each with --threads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slab-fraction", type=float, default=0.12)
    parser.add_argument("--slab-position", type=float, default=0.85)
    parser.add_argument("--gap-mm", type=float, default=24.0)
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "pretraining_protocol"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "pretraining_protocol.json"))
    parser.add_argument("--plots", default=str(REPO / "docs" / "images"))
    args = parser.parse_args()
    arms = {arm: ARMS[arm] for arm in args.arms}
    if args.quick:
        arms = {arm: seeds[:1] for arm, seeds in arms.items()}
        args.steps = 40
        args.work = str(Path(args.work).with_name(Path(args.work).name + "_quick"))
        args.json = str(Path(args.json).with_name("pretraining_protocol_quick.json"))
    settings: dict[str, Any] = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device,
        "work": args.work,
        "phantoms": args.phantoms,
        "slab_fraction": args.slab_fraction,
        "slab_position": args.slab_position,
        "gap_mm": args.gap_mm,
    }
    settings["slab_mm"] = list(split(settings)[1])
    started = time.perf_counter()
    jobs = [(arm, seed) for arm, seeds in arms.items() for seed in seeds]
    # the slowest first, so that the two workers finish together
    order = {"mim": 0, "dagman": 1, "attmask": 1, "smit": 1, "miram": 2, "cass": 2, "simmim": 3}
    jobs.sort(key=lambda j: order.get(j[0], 9))
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(arm_job, *zip(*jobs, strict=True), [settings] * len(jobs)))
        settings["any_run"] = results[0]["run"]
        controls = [("random-init", s) for s in RANDOM_SEEDS] + [("intensity", 0), ("position", 0)]
        results += list(pool.map(arm_job, *zip(*controls, strict=True), [settings] * len(controls)))
    order_out = [*ARMS, "random-init", "intensity", "position"]
    results.sort(key=lambda r: (order_out.index(r["arm"]), r["seed"]))
    summary = summarise(results)
    wins = beats_null(results)
    goals = targets(results)
    table = markdown(summary, wins, goals)
    wall = time.perf_counter() - started
    print(table)
    print(f"wall time {wall / 60:.1f} min")
    plots = plot(results, Path(args.plots))
    report = {
        "settings": settings,
        "summary": summary,
        "beats_all_random_inits": wins,
        "targets": goals,
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
