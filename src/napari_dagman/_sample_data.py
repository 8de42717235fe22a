"""napari sample data: the synthetic CT phantom with its organ labels, generated in memory (no download)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # _layers pulls in pandas; keep plugin discovery light
    from napari_dagman._layers import LayerData


def sample_phantom() -> list[LayerData]:
    """The default phantom (seed 0) as an Image layer in HU and a Labels layer with organ names.

    Returns
    -------
    list of LayerData
        ``[(ct, image_kwargs, "image"), (labels, labels_kwargs, "labels")]`` at physical scale.
    """
    # imported here so that napari's plugin discovery does not pay for scipy and pandas
    from napari_dagman import _layers
    from napari_dagman._reader import keep_radiological
    from napari_dagman.core.phantom import make_phantom

    keep_radiological()
    ct, labels = make_phantom()
    return [
        _layers.image_layer_data(ct, name="phantom CT"),
        _layers.labels_layer_data(labels, name="phantom organs"),
    ]
