"""Radiological orientation in napari's 2D views: superior up in coronal and sagittal, the patient's right on the
screen's left in axial and coronal, anterior on the left in sagittal.

The plugin's volumes are z-y-x arrays in LPS (`core.volume`): z runs inferior -> superior, y anterior -> posterior,
x right -> left. napari draws the first displayed axis downwards and the second to the right, which is already the
radiological axial view; a coronal or sagittal view (z displayed vertically) would put the head at the bottom. So
the vertical axis is flipped up exactly when z is the one displayed vertically, every time the displayed axes
change. Viewers that hold no layer of this plugin's reader (other images) are left as napari draws them.
"""

from __future__ import annotations

import weakref
from typing import Any

#: The array axis that runs inferior -> superior in the plugin's LPS volumes.
SUPERIOR_AXIS = 0

_following: weakref.WeakSet[Any] = weakref.WeakSet()


def radiological_2d(displayed: tuple[int, ...]) -> tuple[str, str]:
    """napari's ``camera.orientation2d`` (vertical, horizontal) for the two displayed axes of an LPS z-y-x volume."""
    vertical = "up" if displayed[0] == SUPERIOR_AXIS else "down"
    return vertical, "right"


def _ours(layer: Any) -> bool:
    """A volume layer of this plugin (read from a file, or the phantom): `_layers` marks them with their kind and
    their LPS direction."""
    meta = getattr(layer, "metadata", {}) or {}
    return meta.get("kind") in ("ct", "labels") and "direction" in meta and getattr(layer, "ndim", 0) >= 3


def apply_radiological(viewer: Any) -> None:
    """Set the 2D camera of ``viewer`` radiologically when it shows the plugin's volumes."""
    if viewer.dims.ndisplay != 2 or not any(_ours(layer) for layer in viewer.layers):
        return
    wanted = radiological_2d(tuple(viewer.dims.displayed))
    if tuple(str(getattr(v, "value", v)) for v in viewer.camera.orientation2d) != wanted:
        viewer.camera.orientation2d = wanted


def follow_radiological(viewer: Any) -> None:
    """Keep ``viewer`` radiological from now on: when layers are added and whenever the displayed axes change
    (rolling the dims, the coronal/sagittal buttons). Once per viewer."""
    if viewer is None or viewer in _following:
        return
    _following.add(viewer)

    def update(*_args: Any) -> None:
        apply_radiological(viewer)

    viewer.dims.events.order.connect(update)
    viewer.dims.events.ndisplay.connect(update)
    viewer.layers.events.inserted.connect(update)
    update()
