"""Label efficiency of segmentation fine-tuning: validation Dice against the number of labelled pieces, pretrained
encoder versus scratch, over seeds, with one job (issue 25).

Every arm (budget k, init pretrained or scratch, seed) is one ordinary fine-tuning run (`run_finetuning`) with
``train_pieces = k`` in its own folder ``OUT/<init>/k<k>_seed<seed>``; the k pieces are drawn by the seed alone
(`data.draw_budget`), so both inits at one seed train on the same pieces and validate on the same, unchanged,
validation part. A finished arm is read back instead of trained again; an unfinished one is resumed. The job
writes ``label_efficiency.csv`` (one row per arm), ``label_efficiency.json`` (the rows, mean and spread over
seeds per budget and init, and the paired difference pretrained minus scratch per budget) and
``label_efficiency.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.config import FinetuneConfig
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.events import (
    CancelToken,
    CheckpointEvent,
    FinishedEvent,
    LogEvent,
    ProgressEvent,
    StepEvent,
)
from napari_dagman.core.files import atomic_write, atomic_write_text
from napari_dagman.core.runs import RunFolder
from napari_dagman.core.segmentation.data import budget_units, split_mode
from napari_dagman.core.segmentation.model import run_input_defaults
from napari_dagman.core.segmentation.train import RESUME_KEYS, run_finetuning

INITS = ("pretrained", "scratch")
CSV_FILE, JSON_FILE, PNG_FILE = "label_efficiency.csv", "label_efficiency.json", "label_efficiency.png"
#: the settings a scratch arm copies from the pretraining run, so that both arms train the same network on the
#: same inputs and differ in the encoder's starting weights only
SHARED_INPUTS = ("preset", "dims", "roi", "spacing", "hu_min", "hu_max")


@dataclass(frozen=True)
class Arm:
    """One fine-tuning run of the grid."""

    budget: int
    init: str  # pretrained | scratch
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.init}/k{self.budget}_seed{self.seed}"


def parse_numbers(text: str, what: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (sorted, unique); a word, an empty list or a number below ``0`` is refused."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise DagmanInputError(f"{what} must be whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 0:
        raise DagmanInputError(f"{what} must be whole numbers of at least 0 separated by commas, got {text!r}")
    return sorted(set(values))


def check_grid(config: FinetuneConfig, budgets: Sequence[int], seeds: Sequence[int]) -> list[Arm]:
    """The arms of the grid, after every check that needs no image read: an ``init`` run, a validation part, and
    budgets from 1 to the pieces available (`budget_units`). Raises `DagmanInputError` with one line."""
    if not config.init:
        raise DagmanInputError("the label-efficiency curve compares a pretrained encoder with scratch: give --init RUN")
    if not config.out:
        raise DagmanInputError("no output folder given (--out)")
    if config.val_split == "none":
        raise DagmanInputError("the label-efficiency curve needs validation Dice: choose a --val-split other than none")
    if not budgets or not seeds:
        raise DagmanInputError("give at least one budget and one seed")
    num_cases = len(config.images)
    if not num_cases:
        raise DagmanInputError("give at least one IMAGE LABELS pair")
    available = budget_units(config, num_cases)
    if min(budgets) < 1 or max(budgets) > available:
        raise DagmanInputError(
            f"label budgets must be 1 to {available}, the {_pieces(config, num_cases)} this split offers; "
            f"got {', '.join(str(b) for b in budgets)}"
        )
    return [Arm(k, init, s) for k in budgets for s in seeds for init in INITS]


def _pieces(config: FinetuneConfig, num_cases: int) -> str:
    """What one labelled piece is, in words."""
    if split_mode(config, num_cases) == "cases":
        return "training cases"
    return f"labelled slabs ({config.train_slabs} per volume, --train-slabs)"


def arm_config(config: FinetuneConfig, arm: Arm, out: Path, shared: dict[str, Any]) -> FinetuneConfig:
    """The fine-tuning config of one arm: the job's config with the budget, seed, folder and init of the arm."""
    changes: dict[str, Any] = {
        "out": str(out / arm.folder),
        "train_pieces": arm.budget,
        "seed": arm.seed,
        "init": config.init if arm.init == "pretrained" else None,
    }
    if arm.init == "scratch":
        changes.update({k: v for k, v in shared.items() if getattr(config, k) is None})
    return config.replace(**changes)


def _finished_result(config: FinetuneConfig) -> dict[str, Any] | None:
    """The last validation of a completed run in ``config.out`` with these settings (None: train or resume it).

    A completed run whose settings differ from the arm's is refused: reading it as the arm would mix two grids."""
    run = RunFolder(str(config.out))
    info = run.read_run_info()
    if info.get("status") != "completed" or int(info.get("steps_done") or 0) != config.steps:
        return None
    saved = run.config_dict()
    wanted = config.to_dict()
    differ = [
        k
        for k in (*RESUME_KEYS, "steps", "lr")
        if wanted.get(k) not in (None, []) and saved.get(k) != wanted.get(k)
    ]
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} (wanted {wanted.get(k)!r})" for k in differ)
        raise DagmanInputError(f"{run.path} holds a finished run with other settings: {shown}; choose a new --out")
    last = [r for r in run.read_metrics() if r.get("kind") == "validation"]
    if not last:
        return None
    return {"step": last[-1]["step"], "mean_dice": last[-1]["mean_dice"], "dice": last[-1]["dice"]}


def _row(arm: Arm, result: dict[str, Any], folder: Path, reused: bool) -> dict[str, Any]:
    return {
        "budget": arm.budget,
        "init": arm.init,
        "seed": arm.seed,
        "step": result["step"],
        "mean_dice": _number(result["mean_dice"]),
        "dice": {k: _number(v) for k, v in result["dice"].items()},
        "run": str(folder),
        "reused": reused,
    }


def _number(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def run_label_efficiency(
    config: FinetuneConfig,
    budgets: Sequence[int],
    seeds: Sequence[int],
    *,
    cancel: CancelToken | None = None,
    command: str | None = None,
) -> Generator[Any, None, FinishedEvent]:
    """Fine-tune every (budget, init, seed) arm and write the label-efficiency tables and figure in ``config.out``.

    ``config`` is the fine-tuning job of the pretrained arm (``init`` set); the scratch arm is the same job with
    no init and the pretraining run's preset, dims, ROI, spacing and HU range. Yields a `ProgressEvent` per arm,
    the runs' `LogEvent`s and `StepEvent`s, and returns (and yields last) a `FinishedEvent` whose ``summary`` is
    the JSON result and whose ``paths`` name the CSV, JSON and PNG. A cancel stops the running arm at its next
    step (it is resumed when the job runs again) and writes nothing.
    """
    arms = check_grid(config, budgets, seeds)
    out = Path(str(config.out))
    defaults = run_input_defaults(config.init)
    shared = {k: defaults[k] for k in SHARED_INPUTS}
    rows: list[dict[str, Any]] = []
    for i, arm in enumerate(arms):
        yield ProgressEvent(i, len(arms), f"{arm.init}, {arm.budget} piece(s), seed {arm.seed}")
        arm_cfg = arm_config(config, arm, out, shared)
        result = _finished_result(arm_cfg)
        if result is not None:
            yield LogEvent(f"{arm.folder}: finished before, reused (mean Dice {_shown(result['mean_dice'])})")
            rows.append(_row(arm, result, out / arm.folder, reused=True))
            continue
        run = RunFolder(str(arm_cfg.out))
        resume = run.file("resume.safetensors").is_file()
        yield LogEvent(f"{arm.folder}: {'resuming' if resume else 'fine-tuning'} ({i + 1} of {len(arms)})")
        finished = None
        for event in run_finetuning(arm_cfg, resume=resume, cancel=cancel, command=command):
            if isinstance(event, FinishedEvent):
                finished = event
            elif isinstance(event, LogEvent):
                yield LogEvent(f"{arm.folder}: {event.message}", event.level)
            elif isinstance(event, StepEvent | ProgressEvent | CheckpointEvent):
                yield event
        if finished is None or finished.cancelled:
            done = FinishedEvent(str(out), i, len(arms), cancelled=True)
            yield done
            return done
        last = finished.summary.get("last_validation") or {}
        if not last:
            raise DagmanInputError(f"{arm.folder} ended without a validation: nothing to compare")
        rows.append(_row(arm, last, out / arm.folder, reused=False))
    yield ProgressEvent(len(arms), len(arms), "writing the tables")
    result = summarise(rows, config, budgets, seeds)
    paths = write_results(out, result)
    done = FinishedEvent(str(out), len(arms), len(arms), paths=paths, summary=result)
    yield done
    return done


def _shown(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "-"


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of the finite values."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"n": int(len(v)), "mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max())}


def summarise(
    rows: list[dict[str, Any]], config: FinetuneConfig, budgets: Sequence[int], seeds: Sequence[int]
) -> dict[str, Any]:
    """Rows, mean and spread over seeds per (budget, init), and per budget the paired difference pretrained minus
    scratch (same seed, same pieces) of the mean Dice."""
    by = {(r["budget"], r["init"], r["seed"]): r for r in rows}
    organs = list(rows[0]["dice"]) if rows else []
    curves = []
    for k in budgets:
        for init in INITS:
            picked = [by[(k, init, s)] for s in seeds if (k, init, s) in by]
            curves.append(
                {
                    "budget": k,
                    "init": init,
                    "mean_dice": _spread([r["mean_dice"] for r in picked]),
                    "dice": {o: _spread([r["dice"].get(o) for r in picked]) for o in organs},
                }
            )
    paired = []
    for k in budgets:
        diffs = [
            by[(k, "pretrained", s)]["mean_dice"] - by[(k, "scratch", s)]["mean_dice"]
            for s in seeds
            if (k, "pretrained", s) in by
            and (k, "scratch", s) in by
            and by[(k, "pretrained", s)]["mean_dice"] is not None
            and by[(k, "scratch", s)]["mean_dice"] is not None
        ]
        paired.append({"budget": k, "per_seed": diffs, **_spread(diffs)})
    return {
        "budgets": list(budgets),
        "seeds": list(seeds),
        "organs": organs,
        "init": config.init,
        "pieces": _pieces(config, len(config.images)),
        "steps": config.steps,
        "rows": rows,
        "curves": curves,
        "pretrained_minus_scratch": paired,
    }


def write_results(out: Path, result: dict[str, Any]) -> dict[str, str]:
    """The CSV, JSON and PNG of a result, each written whole or not at all; returns their paths."""
    organs = result["organs"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["budget", "init", "seed", "step", "mean_dice", *organs, "run"])
    for r in result["rows"]:
        values = [r["mean_dice"], *(r["dice"].get(o) for o in organs)]
        writer.writerow(
            [r["budget"], r["init"], r["seed"], r["step"], *("" if v is None else f"{v:.6f}" for v in values), r["run"]]
        )
    paths = {"csv": out / CSV_FILE, "json": out / JSON_FILE, "png": out / PNG_FILE}
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write(paths["png"], lambda tmp: _figure(result).savefig(str(tmp), dpi=120, format="png"))
    return {k: str(v) for k, v in paths.items()}


def _figure(result: dict[str, Any]) -> Any:
    """Mean Dice over seeds against labelled pieces, one line per init; each seed's value as a dot, the range as a
    band (with two seeds a standard deviation says little)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for init, colour in zip(INITS, ("tab:blue", "tab:grey"), strict=True):
        curve = [c for c in result["curves"] if c["init"] == init and c["mean_dice"]["n"]]
        ks = [c["budget"] for c in curve]
        ax.plot(ks, [c["mean_dice"]["mean"] for c in curve], "-o", color=colour, label=init)
        ax.fill_between(
            ks, [c["mean_dice"]["min"] for c in curve], [c["mean_dice"]["max"] for c in curve], color=colour, alpha=0.2
        )
        dots = [(r["budget"], r["mean_dice"]) for r in result["rows"] if r["init"] == init and r["mean_dice"] is not None]
        if dots:
            ax.plot(*zip(*dots, strict=True), ".", color=colour, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["budgets"], [str(k) for k in result["budgets"]])
    ax.set_xlabel(f"labelled pieces ({result['pieces']})")
    ax.set_ylabel("mean validation Dice (last step)")
    ax.set_title(f"label efficiency, {len(result['seeds'])} seed(s), {result['steps']} steps")
    ax.legend()
    return fig
