"""Lesion classification on the phantom (issue 25): a pretrained encoder against a random-init one and intensity.

Data: `core.phantom.lesions.make_lesion_cohort`: ``--cases`` phantom CTs (the canonical 3 x 2.5 x 2.5 mm grid),
each with ``--lesions`` lesions of two kinds of equal mean HU ("smooth" and "spiculated", which differ in shape and
texture), one patient per CT. Encoder: a ``--method`` run pretrained on the cohort's own CTs (self-supervised, no
label seen) with the pretraining protocol's settings (tiny preset, ROI 64, 3 mm, ``--steps`` steps, the protocol's
per-method overrides), or ``--run`` to reuse one. The default is DAGMaN, the tool's reference method; MiM (the
protocol's best encoder by its slab probe) costs 10-20 s a step here against DAGMaN's 1-2 s. Probe: ``napari-dagman
classify``'s job with ``--shots`` 1,5,20,all, ``--draws`` draws per number of shots, patient-level folds, the
random-init encoder and the intensity histogram on the same rows and draws.

Also measured: features of ``--rows`` lesions of **one** CT (random points in its body): the encoder passes over
the image once for all of them; time per row reported.

Run::

    python benchmarks/classification.py            # about 20 min on 2 CPU cores

It writes ``--json`` and prints the curve and which differences exceed their interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "classification"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "classification.json"))
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--lesions", type=int, default=12, help="lesions per CT")
    p.add_argument("--method", default="dagman", help="pretraining method of the encoder (default: the reference method)")
    p.add_argument("--steps", type=int, default=250, help="pretraining steps (the protocol's budget)")
    p.add_argument("--run", help="a pretraining run to use instead of pretraining one")
    p.add_argument("--stage", type=int, default=3, help="encoder stage pooled (classify's default: 3)")
    p.add_argument("--shots", default="1,5,20,all")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--rows", type=int, default=200, help="lesion rows of one CT for the timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune", action="store_true", help="also fine-tune the encoder with the head (classify --finetune)")
    p.add_argument("--finetune-steps", type=int, default=100, help="steps of each fine-tuning run (one per fold and shots)")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-batch", type=int, default=4)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def consume(events):
    last = None
    for event in events:
        last = event
    return last


def pretrain(images: list[str], out: Path, method: str, steps: int, seed: int) -> tuple[str, float]:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume as run_all
    from napari_dagman.core.training import run_pretraining

    # the pretraining protocol's settings and its per-method overrides (MiM: fewer nested crops, batch 1)
    sys.path.insert(0, str(Path(__file__).parent))
    from pretraining_protocol import ARM_OVERRIDES

    config = PretrainConfig.from_dict(
        {
            "images": images, "out": str(out), "method": method, "preset": "tiny", "roi": 64, "spacing": 3.0,
            "steps": steps, "batch_size": 2, **ARM_OVERRIDES.get(method, {}), "preview_every": 0, "seed": seed,
        }
    )  # fmt: skip
    started = time.perf_counter()
    run_all(run_pretraining(config))
    return str(out), time.perf_counter() - started


def timing_table(cohort_table: Path, out: Path, rows: int, seed: int) -> Path:
    """``rows`` points in the body of the cohort's first CT, with random classes: only the timing counts."""
    import pandas as pd

    from napari_dagman.core.io import read_volume

    first = pd.read_csv(cohort_table).iloc[0]
    image = cohort_table.parent / first["image"]
    volume = read_volume(image)
    body = np.argwhere(volume.array > -200)
    rng = np.random.default_rng(seed)
    picked = volume.index_to_physical(body[rng.choice(len(body), rows, replace=False)])
    frame = pd.DataFrame(
        {
            "image": str(image), "label": np.arange(rows) % 2, "x": picked[:, 2], "y": picked[:, 1],
            "z": picked[:, 0], "size": 15.0, "patient": [f"r{i}" for i in range(rows)],
        }
    )  # fmt: skip
    path = out / "timing.csv"
    frame.to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> int:
    from napari_dagman.core.classification import classify_job
    from napari_dagman.core.config.classify import ClassifyConfig
    from napari_dagman.core.embeddings import features as embedding_features
    from napari_dagman.core.phantom.lesions import make_lesion_cohort

    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = make_lesion_cohort(
        work / "cohort", cases=args.cases, lesions_per_case=args.lesions, seed=args.seed,
        shape=(96, 128, 128), spacing=(3.0, 2.5, 2.5),
    )  # fmt: skip
    cohort_s = time.perf_counter() - started
    import pandas as pd

    images = sorted({str(table.parent / i) for i in pd.read_csv(table)["image"]})
    run, pretrain_s = (args.run, 0.0) if args.run else pretrain(
        images, work / f"run_{args.method}", args.method, args.steps, args.seed
    )
    config = ClassifyConfig(
        table=str(table), checkpoint=run, out=str(work / f"result_stage{args.stage}"), shots=args.shots,
        draws=args.draws, folds=args.folds, seed=args.seed, stage=args.stage, finetune=args.finetune,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, finetune_batch=args.finetune_batch,
    )  # fmt: skip
    classify_started = time.perf_counter()
    finished = consume(classify_job(config))
    classify_s = time.perf_counter() - classify_started
    metrics = finished.summary

    passes = []
    original = embedding_features.stage_feature_map

    def counting(*a, **k):
        passes.append(1)
        return (yield from original(*a, **k))

    embedding_features.stage_feature_map = counting
    try:
        timing = ClassifyConfig(
            table=str(timing_table(table, work, args.rows, args.seed)), checkpoint=run, out=str(work / "timing"),
            controls=False, shots="all", draws=1, folds=2, bootstrap=200, seed=args.seed, stage=args.stage,
        )  # fmt: skip
        timed = consume(classify_job(timing)).summary["timing"]
    finally:
        embedding_features.stage_feature_map = original

    report = {
        "cohort": {"cases": args.cases, "lesions_per_case": args.lesions, "table": str(table), "build_s": cohort_s},
        "encoder": {"method": args.method, "steps": args.steps, "run": run, "pretrain_s": round(pretrain_s, 1),
                    "stage": args.stage},  # fmt: skip
        "probe": metrics["heads"]["probe"],
        **({"finetune": {**metrics["heads"]["finetune"], "runs": metrics["finetune_runs"],
                         "steps": args.finetune_steps, "lr": args.finetune_lr, "batch": args.finetune_batch},
            "finetune_differences": metrics["finetune_differences"]} if args.finetune else {}),  # fmt: skip
        "classify_s": round(classify_s, 1),
        "controls": metrics["controls"],
        "label_efficiency": metrics["label_efficiency"],
        "differences": metrics["differences"],
        "timing_one_ct": {"rows": args.rows, "encoder_passes": len(passes), **timed},
        "machine": "2-core CPU",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'features':12s} {'shots':>5s} {'AUC mean':>9s} {'sd':>6s} {'95% interval':>17s}")
    for row in metrics["label_efficiency"]:
        ci = f"[{row['ci95_low']:.3f}, {row['ci95_high']:.3f}]" if row["ci95_low"] is not None else "n/a"
        print(f"{row['features']:12s} {row['shots']!s:>5s} {row['mean']:9.3f} {row['std']:6.3f} {ci:>17s}")
    for head, key in (("encoder", "differences"), ("finetune", "finetune_differences")):
        for d in metrics.get(key, []):
            ci = "n/a" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            verdict = "exceeds" if d["exceeds_interval"] else "within"
            print(f"{head} - {d['minus']:11s} at {d['shots']!s:>3s} shots: {d['difference']:+.3f} {ci} ({verdict})")
    print(
        f"{args.rows} rows of one CT: {timed['features_s']:.1f} s of features, {timed['per_row_s'] * 1000:.0f} ms "
        f"per row, {len(passes)} encoder pass(es)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
