"""The explorer's controls (each with its tooltip) and its plain words: a one-line reading per figure, the model
line and the head-diversity line of one run or two.

The options the attention job takes (network, weights, device, where, overlap, map grid, mask ratio, teacher
noise, seed) come from `AttentionConfig` through `ConfigForm`, so their limits and help are those of the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox

from napari_dagman._widgets.common import (
    DeviceComboBox,
    Settings,
    is_output_layer,
    layer_combo,
    layer_picker,
)
from napari_dagman._widgets.common.forms import ConfigForm
from napari_dagman._widgets.explorer.layers import RENDERINGS
from napari_dagman._widgets.explorer.tiles import DROPPED, MASK_COLOURS

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.attention import AttentionResult

SCOPE_CHOICES = [
    ("crop around the cursor", "crop"),
    ("displayed slice (2D model)", "slice"),
    ("whole volume (sliding window)", "volume"),
]
SUBTOKEN_TEXT = {1: "token (raw grid)", 2: "1/2 token", 4: "1/4 token"}
SHOW_CHOICES = [*MASK_COLOURS, DROPPED, "none"]
#: Colour maps of the attention; the first is the default (diverging around uniform on the log scale).
COLORMAPS = ["coolwarm", "inferno", "turbo", "viridis"]
HELP_FILE = Path(__file__).resolve().parents[3] / "docs" / "attention.md"
READ_HEADS = (
    "Each tile: the CT on the slice napari shows, one head's attention over it. Colour = x uniform on one fixed, "
    "logarithmic scale for every head and run: 1 (the middle) is what every token would get if all were equal, 2 "
    "twice that, 1/2 half. A tile titled 'flat' stays within 2/3 - 3/2 of uniform: its colours are a ripple, not a "
    "pattern. Read the checks below before reading a map. Click a tile to show that head as the napari layer."
)
READ_PICTURES = (
    "This method does not train the class attention, so there is no attention to show. The tiles show what the "
    "method itself makes of the crop (e.g. MiM's masks per level, MIRAM's reconstructions); click one to show it "
    "as the napari layer."
)
READ_DIFFERENCE = " Difference: red where the first run looks more than the second, blue where less."
READ_MASKS = (
    "'this run': the cells this run hides from its student for this crop and seed, drawn with its own recipe (its "
    "strategy, ratio, jitter, share of masked images and teacher noise; a new seed is a new draw). Tick 'every "
    "strategy' to compare: random and block ignore the image; attention-high hides what the teacher looks at most, "
    "attention-low the least, attention-hint shows a few of the most looked-at again; noisy teacher is "
    "attention-high with some cells dropped from the teacher's input (white: the cells it did not see)."
)
READ_CHECKS = (
    "Before reading the maps: is each head flat, is the map different from what an untrained network draws, does it "
    "only follow intensity, does it survive a shift of the crop? Hover a sentence for its figures."
)
READ_DIVERSITY = (
    "Head diversity: 0 = every head looks at the same places (collapsed heads), 1 = the heads' maps are unrelated. "
    "DAGMaN's claim is that its noisy teacher keeps it higher. Entropy: 1 = a head spreads its attention evenly, "
    "0 = on one token."
)
OPTION_FIELDS = (
    "which", "weights", "device", "scope", "overlap", "subtoken", "checks", "check_seeds", "strategies", "ratio",
    "noise_rate", "seed",
)  # fmt: skip


@dataclass
class ExplorerControls:
    """Every control of the explorer dock; the dock exposes each as an attribute of the same name."""

    options: ConfigForm  # the attention job's options, as `AttentionConfig` fields
    image: ComboBox
    run: FileEdit
    compare: FileEdit
    organs: ComboBox
    which: ComboBox
    weights: ComboBox
    device: ComboBox
    scope: ComboBox
    overlap: Any
    subtoken: ComboBox
    smooth: CheckBox
    colormap: ComboBox
    stretch: CheckBox
    checks: CheckBox
    check_seeds: Any
    strategies: ComboBox
    ratio: Any
    noise_rate: Any
    seed: Any
    show_mask: ComboBox
    contour: CheckBox
    follow: CheckBox
    rendering: ComboBox
    threshold: FloatSpinBox
    on_image_grid: CheckBox


def explorer_controls(viewer: napari.viewer.Viewer, settings: Settings) -> ExplorerControls:
    """The explorer's controls, with their tooltips, starting from the remembered device, colour map and smooth."""
    options = _job_options(settings)
    return ExplorerControls(
        options=options,
        **{name: options[name] for name in OPTION_FIELDS},
        **_input_controls(viewer),
        **_display_controls(settings),
    )


def _job_options(settings: Settings) -> ConfigForm:
    """The attention job's options as an `AttentionConfig` form, with the explorer's own choices and words."""
    from napari_dagman.core.config import AttentionConfig

    ready = {
        "which": ComboBox(
            label="network",
            choices=[("auto", "auto")],
            tooltip="whose attention: the encoders the run publishes, by their names (DAGMaN's masks are chosen by "
            "its teacher's attention); only Swin encoders have attention",
        ),
        "weights": ComboBox(label="weights", choices=["last", "best"], tooltip="last or best checkpoint"),
        "scope": ComboBox(
            label="where",
            choices=SCOPE_CHOICES,
            value="crop",
            tooltip="a ROI crop around the cursor (or the view centre), the displayed axial slice (2D models), "
            "or every sliding window of the volume",
        ),
        "strategies": ComboBox(
            label="masks",
            choices=[("this run's", "run"), ("every strategy", "all")],
            value="run",
            tooltip="the mask this run draws (its own recipe), or every strategy beside it at the run's ratio",
        ),
        "device": DeviceComboBox(value=settings.get("device", "auto")),
    }
    options = ConfigForm(
        AttentionConfig,
        OPTION_FIELDS,
        widgets=ready,
        labels={
            "overlap": "window overlap",
            "subtoken": "map grid",
            "noise_rate": "teacher noise",
            "ratio": "mask ratio",
            "checks": "sanity checks",
            "check_seeds": "random networks",
        },
        steps={"overlap": 0.05, "noise_rate": 0.05},
        choice_text={"subtoken": SUBTOKEN_TEXT},
    )
    options["subtoken"].tooltip = (
        "maps finer than one token by shifted-window inference (whole volume and displayed slice; a crop is one "
        "window, on the token grid)"
    )
    return options


def _input_controls(viewer: napari.viewer.Viewer) -> dict[str, Any]:
    """What to look at: the CT, the run (and one to compare with) and an optional label map of organs."""
    import napari

    return {
        "image": layer_combo(
            viewer,
            napari.layers.Image,
            "image",
            where=lambda layer: not is_output_layer(layer),
            tooltip="the CT to look at (HU); it is resampled to the run's spacing as in training",
        ),
        "run": FileEdit(
            label="run folder", mode="d", tooltip="a pretraining run folder (config.json + weights)"
        ),
        "compare": FileEdit(
            label="compare with",
            mode="d",
            tooltip="optional: a second pretraining run of the same architecture, shown beside the first with "
            "the difference of their mean maps",
        ),
        "organs": layer_picker(
            viewer,
            "labels",
            "organs",
            tooltip="optional: a label map of the CT; gives each head's attention per organ (table and bars)",
        ),
    }


def _display_controls(settings: Settings) -> dict[str, Any]:
    """How it is shown: smooth, colour map and stretch, the mask layer, following clicks, 3D and the export grid."""
    return {
        "smooth": CheckBox(
            label="smooth",
            value=bool(settings.get("smooth", False)),
            tooltip="interpolate the maps linearly onto the CT (untick: the raw grid, one value per token or cell)",
        ),
        "colormap": ComboBox(
            label="colormap",
            choices=COLORMAPS,
            value=settings.get("colormap", COLORMAPS[0])
            if settings.get("colormap") in COLORMAPS
            else COLORMAPS[0],
            tooltip="colour map of the attention (coolwarm: blue below uniform, white at it, red above)",
        ),
        "stretch": CheckBox(
            label="stretch colours",
            value=False,
            tooltip="stretch the colours to the 1st-99th percentiles of the maps shown (the colour bar then says so "
            "and gives the real range); unticked: one fixed logarithmic scale, 1/4 to 4 x uniform, for every head "
            "and run",
        ),
        "show_mask": ComboBox(
            label="show",
            choices=SHOW_CHOICES,
            value="run",
            tooltip="the mask layer shown in napari (or click its tile)",
        ),
        "contour": CheckBox(
            label="outlines only",
            value=True,
            tooltip="draw the mask layers as contours (the attention map under them stays visible); untick to fill",
        ),
        "follow": CheckBox(
            label="click moves the crop",
            value=True,
            tooltip="a click on the CT (pan/zoom mode) moves the crop there and redraws its masks (and its "
            "maps, for a crop)",
        ),
        "rendering": ComboBox(
            label="3D rendering",
            choices=list(RENDERINGS),
            tooltip="how the maps are drawn in napari's 3D view: a surface where they cross the threshold, or "
            "the maximum along each ray of what is above it",
        ),
        "threshold": FloatSpinBox(
            label="3D threshold",
            min=0.0,
            max=100.0,
            step=0.05,
            value=1.2,
            tooltip="x uniform: in 3D only what is above it shows (set to the 90th percentile of the mean map "
            "after each computation)",
        ),
        "on_image_grid": CheckBox(
            label="on the CT grid",
            value=True,
            tooltip="resample the exported maps and masks onto the CT's voxels",
        ),
    }



# --- plain words ----------------------------------------------------------------------------------------------------
def check_lines(result: AttentionResult | None) -> list[tuple[str, str]]:
    """(sentence, figures) of each sanity check of a result (none without checks or without class attention)."""
    if result is None or result.stats is None:
        return []
    return [(f"{s['check']}: {s['text']}", s["figures"]) for s in result.stats.get("sentences", [])]


def model_lines(runs: Sequence[tuple[str, AttentionResult]]) -> str:
    """One line per run: method, network, step, model, the maps' grid, and whether the method has attention."""
    lines = []
    for label, result in runs:
        m = result.model
        text = f"{label} · {m.get('which')} · step {m.get('step')} · {m.get('dims')}D, ROI {m.get('roi')}"
        if result.maps is not None and result.maps.metadata.get("attention_grid"):
            text += f" · maps on cells of {result.maps.metadata['attention_grid']}"
        if not m.get("trains_class_attention", True):
            text += (
                f" · {m.get('method')} does not train the class attention: there is no attention to show; the "
                "tiles show the method's own pictures"
            )
        lines.append(text)
    return "\n".join(lines)


def diversity_lines(
    runs: Sequence[tuple[str, AttentionResult]],
) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """One line per run (diversity of the maps shown, the run's last probe figure, mean entropy) and the figures of
    the runs that have attention."""
    lines, figures = [], []
    for label, result in runs:
        m, probe = result.model, result.model.get("probe", {})
        if not m.get("trains_class_attention", True):
            lines.append(f"{label}: no class attention, no head diversity")
            continue
        d = result.diversity
        logged = probe.get("head_diversity")
        text = f"{label}: diversity of these maps {d['diversity']:.3f} over {d['heads']} heads"
        if logged is not None:
            text += f"; on its probe crops at step {probe.get('step')}: {logged:.3f}"
        text += f"; mean entropy {d['entropy_mean']:.3f}"
        floor = (result.stats or {}).get("head_diversity")
        if floor:  # against what random heads score: the centred measure reads noise as diversity
            above = floor["js_above_chance"] or floor["diversity_above_chance"]
            text += (
                f"; against random heads (JS {floor['js_divergence']:.5f} vs floor {floor['js_noise_floor']:.5f} bits): "
                + ("above chance" if above else "not above chance")
            )
        lines.append(text)
        figures.append((label, d))
    return "\n".join(lines), figures
