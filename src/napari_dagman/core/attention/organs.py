"""Where each head looks, organ by organ: its attention mass per organ against the organ's share of the volume.

For a head, the attention share of an organ is the sum of the head's map over the organ's voxels divided by the
sum over every voxel the map covers; the volume share is the organ's voxel count over the same voxels. Their
ratio is the **enrichment**: 1 = the head looks at the organ as much as a uniform map would, 2 = twice as much,
0 = never. A head that puts all its attention inside one organ has enrichment 1 / that organ's volume share.
The map is resampled (linear) onto the label map's grid, so each voxel counts once, whatever the token size.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from napari_dagman.core.attention.maps import AttentionMaps
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.volume import Volume

COLUMNS = ("head", "id", "organ", "attention_share", "volume_share", "enrichment")


def maps_on_grid(maps: AttentionMaps, reference: Volume) -> list[np.ndarray]:
    """Each head's map (and the mean, last) resampled linearly onto ``reference``'s grid; 0 outside the maps."""
    from napari_dagman.core.io import resample_like

    volumes = maps.volumes()
    names = [f"head{h}" for h in range(maps.maps.shape[0])] + ["mean"]
    return [np.asarray(resample_like(volumes[n], reference, is_label=False, default=0.0).array) for n in names]


def attention_by_organ(
    maps: AttentionMaps, labels: Volume, names: Mapping[int, str], *, within: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per head (``0``, ``1``, ... and ``mean``) and organ: attention share, volume share, enrichment.

    ``labels`` is a label map (any grid: the maps are resampled onto it); ``names`` the organs to report (id ->
    name). ``within`` (bool, on the label grid) limits the voxels that count, e.g. to the body; by default every
    voxel the maps cover.
    """
    ids = np.asarray(labels.array)
    on_grid = maps_on_grid(maps, labels)
    covered = on_grid[-1] > 0 if within is None else np.asarray(within, bool)
    if not covered.any():
        raise DagmanInputError("the attention maps and the label map do not overlap")
    total_voxels = float(covered.sum())
    heads = [str(h) for h in range(len(on_grid) - 1)] + ["mean"]
    rows = []
    for head, values in zip(heads, on_grid, strict=True):
        mass = float(values[covered].sum())
        for organ, name in names.items():
            inside = covered & (ids == int(organ))
            volume_share = float(inside.sum()) / total_voxels
            share = float(values[inside].sum()) / mass if mass > 0 else float("nan")
            rows.append(
                {
                    "head": head,
                    "id": int(organ),
                    "organ": str(name),
                    "attention_share": share,
                    "volume_share": volume_share,
                    "enrichment": share / volume_share if volume_share > 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))
