"""The explorer's napari layers: one per thing a tile shows (a run's mean map, its heads, a mask, a method's picture,
the difference of two runs), made when a result arrives (the first run) or when its tile is clicked (the second),
updated in place, and styled for 2D (additive over the CT) or 3D (an iso surface at a threshold, or a maximum
intensity projection of what is above it, drawn over the CT).

napari's attenuated MIP is not offered: with a threshold as its lower contrast limit it renders the whole box at
the top colour (tried on the real CT; its attenuation does not change that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman._widgets.common import OUTPUT_KEY, cells_on_voxels, upsert_layer
from napari_dagman._widgets.common.layers import log_colormap
from napari_dagman._widgets.explorer.tiles import DROPPED_COLOUR, MASK_COLOURS, Contrast

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.attention import AttentionMaps, AttentionResult

#: Layer names (one each; a new computation updates them in place). The second run's carry "(second run)".
MEAN_LAYER = "attention: mean"
HEADS_LAYER = "attention: heads"
MASK_LAYER = "mask: {}"
DROPPED_LAYER = "noisy teacher: cells it did not see"
PICTURE_LAYER = "method: {}"
DIFFERENCE_LAYER = "attention: difference of the two runs"
SECOND = " (second run)"
RENDERINGS = (("iso surface", "iso"), ("MIP above the threshold", "mip"))
MAP_STYLE = {"blending": "additive", "opacity": 0.7}
EXPLORER = "attention-explorer"  # the layers' OUTPUT_KEY: made by this dock


def layer_name(key: tuple) -> str:
    """The layer a tile's key shows."""
    kind, run = key[0], (key[1] if len(key) > 1 else 0)
    tag = SECOND if run else ""
    base = {
        "mean": MEAN_LAYER,
        "head": HEADS_LAYER,
        "dropped": DROPPED_LAYER,
        "difference": DIFFERENCE_LAYER,
    }.get(kind)
    if base is None:
        base = (MASK_LAYER if kind == "mask" else PICTURE_LAYER).format(key[2])
    return base if kind == "difference" else base.replace(":", f"{tag}:", 1)


def verdict(result: AttentionResult | None, key: tuple) -> str:
    """What a map layer's name says about its maps: " (flat)" for a flat mean, the flat heads for the heads."""
    if result is None or result.maps is None or key[0] not in ("mean", "head"):
        return ""
    from napari_dagman._widgets.explorer.tiles import map_facts

    if key[0] == "mean":
        return " (flat)" if map_facts(result, None)["flat"] else ""
    flat = [h for h in range(result.maps.maps.shape[0]) if map_facts(result, h)["flat"]]
    if not flat:
        return ""
    return (
        " (all flat)" if len(flat) == result.maps.maps.shape[0] else f" (flat: {', '.join(map(str, flat))})"
    )


def base_name(name: str) -> str:
    """A layer's name without the verdict `verdict` appends."""
    for tail in (" (flat)", " (all flat)"):
        if name.endswith(tail):
            return name[: -len(tail)]
    if " (flat: " in name and name.endswith(")"):
        return name[: name.rindex(" (flat: ")]
    return name


@dataclass
class MapStyle:
    """How the maps are shown: colour map, the shared scale, smooth (linear) or raw-grid, the 3D rendering."""

    colormap: str = "coolwarm"
    contrast: Contrast | None = None
    smooth: bool = False
    rendering: str = "iso"
    threshold: float = 1.2
    top: float = 2.0  # the top of the 3D MIP's colour scale: the mean map's highest values
    difference_limit: float = 1.0


class ExplorerLayers:
    """Makes and shows the explorer's layers in a viewer."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.results: list[AttentionResult | None] = [None, None]
        self.difference: AttentionMaps | None = None
        self.style = MapStyle()

    # --- making layers -----------------------------------------------------------------------------------------
    def find(self, name: str) -> Any:
        """The explorer's layer called ``name``, whatever verdict its name carries now (None if there is none)."""
        return next((layer for layer in self.viewer.layers if base_name(layer.name) == name), None)

    def output(
        self, name: str, data: np.ndarray, kind: str, create: dict[str, Any], suffix: str = "", **kwargs: Any
    ) -> Any:
        """Upsert a layer; style it only when it is created so the user's tweaks survive updates. ``suffix`` (the
        maps' verdict) is part of the shown name and follows each new result."""
        existing = self.find(name)
        if existing is not None and existing.name != name + suffix:
            existing.name = name + suffix
        if existing is None:
            kwargs.update(create)
            kwargs["metadata"] = {OUTPUT_KEY: EXPLORER}
        return upsert_layer(self.viewer, name + suffix, data, kind, **kwargs)

    def layer(self, key: tuple) -> Any:
        """The layer of a tile, made or updated from the current results (None when there is nothing to show)."""
        kind, run = key[0], (key[1] if len(key) > 1 else 0)
        if kind == "difference":
            return self._maps_layer(key, self.difference)
        result = self.results[run]
        if result is None:
            return None
        if kind in ("mean", "head"):
            return self._maps_layer(key, result.maps)
        if kind in ("mask", "dropped"):
            return self._mask_layer(key, result)
        if kind == "picture" and result.pictures is not None:
            return self._picture_layer(key, result)
        return None

    def _maps_layer(self, key: tuple, maps: AttentionMaps | None) -> Any:
        if maps is None:
            return None
        name = layer_name(key)
        common = self._map_properties(key[0] == "difference")
        run = key[1] if len(key) > 1 else 0
        suffix = verdict(self.results[run], key) if key[0] != "difference" else ""
        if key[0] == "head":
            return self.output(
                name,
                np.asarray(maps.maps, np.float32),
                "image",
                {**MAP_STYLE, "visible": False},
                suffix,
                scale=[1.0, *maps.scale],
                translate=[0.0, *maps.translate],
                **common,
            )
        data = maps.mean.astype(np.float32)
        shown = self.output(
            name, data, "image", dict(MAP_STYLE), suffix, scale=maps.scale, translate=maps.translate, **common
        )
        if key[0] == "mean" and run == 0:
            show_colour_bar(shown, [layer for layer in self.map_layers() if layer is not shown])
        return shown

    def _map_properties(self, difference: bool) -> dict[str, Any]:
        style = self.style
        smooth = "linear" if style.smooth else "nearest"
        props: dict[str, Any] = {"interpolation2d": smooth, "interpolation3d": smooth}
        if difference:
            props.update(
                colormap=diverging_colormap(),
                contrast_limits=(-style.difference_limit, style.difference_limit),
            )
            props["blending"] = "translucent"
            return props
        contrast = style.contrast
        low, high = (contrast.low, contrast.high) if contrast else (0.25, 4.0)
        colormap = (
            log_colormap(style.colormap, low, high) if contrast is None or contrast.log else style.colormap
        )
        props.update(colormap=colormap, contrast_limits=(low, high), blending=MAP_STYLE["blending"])
        if self.viewer.dims.ndisplay == 3:
            # drawn over the CT, not added to it: a CT's maximum intensity projection is white wherever bone is
            props.update(rendering=style.rendering, iso_threshold=style.threshold, blending="translucent")
            if style.rendering == "mip":  # below the threshold: transparent, the CT shows through
                props["colormap"] = fading_colormap(style.colormap)
                props["contrast_limits"] = (style.threshold, max(style.top, style.threshold + 1e-3))
        return props

    def _mask_layer(self, key: tuple, result: AttentionResult) -> Any:
        preview = result.preview
        if preview is None:
            return None
        if key[0] == "dropped":
            cells, colour, opacity = preview.teacher_dropped, DROPPED_COLOUR, 0.35
        elif key[2] in preview.masks:
            cells, colour, opacity = preview.masks[key[2]], MASK_COLOURS.get(key[2], "#ffffff"), 0.5
        else:
            return None
        # on the crop's voxels (not one pixel per cell): napari draws Labels outlines in data pixels
        data = cells_on_voxels(np.asarray(cells, np.uint8), preview.mask_scale, preview.image_scale)
        return self.output(
            layer_name(key),
            data,
            "labels",
            {"colormap": {1: colour, None: "transparent"}, "opacity": opacity},
            scale=preview.image_scale,
            translate=preview.image_translate,
        )

    def _picture_layer(self, key: tuple, result: AttentionResult) -> Any:
        pictures = result.pictures
        picture = next((p for p in pictures.pictures if p.name == key[2]), None)
        if picture is None:
            return None
        scale, translate = pictures.placement(picture)
        if picture.kind == "labels":
            kind, create = "labels", {"opacity": 0.5}
        else:
            kind, create = "image", {"colormap": "gray", "visible": False}
        return self.output(layer_name(key), picture.array, kind, create, scale=scale, translate=translate)

    # --- showing -----------------------------------------------------------------------------------------------
    def map_layers(self) -> list[Any]:
        """Every attention layer in the viewer (both runs' means and heads, the difference)."""
        names = [MEAN_LAYER, HEADS_LAYER, DIFFERENCE_LAYER, layer_name(("mean", 1)), layer_name(("head", 1))]
        return [layer for layer in (self.find(n) for n in names) if layer is not None]

    def mask_layers(self) -> list[Any]:
        """Every mask, dropped-cells and picture layer of both runs."""
        kinds = {MASK_LAYER.split(":")[0], PICTURE_LAYER.split(":")[0], DROPPED_LAYER.split(":")[0]}
        return [
            layer
            for layer in self.viewer.layers
            if layer.metadata.get(OUTPUT_KEY) and layer.name.split(":")[0].replace(SECOND, "") in kinds
        ]

    def show(self, key: tuple, *, contour: bool = False) -> Any:
        """Show the layer of a tile alone among its kind (maps or masks); a head moves the heads slider to it."""
        layer = self.layer(key)
        if layer is None:
            return None
        maps = key[0] in ("mean", "head", "difference")
        for other in self.map_layers() if maps else self.mask_layers():
            other.visible = other is layer
        layer.visible = True
        if maps:  # one colour bar on the canvas: the map shown's
            show_colour_bar(layer, self.map_layers())
        if key[0] == "head":
            axis = self.viewer.dims.ndim - layer.ndim  # the heads axis: the first of the layer's four
            labels = list(self.viewer.dims.axis_labels)
            if labels[axis] != "head":  # napari calls it "-4"; its slider is the head shown
                labels[axis] = "head"
                self.viewer.dims.axis_labels = labels
            self.viewer.dims.set_point(axis, float(key[2]))
            for mask in self.mask_layers():  # a head's map alone: the masks (and dropped cells) lay over it
                mask.visible = False
        if (
            key[0] == "mask" and key[1] == 0 and key[2] in ("noisy-teacher", "run")
        ):  # with the cells it did not see
            dropped = self.layer(("dropped", 0))
            if dropped is not None:
                dropped.visible = True
        if not maps and hasattr(layer, "contour"):
            layer.contour = 1 if contour else 0
        return layer

    def prune(self) -> None:
        """Remove the explorer's layers that the current results do not have (a second run no longer compared,
        maps of a run whose method has none, a strategy no longer drawn)."""
        keep = {layer_name(key) for key in self.tile_keys()}
        for layer in [layer for layer in self.viewer.layers if layer.metadata.get(OUTPUT_KEY) == EXPLORER]:
            if base_name(layer.name) not in keep:
                self.viewer.layers.remove(layer)

    def tile_keys(self) -> list[tuple]:
        """Every tile key the current results can show."""
        keys: list[tuple] = [("difference",)] if self.difference is not None else []
        for run, result in enumerate(self.results):
            if result is None:
                continue
            if result.maps is not None:
                keys += [("mean", run), ("head", run, 0)]
            if result.preview is not None:
                keys += [("mask", run, s) for s in result.preview.masks]
                keys += [("dropped", run)] if np.any(result.preview.teacher_dropped) else []
            if result.pictures is not None:
                keys += [("picture", run, p.name) for p in result.pictures.pictures]
        return keys

    def restyle(self) -> None:
        """Apply the style (colour map, scale, smooth, 2D or 3D rendering) to every attention layer shown."""
        for layer in self.map_layers():
            props = self._map_properties(layer.name == DIFFERENCE_LAYER)
            for name, value in props.items():
                if name == "colormap" and layer.name == DIFFERENCE_LAYER:
                    continue  # a custom colour map is set once, when the layer is made
                setattr(layer, name, value)

    def layer_of(self, key: tuple) -> Any:
        """The layer a tile's key shows, if it exists (whatever verdict its name carries)."""
        return self.find(layer_name(key))


def show_colour_bar(layer: Any, others: list[Any]) -> None:
    """napari's colour bar on the canvas for ``layer``'s map (its log scale in x uniform), none for ``others``."""
    for other in others:
        if other is not layer and hasattr(other, "colorbar"):
            other.colorbar.visible = False
    if hasattr(layer, "colorbar"):
        layer.colorbar.visible = True


def fading_colormap(name: str) -> Any:
    """A colour map whose lowest quarter fades to transparent (3D: what is below the threshold shows the CT)."""
    import matplotlib
    from napari.utils.colormaps import Colormap

    colours = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 64))
    colours[:, 3] = np.clip(np.linspace(0.0, 4.0, 64), 0.0, 1.0)
    return Colormap(colours, name=f"{name} (fading)")


def diverging_colormap() -> Any:
    """Blue (the second run looks here more) - transparent (no difference) - red (the first run does)."""
    from napari.utils.colormaps import Colormap

    colours = [
        [0.13, 0.4, 1.0, 1.0],
        [0.13, 0.4, 1.0, 0.5],
        [0, 0, 0, 0],
        [1.0, 0.25, 0.2, 0.5],
        [1.0, 0.25, 0.2, 1.0],
    ]
    return Colormap(colours, name="attention difference", controls=[0.0, 0.25, 0.5, 0.75, 1.0])
