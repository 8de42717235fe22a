"""The pretraining dock's live previews (a part of `PretrainWidget`): every N steps the crop, the class attention,
the chosen mask, the cells the noisy teacher did not see and the method's own pictures, one layer each on the
viewer, updated in place (styled only when created, so the user's changes stay)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman._widgets.common import OUTPUT_KEY, cells_on_voxels, jump_to, log_colormap, upsert_layer

if TYPE_CHECKING:
    from napari_dagman.core.events import PreviewEvent

#: Names of the live preview layers (one each, updated in place).
PREVIEW_CROP = "pretrain preview: crop"
PREVIEW_ATTENTION = "pretrain preview: teacher attention"
PREVIEW_CLASS_ATTENTION = "pretrain preview: class attention"  # a method that trains it without a teacher
PREVIEW_MASK = "pretrain preview: mask"
PREVIEW_UNSEEN = "pretrain preview: unseen by the teacher"
PREVIEW_PICTURE = "pretrain preview: {}"  # a method's own picture, by name
PREVIEW_LAYERS = (PREVIEW_CROP, PREVIEW_ATTENTION, PREVIEW_CLASS_ATTENTION, PREVIEW_MASK, PREVIEW_UNSEEN)
MASK_COLOUR = "#00e5ff"
UNSEEN_COLOUR = "#ff9100"


class PretrainPreviews:
    """Live preview layers of `PretrainWidget` (its attributes are the dock's).

    It answers `TrainingDock._on_job_event`, so it comes before `TrainingDock` in the dock's bases.
    """

    # --- previews from the job (main thread) ------------------------------------------------------------------
    def _on_job_event(self, event: Any) -> None:
        from napari_dagman.core.events import PreviewEvent

        if isinstance(event, PreviewEvent):
            # one layer per event-loop turn: beside another run on a busy machine a whole preview held napari's
            # thread 0.5-1.4 s (`benchmarks/ui_latency.py --competitor`)
            self.drawing.add(self._preview_pieces(event))

    def _on_preview(self, event: PreviewEvent) -> None:
        """The crop, the class attention, the mask and the unseen cells of this step, one layer each, in place."""
        for piece in self._preview_pieces(event):
            piece()

    def _preview_pieces(self, event: PreviewEvent) -> list[Callable[[], None]]:
        """`_on_preview` as pieces, each one layer (or the camera), to run one per event-loop turn."""
        pieces = [lambda: self._crop_layer(event)]
        capabilities = self.capabilities
        if event.attention is not None and "attention" in capabilities.previews:
            pieces.append(lambda: self._attention_layer(event, capabilities.has_teacher))
        if "mask" in capabilities.previews:
            # outlines of the hidden cells, drawn on the crop's voxels so that they read over the attention
            pieces.append(lambda: self._cell_layer(PREVIEW_MASK, event.mask, event, MASK_COLOUR))
        if event.unseen is not None:
            pieces.append(lambda: self._cell_layer(PREVIEW_UNSEEN, event.unseen, event, UNSEEN_COLOUR))
        for picture in event.pictures:  # the method's own pictures: MiM's masks per level, reconstructions
            pieces.append(lambda picture=picture: self._picture_layer(event, picture))
        if self.follow.value:
            pieces.append(lambda: self._follow_crop(event))
        return pieces

    def _crop_layer(self, event: PreviewEvent) -> None:
        from_layer = event.volume_name in self._trained_layer_names
        self._preview_layer(
            PREVIEW_CROP,
            event.image,
            "image",
            event.image_scale,
            event.image_translate,
            # training on layers: the CT is already there; from files: show what the model saw
            create={"colormap": "gray", "contrast_limits": (0.0, 1.0), "visible": not from_layer},
        )

    def _attention_layer(self, event: PreviewEvent, has_teacher: bool) -> None:
        """Relative attention (x number of tokens): 1 = uniform, on the explorer's one log scale (1/4 to 4) with
        napari's colour bar; additive blending over the CT and a 0-2 stretch made 0.8-1.4 all dark red."""
        from napari_dagman.core.windowing import UNIFORM_RANGE

        mean = event.attention.mean(axis=0) * float(np.prod(event.attention.shape[1:]))
        name = PREVIEW_ATTENTION if has_teacher else PREVIEW_CLASS_ATTENTION
        created = name not in self._viewer.layers
        self._preview_layer(
            name,
            mean.astype(np.float32),
            "image",
            event.attention_scale,
            event.attention_translate,
            create={
                "colormap": log_colormap("inferno", *UNIFORM_RANGE),
                "blending": "translucent",
                "opacity": 0.7,
                "contrast_limits": UNIFORM_RANGE,
            },
        )
        if created and hasattr(self._viewer.layers[name], "colorbar"):
            self._viewer.layers[name].colorbar.visible = True

    def _picture_layer(self, event: PreviewEvent, picture: Any) -> None:
        from napari_dagman.core.volume import grid_placement

        scale, translate = grid_placement(event.image_translate, event.image_scale, picture.factor)
        labels = picture.kind == "labels"
        self._preview_layer(
            PREVIEW_PICTURE.format(picture.name),
            picture.array,
            "labels" if labels else "image",
            scale,
            translate,
            create={"opacity": 0.5} if labels else {"colormap": "gray", "visible": False},
        )
        self._picture_layers.add(PREVIEW_PICTURE.format(picture.name))

    def _follow_crop(self, event: PreviewEvent) -> None:
        centre = np.asarray(event.image_translate) + (np.asarray(event.image.shape) - 1) / 2 * np.asarray(
            event.image_scale
        )
        current = np.asarray(self._viewer.dims.point)[-3:]
        if abs(current[0] - centre[0]) > event.image_scale[0] * event.image.shape[0] / 2:
            # only when the slice shown is outside the crop: moving the slider re-slices every layer
            jump_to(self._viewer, centre, center_camera=False)

    def _cell_layer(self, name: str, cells: np.ndarray, event: PreviewEvent, colour: str) -> None:
        """Cells of the mask grid as outlines on the crop's voxels."""
        self._preview_layer(
            name,
            cells_on_voxels(cells.astype(np.uint8), event.mask_scale, event.image_scale),
            "labels",
            event.image_scale,
            event.image_translate,
            create={"colormap": {1: colour, None: "transparent"}, "opacity": 0.9, "contour": 1},
        )

    def _preview_layer(
        self,
        name: str,
        data: np.ndarray,
        layer_type: str,
        scale: list[float],
        translate: list[float],
        *,
        create: dict[str, Any],
        **update: Any,
    ) -> None:
        """Update ``name`` in place; style it only when it is created, so the user's changes stay."""
        kwargs: dict[str, Any] = {"scale": scale, "translate": translate, **update}
        created = name not in self._viewer.layers
        if created:
            kwargs["metadata"] = {OUTPUT_KEY: "pretrain-preview"}
            kwargs.update({k: v for k, v in create.items() if k != "contour"})
        layer = upsert_layer(self._viewer, name, data, layer_type, **kwargs)
        if created and "contour" in create:  # not an add_labels() argument
            layer.contour = create["contour"]

    def hide_previews(self) -> None:
        """Hide the live preview layers of the last run."""
        for name in (*PREVIEW_LAYERS, *self._picture_layers):
            if name in self._viewer.layers:
                self._viewer.layers[name].visible = False

    def remove_previews(self) -> None:
        """Remove the live preview layers of the last run."""
        for name in (*PREVIEW_LAYERS, *self._picture_layers):
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
        self._picture_layers.clear()
