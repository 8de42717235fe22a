"""What a classification writes: predictions.csv, curve.csv, metrics.json, ROC/PR and label-efficiency PNGs.

Every file is written whole or not at all (`core.files.atomic_write`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.classification.table import ClassTable
from napari_dagman.core.files import atomic_write, atomic_write_text

#: colours of the feature sets in every figure (the run's encoder, then the controls)
COLOURS = {"random-init": "tab:grey", "intensity": "tab:orange", "finetune": "tab:green"}
ENCODER_COLOUR = "tab:blue"


def predictions_frame(table: ClassTable, probabilities: dict[str, np.ndarray], folds: np.ndarray) -> Any:
    """One row per table row: its number, image, patient, true class, fold, and each feature set's class
    probabilities and predicted class (empty where the row was not tested)."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "row": table.rows,
            "image": table.images,
            "patient": table.patients,
            "label": [table.class_names[i] for i in table.y],
            "fold": folds,
        }
    )
    for name, p in probabilities.items():
        tested = np.isfinite(p).all(axis=1)
        for c, cls in enumerate(table.class_names):
            frame[f"{name}_p_{cls}"] = np.round(p[:, c], 6)
        predicted = np.where(tested, np.asarray(table.class_names, object)[np.nan_to_num(p).argmax(axis=1)], "")
        frame[f"{name}_predicted"] = predicted
    return frame


def write_csv(frame: Any, path: Path) -> str:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return str(path)


def write_json(data: dict, path: Path) -> str:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    return str(path)


def _save(fig: Any, path: Path) -> str:
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=120))
    return str(path)


def _colour(name: str) -> str:
    return COLOURS.get(name, ENCODER_COLOUR)


def roc_pr_pngs(
    y: np.ndarray, probabilities: dict[str, np.ndarray], metrics: dict[str, dict], out: Path
) -> dict[str, str]:
    """ROC and precision-recall curves of each feature set (two classes), AUC/AP with intervals in the legend."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from napari_dagman.core.report_figures import _figure

    paths = {}
    for kind in ("roc", "pr"):
        fig = _figure(5, 5)
        ax = fig.add_subplot(111)
        for name, p in probabilities.items():
            tested = np.isfinite(p).all(axis=1)
            m = metrics[name]
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y[tested], p[tested, 1])
                label = f"{name}: AUC {m['auc']:.2f} {_ci(m['auc_ci95'])}"
                ax.plot(fpr, tpr, color=_colour(name), label=label)
            else:
                precision, recall, _ = precision_recall_curve(y[tested], p[tested, 1])
                label = f"{name}: AP {m['average_precision']:.2f} {_ci(m['average_precision_ci95'])}"
                ax.step(recall, precision, where="post", color=_colour(name), label=label)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ":", color="k", lw=0.8)
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (out-of-fold)")
        else:
            ax.set(xlabel="recall", ylabel="precision", title="precision-recall (out-of-fold)")
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        paths[kind] = _save(fig, out / f"{kind}.png")
    return paths


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def curve_png(rows: list[dict], out: Path) -> str:
    """The label-efficiency curve: the figure against labelled rows per class, one line per feature set, the
    95 % interval shaded."""
    from napari_dagman.core.report_figures import _figure

    fig = _figure(6, 4.5)
    ax = fig.add_subplot(111)
    numbers = sorted({r["shots"] for r in rows if r["shots"] != "all"})
    position = {k: i for i, k in enumerate([*numbers, "all"])}
    for name in dict.fromkeys(r["features"] for r in rows):
        mine = [r for r in rows if r["features"] == name]
        xs = [position[r["shots"]] for r in mine]
        ax.plot(xs, [r["mean"] for r in mine], "o-", color=_colour(name), label=name)
        low = [r["ci95_low"] if r["ci95_low"] is not None else r["mean"] for r in mine]
        high = [r["ci95_high"] if r["ci95_high"] is not None else r["mean"] for r in mine]
        ax.fill_between(xs, low, high, color=_colour(name), alpha=0.15, lw=0)
    ax.set_xticks(range(len(position)), [str(k) for k in position])
    metric = rows[0]["metric"] if rows else "auc"
    if metric == "auc":
        ax.axhline(0.5, ls=":", color="k", lw=0.8)
    ax.set(xlabel="labelled rows per class", ylabel=metric.replace("_", " "), title="label efficiency")
    ax.legend(fontsize=8)
    return _save(fig, out / "curve.png")


def summary_lines(metrics: dict) -> list[str]:
    """What the terminal shows: the probe's headline figure with its interval, beside each control's."""

    def figure(m: dict) -> str:
        name = "AUC" if m.get("auc") is not None else "balanced accuracy"
        value = m.get("auc") if m.get("auc") is not None else m.get("balanced_accuracy")
        ci = m.get("auc_ci95") if m.get("auc") is not None else m.get("balanced_accuracy_ci95")
        text = "n/a" if value is None else f"{value:.3f}"
        return f"{name} {text}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    enc = metrics["encoder"]
    lines = [f"{metrics['rows']} rows, {metrics['patients']} patients, {metrics['validation']}"]
    lines.append(f"probe on {enc['which']} ({enc['method']}, stage {enc['stage']}): {figure(metrics['heads']['probe'])}")
    lines += [f"  control {name}: {figure(m)}" for name, m in metrics["controls"].items()]
    if "finetune" in metrics["heads"]:
        lines.append(f"fine-tuned encoder and head: {figure(metrics['heads']['finetune'])}")
    for head, key in (("encoder", "differences"), ("finetune", "finetune_differences")):
        for d in metrics.get(key, []):
            if d["ci95"] is not None:
                verdict = "beyond" if d["exceeds_interval"] else "within"
                lines.append(
                    f"  {d['shots']} shots: {head} - {d['minus']} = {d['difference']:+.3f} "
                    f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({verdict} the interval)"
                )
    lines += [f"note: {n}" for n in metrics.get("notes", [])]
    return lines
