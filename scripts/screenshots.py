"""Screenshots of the docks in a real napari window, for the README and the docs.

Run under an X server or Xvfb (a shown window is needed to render; never ``QT_QPA_PLATFORM=offscreen``)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py            # a few minutes on CPU

It opens napari with the synthetic CT phantom, docks the CT-window, pretraining and attention docks, runs a
short tiny pretraining from the pretraining dock (live loss curve, attention and mask preview), then a
whole-volume attention computation and the mask previews in the explorer. Then, on the real CT of
``../shared/data`` (``$DAGMAN_SHARED_DATA``) with its label map, it makes a 3-step tiny pretraining run (core
API, as the tests' ``tiny_run``), fine-tunes from it in the fine-tuning dock (curves), predicts in the results
dock, which opens as a tab of the fine-tuning dock (prediction layer, table, click-through to the liver), and
computes a UMAP of the run's patch embeddings in the organ-clusters dock, and classifies the phantom lesion cohort's
table in the lesion-classification dock. It writes ``docs/images/{window_dock,
pretrain_dock,attention_explorer,finetune_dock,results_dock,organ_clusters,classify_dock}.png`` (each under 400 kB);
``--docks`` makes a subset. The docks are opened from the plugin's manifest, as napari's Plugins menu does.
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
DOCKS = ("window", "pretrain", "attention", "finetune", "results", "clusters", "classify", "explorer")
#: Organs of the fine-tuning picture (TotalSegmentator ids): liver, spleen, kidneys, colon, urinary bladder.
FINETUNE_ORGANS = [5, 1, 2, 3, 20, 21]


def spin(seconds: float, until=None) -> None:
    """Keep the Qt event loop running (rendering, worker events) for ``seconds`` or until ``until()``."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until is not None and until()):
        QApplication.processEvents()
        time.sleep(0.01)


def save(viewer, path: Path, width: int = 1400) -> None:
    """Screenshot of the whole window (canvas and docks), scaled to ``width`` and kept under 400 kB."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from PIL import Image

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # "run finished" toasts would cover the canvas
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
    parser.add_argument("--finetune-steps", type=int, default=10, help="fine-tuning steps (CPU)")
    parser.add_argument(
        "--data",
        default=os.environ.get("DAGMAN_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
        help="folder with example_ct.nii.gz and example_seg_fast_force_split.nii.gz (real CT and its labels)",
    )
    parser.add_argument(
        "--docks", nargs="+", choices=DOCKS, default=list(DOCKS), help="the pictures to make (default: all)"
    )
    args = parser.parse_args(argv)
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("QT_QPA_PLATFORM=offscreen does not render napari: run under xvfb-run", file=sys.stderr)
        return 2
    data_dir = Path(args.data)
    docks = set(args.docks)
    if {"finetune", "results", "clusters", "explorer"} & docks and not (data_dir / "example_ct.nii.gz").is_file():
        print(f"real CT not found in {data_dir} (--data or DAGMAN_SHARED_DATA)", file=sys.stderr)
        return 2
    os.environ.setdefault("NAPARI_DAGMAN_SETTINGS", tempfile.mktemp(suffix=".ini"))

    import napari

    out = Path(args.out)
    runs = Path(tempfile.mkdtemp(prefix="dagman-screenshots-"))
    viewer = napari.Viewer(title="napari-dagman", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    steps = [phantom_shots] if {"window", "pretrain", "attention"} & docks else []
    if {"finetune", "results", "clusters", "classify"} & docks:
        steps.append(real_ct_shots)
    if "explorer" in docks:  # the attention explorer's own pictures (docs/attention.md): explorer_shots below
        steps.append(explorer_shots)
    for shots in steps:
        if shots(viewer, out, runs, args) != 0:
            return 1
    viewer.close()
    return 0


def phantom_shots(viewer, out: Path, runs: Path, args: argparse.Namespace) -> int:
    """CT window, pretraining and attention explorer on the synthetic phantom."""
    from napari_dagman._sample_data import sample_phantom
    from napari_dagman._widgets.explorer.dock import MEAN_LAYER, AttentionWidget
    from napari_dagman._widgets.training.pretrain import PretrainWidget
    from napari_dagman._widgets.window import WindowWidget

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
    if "window" in args.docks:
        save(viewer, out / "window_dock.png")
    if not {"pretrain", "attention"} & set(args.docks):
        viewer.window.remove_dock_widget(window_dock)
        viewer.layers.clear()
        return 0

    # --- pretraining dock: a short run with the live preview ----------------------------------------------------
    organs.visible = False
    viewer.window.remove_dock_widget(window_dock)
    pretrain = PretrainWidget(viewer)
    viewer.window.add_dock_widget(pretrain, name="Pretraining", area="right")
    pretrain.layers.value = [ct]
    pretrain.preset.value, pretrain.roi.value, pretrain.spacing.value = "tiny", 64, 2.5
    pretrain.batch_size.value, pretrain.length.value, pretrain.preview_every.value = 1, args.steps, 2
    pretrain.device.value = "cpu"
    pretrain.runs_folder.value = str(runs)
    pretrain.run_name.value = "dagman-phantom"
    fold(pretrain, keep=("Data", "Method"))
    if not pretrain.start():
        return 1
    # shoot while it runs (Cancel/Pause buttons, progress, curve), late enough for a curve and a preview
    spin(
        3600,
        until=lambda: len(pretrain.plot.series("loss")[0]) >= max(2, args.steps - 4) or not pretrain.running,
    )
    if "pretrain" in args.docks:
        # the dock scrolls: show its buttons and curve
        pretrain._scroll.ensureWidgetVisible(pretrain.loss_plot)
        save(viewer, out / "pretrain_dock.png")
    spin(3600, until=lambda: not pretrain.running)
    if pretrain.last_finished is None:
        print("the pretraining run did not finish", file=sys.stderr)
        return 1
    if "attention" not in args.docks:
        viewer.window.remove_dock_widget(pretrain)
        viewer.layers.clear()
        return 0

    # --- attention explorer: whole-volume maps, masks of the crop as outlines --------------------------------------
    explorer = pretrain.open_in_explorer()  # hides the previews, removes them when the explorer has drawn
    if explorer is None:  # the plugin is not installed: dock it directly
        explorer = AttentionWidget(viewer)
        viewer.window.add_dock_widget(explorer, name="Attention & mask explorer", area="right")
        explorer.set_run(pretrain.last_finished.run_dir)
    viewer.window.remove_dock_widget(pretrain)  # one dock per picture, so the window keeps its size
    explorer.image.value = ct
    explorer.scope.value = "volume"
    explorer.contour.value = True
    explorer.show_mask.value = "run"
    explorer.compute()
    spin(3600, until=lambda: not explorer.running)
    if explorer.result is None:
        print("the attention computation failed", file=sys.stderr)
        return 1
    explorer.layers.find(MEAN_LAYER).opacity = 0.6
    preview = explorer.result.preview
    # the slice through the middle of the mask-preview crop, so its outlines show
    z_crop = preview.image_translate[0] + preview.image_scale[0] * (preview.image.shape[0] - 1) / 2
    viewer.dims.set_point(0, z_crop)
    viewer.layers.selection.active = explorer.layers.find(MEAN_LAYER)
    save(viewer, out / "attention_explorer.png")
    viewer.window.remove_dock_widget(dock_of(explorer))
    viewer.layers.clear()
    return 0


def real_ct_shots(viewer, out: Path, runs: Path, args: argparse.Namespace) -> int:
    """Fine-tuning (with the results dock) and organ clusters on the real CT and its label map."""
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    data_dir = Path(args.data)
    os.environ.setdefault("NAPARI_DAGMAN_CACHE", str(runs / "embedding-cache"))  # compute, do not reuse
    # the encoder both docks start from: a 3-step tiny pretraining run on the real CT (the tests' tiny_run)
    run = runs / "tiny-ct"
    print(f"pretraining {run} (tiny, 3 steps) ...", flush=True)
    config = PretrainConfig(
        images=[str(data_dir / "example_ct.nii.gz")],
        out=str(run),
        preset="tiny",
        roi=32,
        spacing=4.0,
        steps=3,
        batch_size=1,
        preview_every=0,
        seed=0,
    )
    consume(run_pretraining(config))
    viewer.open(data_dir / "example_ct.nii.gz", plugin="napari-dagman")
    viewer.open(data_dir / "example_seg_fast_force_split.nii.gz", plugin="napari-dagman")
    ct, seg = viewer.layers[-2], viewer.layers[-1]
    viewer.reset_view()
    if {"finetune", "results"} & set(args.docks) and finetune_shot(viewer, out, runs, ct, seg, run, args):
        return 1
    if "clusters" in args.docks and clusters_shot(viewer, out, ct, seg, run):
        return 1
    if "classify" in args.docks and classify_shot(viewer, out, runs, run):
        return 1
    return 0


def fold(dock, keep=()) -> None:
    """Fold a dock's form sections except ``keep`` (by title), so its buttons and curves show."""
    from superqt import QCollapsible

    for section in dock.findChildren(QCollapsible):
        if section.text() not in keep and not section.text().startswith("more "):
            section.collapse(animate=False)


def fit_window(viewer) -> None:
    """Back to 1600 x 1000 (a tall dock grows the window) and the whole image in the canvas."""
    spin(0.5)  # let the dock layout settle first
    viewer.window._qt_window.resize(1600, 1000)
    spin(1.0)
    viewer.reset_view()


def open_dock(viewer, name: str):
    """Dock this plugin's widget ``name`` as the Plugins menu does and return the real dock once it is built."""
    from napari_dagman._widgets.common.loading import inner_dock

    widget = viewer.window.add_plugin_dock_widget("napari-dagman", name)[1]
    spin(120, until=lambda: inner_dock(widget) is not None)
    return inner_dock(widget)


def dock_of(widget):
    """The QDockWidget that holds ``widget``."""
    from qtpy.QtWidgets import QDockWidget

    while widget is not None and not isinstance(widget, QDockWidget):
        widget = widget.parentWidget()
    return widget


def finetune_shot(viewer, out: Path, runs: Path, ct, seg, run: Path, args: argparse.Namespace) -> int:
    """A short fine-tune from the tiny run in the fine-tuning dock, then Predict & inspect results (a tab)."""
    finetune = open_dock(viewer, "Fine-tuning")
    fold(finetune, keep=("Data",))
    # the dock started from the open CT and its label map
    assert (finetune.image.value, finetune.labels.value) == (ct, seg), "the dock did not preselect the layers"
    finetune.organs.value = FINETUNE_ORGANS
    finetune.init_run.value = str(run)
    finetune.steps.value, finetune.batch_size.value, finetune.lr.value = args.finetune_steps, 1, "3e-3"
    finetune.roi.value, finetune.spacing.value = 64, 6.0  # one 64^3 crop at 6 mm holds the whole CT
    finetune.val_fraction.value, finetune.val_position.value, finetune.val_every.value = 0.25, 0.75, 2
    finetune.device.value = "cpu"
    finetune.runs_folder.value, finetune.run_name.value = str(runs), "finetune-ct"
    finetune.in_process.value = False  # a thread: no child interpreter to start (same dock, same curves)
    # the slab holds 5 of the 6 organs (the bladder is in the pelvis): the first Start says so; start anyway
    if not finetune.start() and not finetune.start():
        print(f"fine-tuning did not start: {finetune.status.text()}", file=sys.stderr)
        return 1
    spin(3600, until=lambda: not finetune.running)
    if finetune.last_finished is None:
        print(f"the fine-tuning run did not finish: {finetune.status.text()}", file=sys.stderr)
        return 1
    fit_window(viewer)
    finetune._scroll.ensureWidgetVisible(finetune.dice_plot)
    if "finetune" in args.docks:
        save(viewer, out / "finetune_dock.png")

    results = finetune.open_results()  # what "Predict & inspect results" does: a tab next to fine-tuning
    results.device.value = "cpu"
    if not results.predict() or not results.wait(600) or results.results is None:
        print(f"the prediction failed: {results.status.text()}", file=sys.stderr)
        return 1
    fit_window(viewer)
    organs = [results.table.item(row, 0).text() for row in range(results.table.rowCount())]
    results.table.selectRow(organs.index("liver"))
    results.go_to_organ(organs.index("liver"))  # a click on the table's liver row
    results._scroll.ensureWidgetVisible(results.table)
    if "results" in args.docks:
        save(viewer, out / "results_dock.png")
    for widget in (results, finetune):
        viewer.window.remove_dock_widget(dock_of(widget))
    for layer in [layer for layer in viewer.layers if layer not in (ct, seg)]:
        viewer.layers.remove(layer)
    return 0


def clusters_shot(viewer, out: Path, ct, seg, run: Path) -> int:
    """UMAP of the tiny run's patch embeddings of the real CT, coloured by organ, a liver patch picked."""
    import numpy as np

    seg.visible, seg.contour, seg.opacity = True, 0, 0.5
    clusters = open_dock(viewer, "Organ clusters")
    assert (clusters.image.value, clusters.labels.value) == (ct, seg), "the dock did not preselect the layers"
    clusters.run.value = str(run)
    clusters.method.value = "umap"
    # the default organ-scale patches (48 mm, stride 24 mm, organ patches too); the tiny run's stage 2 tokens
    # (32 mm) are smaller than a patch
    clusters.form["stage"].value = 2
    clusters.device.value = "cpu"
    print("embedding and UMAP (the first UMAP compiles for up to a minute) ...", flush=True)
    clusters.compute()
    spin(1800, until=lambda: not clusters.runner.running)
    if clusters.result is None:
        print(f"the embedding failed: {clusters.status.text()}", file=sys.stderr)
        return 1
    fit_window(viewer)
    table = clusters.result.table
    clusters.pick(int(np.argmax(table["purity"].to_numpy() * (table["organ_id"].to_numpy() == 5))))
    fold(clusters)
    clusters._scroll.ensureWidgetVisible(clusters.scatter)
    save(viewer, out / "organ_clusters.png")
    viewer.window.remove_dock_widget(dock_of(clusters))
    return 0


def classify_shot(viewer, out: Path, runs: Path, run: Path) -> int:
    """The phantom lesion cohort's table classified with the tiny run's encoder; one lesion's row clicked."""
    from napari_dagman.core.phantom.lesions import make_lesion_cohort

    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    table = make_lesion_cohort(runs / "lesions", cases=4, lesions_per_case=10, seed=0, shape=(64, 96, 96),
                               spacing=(4.5, 3.3, 3.3))  # fmt: skip
    first = sorted((runs / "lesions").glob("case_*.nii.gz"))[0]
    viewer.open(first, plugin="napari-dagman")
    viewer.reset_view()
    classify = open_dock(viewer, "Lesion classification")
    classify.run.value, classify.table.value, classify.out.value = str(run), str(table), str(runs / "classify")
    classify.form.set_values({"shots": "1,5,all", "draws": 5, "device": "cpu"})
    print("classifying the phantom lesions ...", flush=True)
    if not classify.start() or not classify.wait(1800) or classify.finished is None:
        print(f"the classification failed: {classify.status.text()}", file=sys.stderr)
        return 1
    fit_window(viewer)
    classify.go_to(3)
    fold(classify)
    classify._scroll.ensureWidgetVisible(classify.results)
    save(viewer, out / "classify_dock.png")
    viewer.window.remove_dock_widget(dock_of(classify))
    return 0


# --- the attention explorer on the real CT (docs/attention.md, README) ---------------------------------------------
def explorer_shots(viewer, out: Path, runs: Path, args: argparse.Namespace) -> int:
    """Small multiples (heads and masks), attention per organ and two runs compared, in the attention explorer on
    the real CT after two short tiny runs (DAGMaN and AttMask, ROI 64 at 3 mm: a crop of 4 x 4 x 4 tokens).

    After 3 steps an EMA teacher is still its initialisation, so the two runs get different seeds: their maps
    differ, as finished runs' do. Writes ``docs/images/attention_{small_multiples,organs,compare}.png``.
    """
    import numpy as np

    from napari_dagman._widgets.common import viewer_camera
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.segmentation import organ_focus
    from napari_dagman.core.training import consume, run_pretraining

    data_dir = Path(args.data)
    made = {}
    for seed, method in enumerate(("dagman", "attmask")):
        made[method] = runs / f"explorer-{method}"
        print(f"pretraining {made[method]} (tiny, ROI 64, 3 steps) ...", flush=True)
        config = PretrainConfig(images=[str(data_dir / "example_ct.nii.gz")], out=str(made[method]), method=method,
                                preset="tiny", roi=64, spacing=3.0, steps=3, batch_size=1, preview_every=0, seed=seed)
        consume(run_pretraining(config))
    viewer.layers.clear()
    viewer.open(data_dir / "example_ct.nii.gz", plugin="napari-dagman")
    viewer.open(data_dir / "example_seg_fast_force_split.nii.gz", plugin="napari-dagman")
    ct, seg = viewer.layers[-2], viewer.layers[-1]
    seg.visible = False
    explorer = open_dock(viewer, "Attention & mask explorer")
    explorer.image.value, explorer.organs.value = ct, seg
    explorer.set_run(str(made["dagman"]))
    explorer.device.value, explorer.scope.value, explorer.smooth.value = "cpu", "crop", False
    fit_window(viewer)
    # the crop: the body's middle on the liver's largest slice (liver, stomach, spleen, kidneys in one crop)
    z_liver = organ_focus(np.asarray(seg.data), 5, 0)[0]
    viewer.dims.set_point(0, ct.data_to_world((z_liver, 0, 0))[0])
    viewer_camera(viewer).center = ct.data_to_world((z_liver, ct.data.shape[1] * 0.45, ct.data.shape[2] / 2))[1:]
    if not explorer.compute() or not explorer.wait(1800) or explorer.result is None:
        print(f"the explorer failed: {explorer.status.text()}", file=sys.stderr)
        return 1
    spin(60, until=lambda: not explorer._organ_runner.running)
    explorer.show_tile(("head", 0, 1))  # a click on the tile of head 1
    explorer.show_tile(("mask", 0, "run"))
    explorer.contour.value = True
    open_sections(explorer, ("Heads on this slice", "Masks on this slice"))
    explorer._scroll.ensureWidgetVisible(explorer.masks_figure)
    save(viewer, out / "attention_small_multiples.png")

    open_sections(explorer, ("Attention per organ",))
    panel = explorer.organ_panel
    liver = next(r for r in range(panel.table.rowCount()) if panel.organ_of_row(r)[1] == "liver")
    panel.table.selectRow(liver)
    explorer.go_to_organ(5)  # what a click on the liver's row does
    seg.visible, seg.contour = True, 2
    explorer._scroll.ensureWidgetVisible(panel.canvas)
    save(viewer, out / "attention_organs.png")

    seg.visible = False
    explorer.compare.value = str(made["attmask"])
    if not explorer.compute() or not explorer.wait(1800) or explorer.compared is None:
        print(f"the comparison failed: {explorer.status.text()}", file=sys.stderr)
        return 1
    explorer.show_tile(("difference",))
    open_sections(explorer, ("Heads on this slice", "Head diversity"))
    explorer._scroll.ensureWidgetVisible(explorer.diversity_text)
    save(viewer, out / "attention_compare.png")
    viewer.window.remove_dock_widget(dock_of(explorer))
    return 0


def open_sections(dock, titles) -> None:
    """Only the sections ``titles`` of a dock open (the others folded), then let the layout settle."""
    from superqt import QCollapsible

    fold(dock, keep=titles)
    for section in dock.findChildren(QCollapsible):
        if section.text() in titles:
            section.expand(animate=False)
    spin(0.5)


if __name__ == "__main__":  # the pretraining child process re-imports this module: keep the guard
    sys.exit(main())
