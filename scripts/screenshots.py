"""Screenshots of the docks in a real napari window, for the README and the docs.

Run under an X server or Xvfb (a shown window is needed to render; never ``QT_QPA_PLATFORM=offscreen``)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py            # a few minutes on CPU

It opens napari with the synthetic CT phantom, docks the CT-window, pretraining and attention docks, runs a
short tiny pretraining from the pretraining dock (live loss curve, attention and mask preview), then a
whole-volume attention computation and the mask previews in the explorer, and writes
``docs/images/{window_dock,pretrain_dock,attention_explorer}.png`` (each under 400 kB).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 400_000


def spin(seconds: float, until=None) -> None:
    """Keep the Qt event loop running (rendering, worker events) for ``seconds`` or until ``until()``."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until is not None and until()):
        QApplication.processEvents()
        time.sleep(0.01)


def save(viewer, path: Path, width: int = 1400) -> None:
    """Screenshot of the whole window (canvas and docks), scaled to ``width`` and kept under 400 kB."""
    from PIL import Image

    spin(1.5)
    array = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(array[..., :3])
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    colours = 256
    while path.stat().st_size > MAX_BYTES and colours >= 32:  # a palette keeps UI text sharp and small
        image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        colours //= 2
    print(f"wrote {path} ({path.stat().st_size // 1000} kB, {image.width}x{image.height})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNGs")
    parser.add_argument("--steps", type=int, default=24, help="pretraining steps (tiny preset, CPU)")
    args = parser.parse_args(argv)
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("QT_QPA_PLATFORM=offscreen does not render napari: run under xvfb-run", file=sys.stderr)
        return 2
    os.environ.setdefault("NAPARI_DAGMAN_SETTINGS", tempfile.mktemp(suffix=".ini"))

    import napari
    from napari_dagman._sample_data import sample_phantom
    from napari_dagman._widgets.attention import MEAN_LAYER, AttentionWidget
    from napari_dagman._widgets.pretrain import PretrainWidget
    from napari_dagman._widgets.window import WindowWidget

    out = Path(args.out)
    viewer = napari.Viewer(title="napari-dagman", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    for data, kwargs, kind in sample_phantom():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    ct, organs = viewer.layers["phantom CT"], viewer.layers["phantom organs"]
    z_mid = ct.data_to_world((ct.data.shape[0] * 0.55, 0, 0))[0]
    viewer.dims.set_point(0, z_mid)

    # --- CT window dock -------------------------------------------------------------------------------------
    window = WindowWidget(viewer)
    window_dock = viewer.window.add_dock_widget(window, name="CT window", area="right")
    window._layer.value = ct
    window._preset.value = "abdomen"
    window.apply()
    organs.opacity = 0.35
    viewer.reset_view()
    save(viewer, out / "window_dock.png")

    # --- pretraining dock: a short run with the live preview ----------------------------------------------------
    organs.visible = False
    viewer.window.remove_dock_widget(window_dock)
    pretrain = PretrainWidget(viewer)
    viewer.window.add_dock_widget(pretrain, name="Pretraining", area="right")
    pretrain.layers.value = [ct]
    pretrain.preset.value, pretrain.roi.value, pretrain.spacing.value = "tiny", 64, 2.5
    pretrain.batch_size.value, pretrain.length.value, pretrain.preview_every.value = 1, args.steps, 2
    pretrain.device.value = "cpu"
    runs = Path(tempfile.mkdtemp(prefix="dagman-screenshots-"))
    pretrain.runs_folder.value = str(runs)
    pretrain.run_name.value = "dagman-phantom"
    pretrain._sections["Run"].collapse(animate=False)
    if not pretrain.start():
        return 1
    # shoot while it runs (Cancel/Pause buttons, progress, curve), late enough for a curve and a preview
    spin(
        3600,
        until=lambda: len(pretrain.plot.series("loss")[0]) >= max(2, args.steps - 4) or not pretrain.running,
    )
    save(viewer, out / "pretrain_dock.png")
    spin(3600, until=lambda: not pretrain.running)
    if pretrain.last_finished is None:
        print("the pretraining run did not finish", file=sys.stderr)
        return 1

    # --- attention explorer: whole-volume maps, masks of the crop as outlines --------------------------------------
    for name in [layer.name for layer in viewer.layers if layer.name.startswith("pretrain preview")]:
        viewer.layers.remove(name)
    explorer = pretrain.open_in_explorer()
    if explorer is None:  # the plugin is not installed: dock it directly
        explorer = AttentionWidget(viewer)
        viewer.window.add_dock_widget(explorer, name="Attention & mask explorer", area="right")
        explorer.set_run(pretrain.last_finished.run_dir)
    viewer.window.remove_dock_widget(pretrain)  # one dock per picture, so the window keeps its size
    explorer.image.value = ct
    explorer.scope.value = "volume"
    explorer.contour.value = True
    explorer.show_mask.value = "noisy-teacher"
    explorer.compute()
    spin(3600, until=lambda: not explorer.running)
    if explorer.result is None:
        print("the attention computation failed", file=sys.stderr)
        return 1
    viewer.layers[MEAN_LAYER].opacity = 0.6
    preview = explorer.result.preview
    # the slice through the middle of the mask-preview crop, so its outlines show
    z_crop = preview.image_translate[0] + preview.image_scale[0] * (preview.image.shape[0] - 1) / 2
    viewer.dims.set_point(0, z_crop)
    viewer.layers.selection.active = viewer.layers[MEAN_LAYER]
    save(viewer, out / "attention_explorer.png")
    viewer.close()
    return 0


if __name__ == "__main__":  # the pretraining child process re-imports this module: keep the guard
    sys.exit(main())
