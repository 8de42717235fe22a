"""What a finished embedding job gives: the `EmbeddingResult`, its patch table, legend colours, and the files
the CLI writes (table as CSV or Parquet, ``metrics.json``, ``config.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from napari_dagman.core.embeddings.metrics import Quality
from napari_dagman.core.embeddings.patches import SAMPLING_NAMES, PatchEmbeddings
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.io import atomic_write, atomic_write_text
from napari_dagman.core.labels import organ_colour

if TYPE_CHECKING:
    from napari_dagman.core.config import EmbedConfig


@dataclass
class EmbeddingResult:
    """Everything the CLI writes and the dock shows."""

    embeddings: PatchEmbeddings
    projection: np.ndarray
    clusters: np.ndarray | None
    quality: Quality | None
    table: pd.DataFrame
    config: EmbedConfig

    @property
    def metrics(self) -> dict[str, Any] | None:
        return None if self.quality is None else self.quality.metrics


def build_table(
    emb: PatchEmbeddings,
    projection: np.ndarray | None = None,
    method: str = "umap",
    clusters: np.ndarray | None = None,
    quality: Quality | None = None,
) -> pd.DataFrame:
    """One row per patch: id, sampling, centre (mm and source voxel), organ, purity, projection, cluster."""
    mm = emb.centres_mm()
    index = emb.centres_index()
    table: dict[str, Any] = {
        "patch_id": np.arange(len(emb)),
        "sampling": pd.Categorical(np.asarray(SAMPLING_NAMES)[emb.sampled], categories=list(SAMPLING_NAMES)),
        # physical LPS: x = right-to-left, y = anterior-to-posterior, z = inferior-to-superior
        "x_mm": mm[:, 2],
        "y_mm": mm[:, 1],
        "z_mm": mm[:, 0],
        "x_index": index[:, 2],
        "y_index": index[:, 1],
        "z_index": index[:, 0],
    }
    if emb.organ_id is not None and emb.purity is not None:
        table["organ_id"] = emb.organ_id
        table["organ"] = emb.organ_labels()
        table["purity"] = emb.purity
    if projection is not None:
        table[f"{method}_0"] = projection[:, 0]
        table[f"{method}_1"] = projection[:, 1]
    if clusters is not None:
        table["cluster"] = clusters
    if quality is not None:
        names = {0: "background", -1: "", **emb.organ_names}
        table["evaluated"] = quality.evaluated
        table["slab"] = quality.slab
        table["knn_organ"] = [names.get(int(i), str(i)) for i in quality.prediction]
    return pd.DataFrame(table)


def colour_groups(table: pd.DataFrame, by: str = "organ") -> list[tuple[str, tuple[float, ...], np.ndarray]]:
    """Legend entries ``(name, RGBA, row indices)`` of a patch table, largest group first.

    ``by="organ"`` uses the organ colours of the Labels layers (`core.labels.organ_colour`), background in
    translucent grey; ``by="cluster"`` uses matplotlib's tab20 cycle, HDBSCAN noise (-1) in grey.
    """
    import matplotlib

    if by not in table.columns:
        what = "a label map" if by == "organ" else "a clustering"
        raise DagmanInputError(f"the table has no '{by}' column: compute with {what} to colour by {by}")
    values = table[by].to_numpy()
    grey = (0.6, 0.6, 0.6, 0.45)
    tab20 = matplotlib.colormaps["tab20"]
    groups = []
    for value in pd.unique(values):
        rows = np.flatnonzero(values == value)
        if by == "organ":
            name = str(value)
            rgba = grey if name == "background" else organ_colour(name)
        else:
            name = "noise" if int(value) < 0 else f"cluster {int(value)}"
            rgba = grey if int(value) < 0 else tuple(tab20(int(value) % 20))
        groups.append((name, tuple(float(c) for c in rgba), rows))
    groups.sort(key=lambda g: (-len(g[2]), g[0]))
    return groups


def require_parquet() -> None:
    """Refuse Parquet early, with one line, when neither pyarrow nor fastparquet is installed."""
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
        raise DagmanInputError("Parquet needs pyarrow (pip install pyarrow); or write the table as CSV")


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> str:
    """Write a patch table as CSV, or as Parquet when ``path`` ends in ``.parquet``; return the path."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        require_parquet()
        atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    else:
        atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))
    return str(path)


def write_results(result: EmbeddingResult, out: str | os.PathLike) -> dict[str, str]:
    """Write the table (CSV or Parquet), ``metrics.json`` (with labels) and ``config.json``; return the paths."""
    out = Path(out)
    config = result.config
    paths = {"table": write_table(result.table, out / f"patches.{config.table_format}")}
    if result.metrics is not None:
        atomic_write_text(out / "metrics.json", json.dumps(result.metrics, indent=2) + "\n")
        paths["metrics"] = str(out / "metrics.json")
    used = result.embeddings.settings.get("which")
    if config.features == "encoder" and used and config.which == "auto":
        config = config.replace(which=str(used))  # record the encoder "auto" resolved to
    config.save(out / "config.json")
    paths["config"] = str(out / "config.json")
    return paths
