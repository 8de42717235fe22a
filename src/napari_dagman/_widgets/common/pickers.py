"""Choosers that start from what is open: paths, devices, layer pickers that follow the viewer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Select

if TYPE_CHECKING:
    import napari


# --- pickers ----------------------------------------------------------------------------------------------------
def path_text(edit: Any) -> str:
    """The path typed in a magicgui FileEdit; "" when it is empty (an emptied FileEdit can read ".")."""
    value = edit.line_edit.value.strip()
    return "" if value in ("", ".") else value


class DeviceComboBox(ComboBox):
    """The devices that are really there: auto, each CUDA GPU with its name and free memory, mps, cpu."""

    def __init__(self, label: str = "device", value: str | None = None, **kwargs: Any) -> None:
        super().__init__(label=label, choices=self._choices, **kwargs)
        self.tooltip = "auto picks cuda > mps > cpu; GPUs are listed with their free memory"
        if value is not None:
            self.select(value)

    @staticmethod
    def _choices(_widget: Any = None) -> list[tuple[str, str]]:
        from napari_dagman.core.devices import available_devices

        return [(d.label, d.name) for d in available_devices()]

    def select(self, name: str) -> None:
        """Select a device by name when it is still available (a remembered GPU may be gone)."""
        if name in [v for _, v in self._choices()]:
            self.value = name


#: ``layer.metadata`` key that marks the layers the docks draw (previews, maps, masks): never offered as inputs.
OUTPUT_KEY = "dagman_output"


def is_output_layer(layer: Any) -> bool:
    """True for a layer a napari-dagman dock made (a preview, an attention map, a mask)."""
    return bool(getattr(layer, "metadata", {}).get(OUTPUT_KEY))


def _layer_choices(
    viewer: napari.viewer.Viewer, layer_type: type, where: Callable[[Any], bool] | None
) -> Callable[[Any], list]:
    def choices(_widget: Any = None) -> list:
        return [
            layer
            for layer in viewer.layers
            if isinstance(layer, layer_type) and (where is None or where(layer))
        ]

    return choices


def _is_empty(widget: Any) -> bool:
    value = widget.value
    return value is None or (isinstance(value, list | tuple) and not value)


def preselect(viewer: napari.viewer.Viewer, widget: Any, candidates: Sequence[Any]) -> None:
    """Choose a layer for an empty picker: the active layer when it is a candidate, else the only candidate.

    A picker the user has set is left alone; several candidates and none active leave the choice to the user;
    a layer a dock drew (a preview, a prediction) is never chosen for the user.
    """
    candidates = [layer for layer in candidates if not is_output_layer(layer)]
    if not candidates or not _is_empty(widget):
        return
    active = viewer.layers.selection.active
    chosen = active if active in candidates else (candidates[0] if len(candidates) == 1 else None)
    if chosen is not None:
        widget.value = [chosen] if isinstance(widget, Select) else chosen


def _follow_layers(
    viewer: napari.viewer.Viewer, widget: Any, choices: Callable[[Any], list], choose: bool = True
) -> None:
    """Keep a picker's choices in step with the layer list; with ``choose``, it starts from the active or only
    layer (`preselect`) and a layer opened while it is empty is chosen (not one a dock drew)."""

    def on_inserted(event: Any) -> None:
        widget.reset_choices()
        layer = event.value
        if choose and _is_empty(widget) and layer in choices() and not is_output_layer(layer):
            widget.value = [layer] if isinstance(widget, Select) else layer

    viewer.layers.events.inserted.connect(on_inserted)
    for event in (viewer.layers.events.removed, viewer.layers.events.moved):
        event.connect(widget.reset_choices)
    if choose:
        preselect(viewer, widget, choices())


def layer_combo(
    viewer: napari.viewer.Viewer,
    layer_type: type,
    label: str,
    *,
    nullable: bool = False,
    tooltip: str = "",
    where: Callable[[Any], bool] | None = None,
    choose: bool = True,
) -> ComboBox:
    """A ComboBox of the viewer's layers of one type that follows layers being added, removed or moved.

    ``where`` filters further (e.g. ``lambda layer: not is_output_layer(layer)``); ``choose`` starts it from the
    active or only layer (see `preselect`; False leaves an optional picker empty until the user chooses).
    """
    choices = _layer_choices(viewer, layer_type, where)
    combo = ComboBox(label=label, choices=choices, nullable=nullable, tooltip=tooltip)
    active = viewer.layers.selection.active
    # magicgui starts on the first layer: the active one is the likelier choice
    if choose and not nullable and active in choices():
        combo.value = active
    _follow_layers(viewer, combo, choices, choose)
    return combo


def layer_picker(
    viewer: napari.viewer.Viewer,
    kind: str = "image",
    label: str | None = None,
    *,
    tooltip: str = "",
    inputs_only: bool = True,
    choose: bool = True,
) -> ComboBox:
    """A `layer_combo` of the viewer's Image (``kind="image"``) or Labels layers; a labels picker may be left
    empty. ``inputs_only`` leaves out the layers the docks drew (previews, maps, predictions); ``choose`` starts
    it from the active or only layer."""
    import napari

    return layer_combo(
        viewer,
        napari.layers.Image if kind == "image" else napari.layers.Labels,
        label or kind,
        nullable=kind != "image",
        tooltip=tooltip,
        where=(lambda layer: not is_output_layer(layer)) if inputs_only else None,
        choose=choose,
    )


def layer_select(
    viewer: napari.viewer.Viewer,
    layer_type: type,
    label: str,
    *,
    tooltip: str = "",
    where: Callable[[Any], bool] | None = None,
) -> Select:
    """Like `layer_combo`, for choosing several layers at once (a list with multi-selection)."""
    choices = _layer_choices(viewer, layer_type, where)
    select = Select(label=label, choices=choices, tooltip=tooltip)
    _follow_layers(viewer, select, choices)
    return select
