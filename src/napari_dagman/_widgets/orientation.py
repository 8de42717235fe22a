"""Radiological orientation in napari's 2D views: superior up in coronal and sagittal, the patient's right on the
screen's left in axial and coronal, anterior on the left in sagittal.

The plugin's volumes are z-y-x arrays in LPS (`core.volume`): z runs inferior -> superior, y anterior -> posterior,
x right -> left. napari draws the first displayed axis downwards and the second to the right, which is already the
radiological axial view; a coronal or sagittal view (z displayed vertically) would put the head at the bottom. So
the vertical axis is flipped up exactly when z is the one displayed vertically, every time the displayed axes
change. Viewers that hold no layer of this plugin's reader (other images) are left as napari draws them.

Letters at the canvas edges (S/I, R/L, A/P, as every radiology viewer shows them) say which way the patient lies:
four of napari's canvas text overlays, read from the camera's actual orientation, so they stay true whichever
view is shown and if a user flips an axis.
"""

from __future__ import annotations

import weakref
from typing import Any

#: The array axis that runs inferior -> superior in the plugin's LPS volumes.
SUPERIOR_AXIS = 0
#: The patient's direction at the low and the high end of each array axis of an LPS z-y-x volume.
AXIS_ENDS: dict[int, tuple[str, str]] = {0: ("I", "S"), 1: ("A", "P"), 2: ("R", "L")}
#: Where each edge's letter goes on napari's canvas.
LETTER_POSITIONS: dict[str, str] = {
    "top": "top_center",
    "bottom": "bottom_center",
    "left": "middle_left",
    "right": "middle_right",
}
LETTER_KEY = "dagman_orientation_{edge}"

_following: weakref.WeakSet[Any] = weakref.WeakSet()


def radiological_2d(displayed: tuple[int, ...]) -> tuple[str, str]:
    """napari's ``camera.orientation2d`` (vertical, horizontal) for the two displayed axes of an LPS z-y-x volume."""
    vertical = "up" if displayed[0] == SUPERIOR_AXIS else "down"
    return vertical, "right"


def edge_letters(displayed: tuple[int, ...], orientation2d: tuple[str, str]) -> dict[str, str]:
    """The patient direction at each canvas edge for the two displayed array axes and napari's 2D camera
    orientation (vertical "up"/"down": which way the axis' values grow on screen; horizontal "right"/"left")."""
    vertical, horizontal = displayed[-2], displayed[-1]
    low, high = AXIS_ENDS[vertical]
    top, bottom = (high, low) if orientation2d[0] == "up" else (low, high)
    low, high = AXIS_ENDS[horizontal]
    left, right = (low, high) if orientation2d[1] == "right" else (high, low)
    return {"top": top, "bottom": bottom, "left": left, "right": right}


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
    if _orientation2d(viewer) != wanted:
        viewer.camera.orientation2d = wanted


def _orientation2d(viewer: Any) -> tuple[str, str]:
    return tuple(str(getattr(v, "value", v)) for v in viewer.camera.orientation2d)  # type: ignore[return-value]


def show_letters(viewer: Any) -> None:
    """The patient-direction letters at the canvas edges: shown in 2D over the plugin's 3D volumes, else hidden."""
    from napari.components.overlays import TextOverlay

    overlays = viewer.canvas.overlays
    shown = (
        viewer.dims.ndisplay == 2 and viewer.dims.ndim == 3 and any(_ours(layer) for layer in viewer.layers)
    )
    letters = edge_letters(tuple(viewer.dims.displayed), _orientation2d(viewer)) if shown else {}
    for edge, position in LETTER_POSITIONS.items():
        key = LETTER_KEY.format(edge=edge)
        if key not in overlays:
            if not shown:
                continue
            overlays[key] = TextOverlay(position=position, font_size=14, color=(1.0, 0.85, 0.3, 1.0))
        overlay = overlays[key]
        overlay.text = letters.get(edge, "")
        overlay.visible = shown


def follow_radiological(viewer: Any) -> None:
    """Keep ``viewer`` radiological from now on: when layers are added and whenever the displayed axes change
    (rolling the dims, the coronal/sagittal buttons). Once per viewer."""
    if viewer is None or viewer in _following:
        return
    _following.add(viewer)

    def update(*_args: Any) -> None:
        apply_radiological(viewer)
        show_letters(viewer)

    viewer.dims.events.order.connect(update)
    viewer.dims.events.ndisplay.connect(update)
    viewer.layers.events.inserted.connect(update)
    viewer.layers.events.removed.connect(update)
    viewer.camera.events.orientation2d.connect(lambda *_: show_letters(viewer))
    update()
