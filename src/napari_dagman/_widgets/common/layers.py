"""Layers and volumes: a layer as a `Volume` (with the label-map check), organ names, layers updated in place,
where the viewer is and how to move it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman.core.errors import DagmanInputError

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.volume import Volume


# --- layers <-> volumes --------------------------------------------------------------------------------------------
def volume_from_layer(layer: Any, kind: str = "image") -> Volume:
    """A `Volume` (with the layer's physical placement) from a 3D Image (``kind="image"``) or Labels layer."""
    import napari
    from napari_dagman.core.volume import Volume

    if layer is None:
        raise DagmanInputError(f"no {kind} layer chosen")
    expected = napari.layers.Image if kind == "image" else napari.layers.Labels
    if not isinstance(layer, expected):
        article = "an" if kind == "image" else "a"
        raise DagmanInputError(
            f"'{layer.name}' is a {type(layer).__name__} layer, not {article} {kind} layer"
        )
    if getattr(layer, "multiscale", False):
        raise DagmanInputError(f"'{layer.name}' is multiscale; open it as a single-resolution volume")
    if getattr(layer, "rgb", False):
        raise DagmanInputError(f"'{layer.name}' is an RGB image; a CT has one grey value per voxel")
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise DagmanInputError(
            f"'{layer.name}' is {data.ndim}D (shape {data.shape}); a CT volume is 3D (z, y, x)"
        )
    meta = dict(layer.metadata)
    meta.setdefault("name", layer.name)
    if kind == "labels" and not meta.get("label_names"):
        meta_names = label_names_from_features(getattr(layer, "features", None))
        if meta_names:
            meta["label_names"] = meta_names
    volume = Volume.from_layer_data(data, scale=layer.scale, translate=layer.translate, metadata=meta)
    if kind == "image":
        from napari_dagman.core.errors import LabelMapAsCTError
        from napari_dagman.core.io import check_ct

        try:
            check_ct(volume, f"'{layer.name}'")  # refused at Start, in the core's words
        except LabelMapAsCTError as err:
            err.layer_name = layer.name  # the dock offers to read this layer as a CT anyway
            raise
    return volume


def label_names_from_features(features: Any) -> dict[int, str]:
    """Id -> organ name from a Labels layer's ``features`` (`core.labels.names_from_features`)."""
    from napari_dagman.core.labels import names_from_features

    return names_from_features(features)


def layer_label_names(layer: Any) -> dict[int, str]:
    """Id -> name of the organs present in a Labels layer: its features table, else metadata, else defaults."""
    from napari_dagman.core.labels import layer_names

    return layer_names(layer.data, getattr(layer, "features", None), layer.metadata)


def _differs(current: Any, value: Any) -> bool:
    """True unless ``value`` is plainly equal to a layer's ``current`` property (numbers compared as arrays)."""
    try:
        a, b = np.asarray(current, dtype=float), np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        try:
            return bool(current != value)
        except Exception:  # e.g. colormaps that do not compare: set them again
            return True
    return a.shape != b.shape or not np.allclose(a, b)


def upsert_layer(viewer: napari.viewer.Viewer, name: str, data: Any, layer_type: str, **kwargs: Any) -> Any:
    """Update the layer called ``name`` in place (data, placement, properties) or add it once.

    Previews call this on every update, so a run adds one layer per kind, never a new layer per step.
    """
    import napari

    existing = next((layer for layer in viewer.layers if layer.name == name), None)
    # isinstance, not the private _type_string: plugin docks get layers behind napari's public-only proxy
    kind = getattr(napari.layers, layer_type.capitalize())
    if existing is not None and isinstance(existing, kind) and np.ndim(existing.data) == np.ndim(data):
        # every property set re-slices and redraws the layer in the GUI thread: set only what changed
        for key in ("scale", "translate"):
            if key in kwargs and _differs(getattr(existing, key), kwargs[key]):
                setattr(existing, key, kwargs[key])
        existing.data = data
        for key, value in kwargs.items():
            if key in ("scale", "translate", "name"):
                continue
            # constructor-only options (e.g. rgb) cannot change after creation
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                if _differs(getattr(existing, key), value):
                    setattr(existing, key, value)
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    # napari selects a new layer; a preview appearing must not take the user's selection (their CT) away
    active = viewer.layers.selection.active
    layer = getattr(viewer, f"add_{layer_type}")(data, name=name, **kwargs)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer


def cells_on_voxels(
    mask: np.ndarray, cell_scale: Sequence[float], voxel_scale: Sequence[float]
) -> np.ndarray:
    """A mask on a coarse grid (mask cells, tokens) repeated onto the voxel grid it covers.

    Shown with the voxels' scale and the crop's translate, it overlays exactly where the coarse one would
    (see `core.volume.grid_placement`); napari draws Labels outlines in data pixels, so only this form can be
    shown as contours of the hidden region.
    """
    factors = tuple(max(1, int(round(c / v))) for c, v in zip(cell_scale, voxel_scale, strict=True))
    return np.kron(mask, np.ones(factors, dtype=mask.dtype))


def slice_axis(viewer: napari.viewer.Viewer) -> int:
    """The volume axis (of the last three) the viewer slices through: 0 = axial; 0 in a 3D view."""
    dims = viewer.dims
    offset = dims.ndim - 3
    hidden = [a - offset for a in dims.not_displayed if a >= offset]
    return hidden[-1] if hidden else 0


def jump_to(
    viewer: napari.viewer.Viewer, world_point: Any, *, zoom: float | None = None, center_camera: bool = True
) -> None:
    """Show ``world_point`` (z, y, x world mm): slider of the non-displayed axes on it, camera centred on it.

    ``center_camera=False`` only moves the sliders (e.g. to follow a live preview without panning the view).
    """
    point = np.asarray(world_point, dtype=float)
    ndim = viewer.dims.ndim
    if point.shape[0] < ndim:  # layers with extra leading axes (e.g. heads): keep their sliders
        point = np.concatenate([np.asarray(viewer.dims.point[: ndim - point.shape[0]]), point])
    point = point[-ndim:]
    for axis in viewer.dims.not_displayed:
        viewer.dims.set_point(axis, point[axis])
    camera = viewer_camera(viewer)
    if center_camera:
        camera.center = tuple(point[list(viewer.dims.displayed)])
    if zoom is not None:
        camera.zoom = zoom


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9 (``viewer.camera`` is deprecated there),
    ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return getattr(scene, "camera", None) or viewer.camera


def log_colormap(name: str, low: float, high: float) -> Any:
    """A napari colour map that spreads ``name`` logarithmically over [low, high]: the layer keeps values in x
    uniform (what hovering shows) while its colours follow log(x), as the tiles' colour bar does."""
    import matplotlib
    from napari.utils.colormaps import Colormap

    values = np.geomspace(low, high, 65)
    controls = (values - low) / (high - low)
    controls[0], controls[-1] = 0.0, 1.0
    colours = matplotlib.colormaps[name](np.linspace(0.0, 1.0, len(values)))
    return Colormap(colours, controls=controls, name=f"{name} (log x uniform)")
