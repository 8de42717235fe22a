"""Figures as PNG files, without a screen (matplotlib's Agg canvas): what the demo report and the CLI write.

Each function draws one figure from a core result and saves it; none computes anything a core job did not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: CT display window (abdomen: width 400, level 40), for figures only: never what a model sees
WINDOW = (-160.0, 240.0)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_scatter_png(table: Any, method: str, by: str, path: str | Path) -> str:
    """The projection coloured by organ or cluster, with a legend outside the points."""
    from napari_dagman.core.embeddings import colour_groups

    x, y = table[f"{method}_0"].to_numpy(), table[f"{method}_1"].to_numpy()
    groups = colour_groups(table, by)
    fig = _figure(8, 6)
    ax = fig.add_subplot(111)
    for name, rgba, rows in groups:
        ax.plot(x[rows], y[rows], "o", ms=2.5, mew=0, color=rgba, label=f"{name} ({len(rows)})")
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(f"{len(table)} patches coloured by {by}")
    ax.legend(
        fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), ncols=1 + len(groups) // 30
    )
    fig.savefig(str(path), dpi=150)
    return str(path)


def projection_scatter(result: Any, path: str | Path) -> str:
    """An organ-clusters result's projection, coloured by organ when there are labels (else by cluster)."""
    config = result.config
    by = "organ" if "organ" in result.table.columns else "cluster"
    if by not in result.table.columns:
        result.table["cluster"] = 0
    return write_scatter_png(result.table, config.method, by, path)


def probe_curves(rows: list[dict[str, Any]], figure: str) -> dict[str, list[tuple[int, float]]]:
    """Per encoder name, (step, value) of ``probe_<name>_<figure>`` in a run's metrics rows (whatever names the
    method published: teacher, student, transformer, target...)."""
    suffix = f"_{figure}"
    names = sorted(
        {
            k[len("probe_") : -len(suffix)]
            for r in rows
            for k in r
            if k.startswith("probe_") and k.endswith(suffix)
        }
    )
    return {
        n: [(r["step"], r[f"probe_{n}{suffix}"]) for r in rows if f"probe_{n}{suffix}" in r] for n in names
    }


def training_curves(rows: list[dict[str, Any]], path: str | Path) -> str:
    """Loss terms per step (left) and probe head diversity (right) from a run's metrics.jsonl rows."""
    fig = _figure(11, 3.6)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [r["step"] for r in rows if "loss" in r]
    skip = {"step", "kind", "loss", "lr", "seconds", "time", "grad_norm", "momentum", "teacher_temp"}
    terms = [
        k
        for k in (rows[0] if rows else {})
        if k not in skip
        and not k.startswith(("probe_", "teacher_", "mask_", "prototypes", "center", "global_kl", "patch_kl"))
    ]
    left.plot(steps, [r["loss"] for r in rows if "loss" in r], color="black", lw=2, label="total")
    for term in terms:
        values = [r.get(term) for r in rows]
        if all(isinstance(v, int | float) for v in values):
            left.plot(steps, values, lw=1, label=term)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend(fontsize=7)
    for label, curve in probe_curves(rows, "head_diversity").items():
        right.plot(*zip(*curve, strict=True), marker="o", ms=3, label=label)
    right.set_ylim(0, 1)
    right.set_xlabel("step")
    right.set_ylabel("head diversity (probe crops)")
    right.legend(fontsize=7)
    fig.savefig(str(path), dpi=110)
    return str(path)


def _ct_slice(ct: Any, z: int) -> np.ndarray:
    return np.clip(np.asarray(ct.array[z], np.float32), *WINDOW)


def head_tiles(result: Any, ct: Any, path: str | Path) -> str:
    """One axial CT slice per head with that head's map over the body, on one shared colour scale ("x uniform",
    contrast from the 2nd to the 98th percentile of the maps inside the body, said on the colour bar)."""
    from napari_dagman.core.attention.organs import maps_on_grid

    maps = result.maps
    if maps is None:  # a method without trained class attention: its own pictures instead
        return _picture_tiles(result, ct, path)
    on_ct = maps_on_grid(maps, ct)
    body = np.asarray(ct.array) > -500
    inside = np.argwhere(body)
    z = int(inside[:, 0].mean()) if len(inside) else ct.shape[0] // 2
    values = np.concatenate([m[body] for m in on_ct])
    low, high = (float(v) for v in np.percentile(values, [2, 98])) if values.size else (0.0, 2.0)
    fig = _figure(2.8 * len(on_ct), 3.2)
    image = None
    for i, m in enumerate(on_ct):
        ax = fig.add_subplot(1, len(on_ct), i + 1)
        ax.imshow(_ct_slice(ct, z), cmap="gray")
        shown = np.ma.masked_where(~body[z], m[z])
        image = ax.imshow(shown, cmap="inferno", alpha=0.6, vmin=low, vmax=max(high, low + 1e-6))
        ax.set_title("mean of the heads" if i == len(on_ct) - 1 else f"head {i}", fontsize=9)
        ax.axis("off")
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label=f"attention, x uniform ({low:.2f} to {high:.2f})")
    fig.suptitle(f"axial slice {z}; 1 = what every place would get if the attention were uniform", fontsize=9)
    fig.savefig(str(path), dpi=110)
    return str(path)


def _picture_tiles(result: Any, ct: Any, path: str | Path) -> str:
    pictures = result.pictures.pictures if result.pictures is not None else []
    fig = _figure(3.2 * max(1, len(pictures)), 3.2)
    for i, picture in enumerate(pictures):
        ax = fig.add_subplot(1, max(1, len(pictures)), i + 1)
        z = picture.array.shape[0] // 2
        ax.imshow(picture.array[z], cmap="tab10" if picture.kind == "labels" else "gray")
        ax.set_title(picture.name, fontsize=9)
        ax.axis("off")
    fig.suptitle(
        f"{result.model.get('method')} trains no class attention: its own pictures of one crop", fontsize=9
    )
    fig.savefig(str(path), dpi=110)
    return str(path)


def organ_bars(table: Any, path: str | Path) -> str:
    """Enrichment of each head per organ (the mean of the heads in black), organs with the largest volume first."""
    heads = [h for h in table["head"].unique() if h != "mean"]
    organs = (
        table[table["head"] == "mean"].sort_values("volume_share", ascending=False)["organ"].tolist()[:12]
    )
    fig = _figure(max(6, 0.7 * len(organs) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / (len(heads) + 1)
    for j, head in enumerate([*heads, "mean"]):
        rows = table[table["head"] == head].set_index("organ")
        values = [float(rows.loc[o, "enrichment"]) if o in rows.index else np.nan for o in organs]
        ax.bar(
            np.arange(len(organs)) + j * width,
            values,
            width,
            label="mean" if head == "mean" else f"head {head}",
            color="black" if head == "mean" else None,
        )
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_xticks(np.arange(len(organs)) + 0.4, organs, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("enrichment (1 = uniform)")
    ax.legend(fontsize=7, ncols=3)
    fig.savefig(str(path), dpi=110)
    return str(path)


def segmentation_overlay(results: Any, ct: Any, path: str | Path) -> str:
    """Reference and prediction over the axial slice where the reference organs are largest, Dice per organ."""
    from napari_dagman.core.labels import organ_colour

    prediction = np.asarray(results.prediction.array)
    reference = np.asarray(results.reference.array) if results.reference is not None else None
    organs = list(results.names)
    source = reference if reference is not None else prediction
    counts = np.isin(source, organs).reshape(source.shape[0], -1).sum(1)
    z = int(np.argmax(counts))
    panels = [("prediction", prediction)] + ([("reference", reference)] if reference is not None else [])
    fig = _figure(4.2 * len(panels) + 2.6, 4.4)
    grid = fig.add_gridspec(1, len(panels) + 1, width_ratios=[4.2] * len(panels) + [2.6])
    for i, (title, labels) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(_ct_slice(ct, z), cmap="gray")
        rgba = np.zeros((*labels.shape[1:], 4), np.float32)
        for organ in organs:
            rgba[labels[z] == organ] = [*organ_colour(results.names[organ])[:3], 0.5]
        ax.imshow(rgba)
        ax.set_title(f"{title}, slice {z}", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, len(panels)])
    ax.set_axis_off()
    lines = [
        f"{str(row['organ'])[:18]:18s} {'-' if row['dice'] != row['dice'] else format(row['dice'], '.2f')}"
        for row in results.table.to_dict(orient="records")
    ]
    ax.text(0.0, 1.0, "Dice per organ\n" + "\n".join(lines[:20]), va="top", fontsize=8, family="monospace")
    fig.savefig(str(path), dpi=110)
    return str(path)
