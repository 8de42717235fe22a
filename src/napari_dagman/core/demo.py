"""Every capability in one headless run, with a report to look at: ``napari-dagman demo``.

On the built-in phantom (or the user's CT and label map) it pretrains DAGMaN, draws the attention of every head
and the mask of every strategy, fine-tunes and predicts a segmentation, embeds and projects organ patches, and
writes PNG figures, ``summary.json`` (every figure's numbers, timings, versions, device) and ``index.html`` (the
figures with one line of reading each). Each stage writes what it made before the next starts and the report is
rewritten after every stage, so a run stopped by Ctrl-C leaves a report of what is done.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.config import DemoConfig
from napari_dagman.core.events import LogEvent, ProgressEvent
from napari_dagman.core.volume import Volume

STAGES = ("data", "pretraining", "attention", "fine-tuning", "organ clusters")


@dataclass
class Figure:
    """One figure of the report: its file, a title and one line on how to read it."""

    file: str
    title: str
    reading: str


@dataclass
class DemoReport:
    """What the report shows; grows stage by stage."""

    out: Path
    figures: list[Figure] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def add(self, file: str, title: str, reading: str) -> None:
        self.figures.append(Figure(file, title, reading))

    def write(self) -> None:
        from napari_dagman.core.io import atomic_write_text

        atomic_write_text(
            self.out / "summary.json", json.dumps(self.summary, indent=2, default=_plain) + "\n"
        )
        atomic_write_text(self.out / "index.html", render_html(self))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def budget(config: DemoConfig) -> dict[str, Any]:
    """The settings of each stage: ``quick`` (minutes) or the default (under a quarter of an hour on 2 cores)."""
    quick = config.quick
    return {
        "preset": "tiny",
        "roi": 32 if quick else 64,
        "spacing": 4.0 if quick else 3.0,
        "pretrain_steps": config.steps or (30 if quick else 300),
        "finetune_steps": config.finetune_steps or (10 if quick else 150),
        "finetune_roi": 64,
        "subtoken": 1 if quick else 2,
        "projection": "pca" if quick else "umap",
    }


def demo_job(config: DemoConfig) -> Generator[Any, None, DemoReport]:
    """Run the whole demo into ``config.out``; yields progress; returns the report (also written there)."""
    from napari_dagman.core.checkpoint import environment_info
    from napari_dagman.core.devices import resolve_device

    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = budget(config)
    device = resolve_device(config.device)
    report = DemoReport(out)
    report.summary = {
        "settings": {**config.to_dict(), **plan},
        "device": str(device),
        "environment": environment_info(),
        "timings": {},
        "stages_done": [],
    }
    t0 = time.perf_counter()
    ct, labels = load_data(config)
    report.summary["data"] = {
        "image": ct.metadata.get("name"),
        "shape": list(ct.shape),
        "spacing": list(ct.spacing),
    }
    stages = (
        ("pretraining", _pretrain),
        ("attention", _attention),
        ("fine-tuning", _finetune),
        ("organ clusters", _clusters),
    )
    state: dict[str, Any] = {"ct": ct, "labels": labels, "plan": plan, "device": str(device)}
    report.summary["timings"]["data"] = time.perf_counter() - t0
    for i, (name, stage) in enumerate(stages):
        if name in ("fine-tuning",) and labels is None:
            yield LogEvent(f"{name}: skipped (no label map)", "warning")
            continue
        yield ProgressEvent(i, len(stages), name)
        yield LogEvent(f"{name}...")
        start = time.perf_counter()
        yield from stage(config, report, state)
        report.summary["timings"][name] = time.perf_counter() - start
        report.summary["stages_done"].append(name)
        report.write()
    report.summary["timings"]["total"] = time.perf_counter() - t0
    report.write()
    yield ProgressEvent(len(stages), len(stages), "done")
    return report


def largest_organs(labels: Volume, count: int = 6) -> list[int]:
    """The ``count`` largest labelled organs (TotalSegmentator ids; the phantom's own tissue classes, 200 and up,
    are left out): a demo budget of steps learns a few large organs, not a hundred."""
    ids, voxels = np.unique(np.asarray(labels.array), return_counts=True)
    ranked = [
        int(i) for i, _ in sorted(zip(ids, voxels, strict=True), key=lambda p: -p[1]) if 0 < int(i) < 200
    ]
    return sorted(ranked[:count])


def load_data(config: DemoConfig) -> tuple[Volume, Volume | None]:
    """The user's CT (and label map), or the built-in phantom with its organs."""
    from napari_dagman.core.io import read_volume

    if config.image:
        ct = read_volume(config.image)
        labels = read_volume(config.labels) if config.labels else None
        return ct, labels
    from napari_dagman.core.phantom import make_phantom

    ct, labels = make_phantom(seed=config.seed)
    ct.metadata["name"] = "phantom"
    return ct, labels


# --- the stages ---------------------------------------------------------------------------------------------------
def _pretrain(config: DemoConfig, report: DemoReport, state: dict[str, Any]) -> Generator[Any, None, None]:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import FinishedEvent, StepEvent
    from napari_dagman.core.training import run_pretraining

    plan = state["plan"]
    run = report.out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    pconfig = PretrainConfig.from_dict(
        {
            "out": str(run),
            "method": config.method,
            "preset": plan["preset"],
            "roi": plan["roi"],
            "spacing": plan["spacing"],
            "steps": plan["pretrain_steps"],
            "batch_size": 1,
            "seed": config.seed,
            "device": state["device"],
            "preview_every": 0,
            "probe_every": max(5, plan["pretrain_steps"] // 10),
            "checkpoint_every": 0,
        }
    )
    finished = None
    for event in run_pretraining(pconfig, [state["ct"]]):
        if isinstance(event, StepEvent):
            yield ProgressEvent(event.step, event.total_steps, "pretraining")
        elif isinstance(event, FinishedEvent):
            finished = event
        elif isinstance(event, LogEvent):
            yield event
    state["run"] = run
    from napari_dagman.core.report_figures import probe_curves, training_curves

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report.summary["pretraining"] = {
        "run": str(run),
        "method": config.method,
        "steps": finished.steps_done if finished else None,
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "probe_head_diversity": probe_curves(rows, "head_diversity"),
        "seconds_per_step": float(np.median([r["seconds"] for r in rows])) if rows else None,
    }
    training_curves(rows, report.out / "curves.png")
    report.add(
        "curves.png",
        "Pretraining: loss terms and head diversity",
        "Left: each loss term per step (the distillation terms rise at first with the teacher temperature's "
        "warm-up). Right: how different the teacher's attention heads are on fixed probe crops "
        "(0 = all heads alike, 1 = unrelated); DAGMaN's noisy teacher is meant to keep it high.",
    )


def _attention(config: DemoConfig, report: DemoReport, state: dict[str, Any]) -> Generator[Any, None, None]:
    from napari_dagman.core.attention.job import attention_job, write_attention
    from napari_dagman.core.config import AttentionConfig
    from napari_dagman.core.report_figures import head_tiles, organ_bars

    plan = state["plan"]
    aconfig = AttentionConfig(
        checkpoint=str(state["run"]),
        scope="volume",
        subtoken=plan["subtoken"],
        seed=config.seed,
        device=state["device"],
    )
    result = yield from attention_job(aconfig, state["ct"], labels=state["labels"], keep_encoder=False)
    folder = report.out / "attention"
    write_attention(result, state["ct"], folder, figure=True)
    head_tiles(result, state["ct"], report.out / "attention_heads.png")
    report.add(
        "attention_heads.png",
        "Where each head of the teacher looks",
        "One axial slice of the CT, once per head, with that head's class attention over it in 'x uniform' (1 = "
        "the attention every place would get if all were equal; above 1 = looked at more). Different heads "
        "lighting different anatomy is what DAGMaN wants.",
    )
    report.add(
        "attention/mask_previews.png",
        "The mask every strategy would draw for one crop",
        "Hidden cells in red. Random and block masks ignore the anatomy; attention-high hides what the teacher "
        "attends to most; the noisy teacher does the same from an input with a fifth of the cells dropped.",
    )
    summary = {
        "head_diversity": result.diversity.get("diversity"),
        "masked_cells": {k: int(v.sum()) for k, v in result.preview.masks.items()},
    }
    if result.organs is not None:
        organ_bars(result.organs, report.out / "attention_by_organ.png")
        report.add(
            "attention_by_organ.png",
            "Each head's attention per organ",
            "Enrichment = the head's share of attention in the organ divided by the organ's share of the volume: "
            "1 = as much as a uniform map, 2 = twice as much, 0 = never.",
        )
        summary["organs"] = result.organs.to_dict(orient="records")
    report.summary["attention"] = summary


def _finetune(config: DemoConfig, report: DemoReport, state: dict[str, Any]) -> Generator[Any, None, None]:
    from napari_dagman.core.config import FinetuneConfig, PredictConfig
    from napari_dagman.core.events import FinishedEvent, StepEvent
    from napari_dagman.core.report_figures import segmentation_overlay
    from napari_dagman.core.segmentation import run_finetuning
    from napari_dagman.core.segmentation.jobs import predict_job, write_prediction

    plan = state["plan"]
    seg_run = report.out / "segmentation_run"
    if seg_run.exists():
        import shutil

        shutil.rmtree(seg_run)
    fconfig = FinetuneConfig(
        out=str(seg_run),
        organs=largest_organs(state["labels"]),
        init=str(state["run"]),
        roi=plan["finetune_roi"],
        steps=plan["finetune_steps"],
        batch_size=2,
        lr=1e-3,
        val_split="slab",
        val_every=max(5, plan["finetune_steps"] // 3),
        seed=config.seed,
        device=state["device"],
    )
    finished = None
    for event in run_finetuning(fconfig, [(state["ct"], state["labels"])]):
        if isinstance(event, StepEvent):
            yield ProgressEvent(event.step, event.total_steps, "fine-tuning")
        elif isinstance(event, FinishedEvent):
            finished = event
    results = yield from predict_job(
        PredictConfig(checkpoint=str(seg_run), device=state["device"]), state["ct"], state["labels"]
    )
    write_prediction(results, report.out / "prediction.nii.gz")
    segmentation_overlay(results, state["ct"], report.out / "segmentation.png")
    table = results.table
    report.summary["fine-tuning"] = {
        "run": str(seg_run),
        "steps": finished.steps_done if finished else None,
        "best_validation_mean_dice": finished.summary.get("best_mean_dice") if finished else None,
        "whole_volume_dice": {row["organ"]: row["dice"] for row in table.to_dict(orient="records")},
    }
    report.add(
        "segmentation.png",
        "Segmentation from the pretrained encoder, against the reference",
        "The fine-tuned SwinUNETR's prediction (colours) and where it disagrees with the reference (outlines), "
        "with Dice per organ: 1 = perfect overlap. A demo budget of steps gives a rough segmentation only.",
    )


def _clusters(config: DemoConfig, report: DemoReport, state: dict[str, Any]) -> Generator[Any, None, None]:
    from napari_dagman.core.config import EmbedConfig
    from napari_dagman.core.embeddings import run_embedding, write_results
    from napari_dagman.core.report_figures import projection_scatter

    plan = state["plan"]
    econfig = EmbedConfig(
        checkpoint=str(state["run"]),
        patch=16,  # one stage-3 token: smaller patches would share a token's features
        stride=8,
        sampling="both" if state["labels"] is not None else "grid",
        method=plan["projection"],
        seed=config.seed,
        device=state["device"],
        cache=False,
    )
    result = yield from run_embedding(econfig, state["ct"], state["labels"])
    write_results(result, report.out / "clusters")
    projection_scatter(result, report.out / "clusters.png")
    report.summary["organ clusters"] = {
        "patches": len(result.table),
        "projection": plan["projection"],
        "metrics": result.metrics,
    }
    report.add(
        "clusters.png",
        f"Organ patches in the encoder's feature space ({plan['projection'].upper()})",
        "Each dot is a patch of the CT described by the pretrained encoder, placed by "
        f"{plan['projection'].upper()} and coloured by the organ it mostly shows: organs that form their own "
        "groups are organs the encoder tells apart without ever seeing a label.",
    )


# --- the report ---------------------------------------------------------------------------------------------------
def render_html(report: DemoReport) -> str:
    """A self-contained page: the figures (relative paths), each with its reading, and the key numbers."""
    s = report.summary
    rows = []
    for figure in report.figures:
        rows.append(
            f'<section><h2>{html.escape(figure.title)}</h2><img src="{html.escape(figure.file)}" '
            f'alt="{html.escape(figure.title)}"><p>{html.escape(figure.reading)}</p></section>'
        )
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in s.get("timings", {}).items())
    dice = s.get("fine-tuning", {}).get("whole_volume_dice", {})
    dice_rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{'-' if v is None or v != v else f'{v:.3f}'}</td></tr>"
        for k, v in dice.items()
    )
    dice_table = f"<table><tr><th>organ</th><th>Dice</th></tr>{dice_rows}</table>" if dice_rows else ""
    done = ", ".join(s.get("stages_done", [])) or "none yet"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>napari-dagman demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} img{{max-width:100%;border:1px solid #ccc}}
section{{margin-bottom:2.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px}}</style>
</head><body>
<h1>napari-dagman demo: {html.escape(str(s.get("settings", {}).get("method", "")))} on {html.escape(str(s.get("data", {}).get("image", "")))}</h1>
<p>Stages done: {html.escape(done)}. Device {html.escape(str(s.get("device", "")))}; times: {html.escape(timings)}.
Every number behind these figures is in <a href="summary.json">summary.json</a>.</p>
{"".join(rows)}
{dice_table}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const ok = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", ok + "/" + images.length);
}});
</script>
</body></html>
"""
