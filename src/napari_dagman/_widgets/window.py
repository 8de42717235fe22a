"""CT window presets dock: sets an Image layer's contrast limits; the data are never touched.

It starts on the active (or only) image layer, and choosing a preset applies it at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton

from napari_dagman._widgets.common import layer_combo, scroll_body
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.windowing import DEFAULT_WINDOW, WINDOW_PRESETS, window_limits

if TYPE_CHECKING:
    import napari


class WindowWidget(Container):
    """Pick an Image layer and a CT window (abdomen, lung, bone, brain, liver, mediastinum or custom W/L)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        import napari

        super().__init__(labels=True)
        self._viewer = napari_viewer
        # starts on the active or only image layer, and follows layers being opened and closed
        self._layer = layer_combo(napari_viewer, napari.layers.Image, "image", nullable=True)
        self._preset = ComboBox(label="window", choices=[*WINDOW_PRESETS, "custom"], value=DEFAULT_WINDOW)
        self._width = FloatSpinBox(label="width (HU)", min=1, max=10000, step=10)
        self._level = FloatSpinBox(label="level (HU)", min=-2000, max=4000, step=10)
        self._apply = PushButton(text="Apply")
        self._is_ct = CheckBox(
            text="it is a CT",
            tooltip="an image with few whole-number values is refused as a label map by every job; tick this if this "
            "layer really is a CT (the CLI's NAPARI_DAGMAN_IMAGE_IS_CT=1)",
        )
        self._status = Label(value="")
        self.extend([self._layer, self._preset, self._width, self._level, self._apply, self._is_ct, self._status])
        # napari docks the form's own widget: its rows go in a scroll area inside it, which never grows
        # taller than the rows (the dock gives the space it does not need to the others)
        scroll = scroll_body(self.native)
        scroll.setMaximumHeight(scroll.widget().sizeHint().height() + 2)
        self.native.layout().addStretch(1)  # at the top of its dock
        self._show_preset_values()
        self._follow_layer()
        self._preset.changed.connect(self._on_preset)
        self._apply.changed.connect(self.apply)
        self._layer.changed.connect(self._follow_layer)
        self._is_ct.changed.connect(self._mark_ct)

    def _mark_ct(self, value: bool) -> None:
        layer = self._layer.value
        if layer is not None:
            layer.metadata["is_ct"] = bool(value)

    def _follow_layer(self, _value=None) -> None:
        """Show the window the chosen CT opened with (its DICOM window or its body region's, `opening_window`)."""
        layer = self._layer.value
        metadata = getattr(layer, "metadata", None) or {}
        with self._is_ct.changed.blocked():
            self._is_ct.value = bool(metadata.get("is_ct"))
        window = metadata.get("window")
        if window not in (*WINDOW_PRESETS, "custom"):
            return
        with self._preset.changed.blocked():
            self._preset.value = window
        if window == "custom":
            low, high = layer.contrast_limits
            self._width.value, self._level.value = high - low, (low + high) / 2
        self._show_preset_values()
        reason = layer.metadata.get("window_reason")
        self._status.value = f"{layer.name}: {reason}" if reason else ""

    def _image_layers(self, _widget=None) -> list:
        import napari

        return [layer for layer in self._viewer.layers if isinstance(layer, napari.layers.Image)]

    def _show_preset_values(self) -> None:
        custom = self._preset.value == "custom"
        if not custom:
            window = WINDOW_PRESETS[self._preset.value]
            self._width.value, self._level.value = window.width, window.level
        self._width.enabled = self._level.enabled = custom

    def _on_preset(self, _value=None) -> None:
        self._show_preset_values()
        self.apply()

    def apply(self, _value=None) -> None:
        """Set the chosen layer's contrast limits to the window (display only)."""
        from napari.utils.notifications import show_warning

        layer = self._layer.value
        if layer is None:
            layers = self._image_layers()
            if not layers:
                show_warning("No image layer to window: open a CT first")
                return
            layer = layers[-1]
            self._layer.value = layer
        try:
            limits = window_limits(self._preset.value, width=self._width.value, level=self._level.value)
        except DagmanInputError as err:
            show_warning(str(err))
            return
        lo, hi = layer.contrast_limits_range
        # widen the slider range when the window reaches beyond the data (e.g. brain window on a phantom)
        layer.contrast_limits_range = (min(lo, limits[0]), max(hi, limits[1]))
        layer.contrast_limits = limits
        self._status.value = (
            f"{layer.name}: W {limits[1] - limits[0]:g} / L {(limits[0] + limits[1]) / 2:g} HU"
        )
