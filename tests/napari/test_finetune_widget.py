"""Fine-tuning dock and segmentation-results dock in a real viewer: training, cancel/resume, prediction layers,
click-through (dims and camera move to the organ), export, and clear messages for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from napari_dagman._widgets.common import layer_label_names
from napari_dagman._widgets.results.dock import SegmentationResultsWidget
from napari_dagman._widgets.training.finetune import FinetuneWidget
from napari_dagman.core.errors import DagmanInputError

FAST = {"steps": 2, "batch_size": 1, "roi": 64, "spacing": 6.0, "val_every": 1}


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory, shared_data, tiny_run) -> Path:
    """A 2-step fine-tuned run (liver, spleen, kidneys, colon) from the tiny DAGMaN run."""
    from napari_dagman.core.config import FinetuneConfig
    from napari_dagman.core.segmentation import run_finetuning
    from napari_dagman.core.training import consume

    out = tmp_path_factory.mktemp("finetune_gui") / "seg"
    config = FinetuneConfig(
        images=[str(shared_data / "example_ct.nii.gz")],
        segmentations=[str(shared_data / "example_seg_fast_force_split.nii.gz")],
        out=str(out),
        init=str(tiny_run),
        organs=[5, 1, 2, 3, 20],
        device="cpu",
        val_fraction=0.25,
        val_position=0.75,
        **FAST,
    )
    consume(run_finetuning(config))
    return out


def open_pair(viewer, shared_data: Path, image: str, labels: str):
    viewer.open(shared_data / image, plugin="napari-dagman")
    viewer.open(shared_data / labels, plugin="napari-dagman")
    return viewer.layers[-2], viewer.layers[-1]


def fill_fast_form(dock: FinetuneWidget, tmp_path: Path, init: Path | None) -> None:
    dock.runs_folder.value = str(tmp_path)
    dock.in_process.value = False  # a thread: no child interpreter to start in a test
    dock.steps.value, dock.batch_size.value = FAST["steps"], FAST["batch_size"]
    dock.roi.value, dock.spacing.value, dock.val_every.value = FAST["roi"], FAST["spacing"], FAST["val_every"]
    dock.val_fraction.value, dock.val_position.value = 0.25, 0.75
    dock.device.value = "cpu"
    if init is None:
        dock.scratch.value = True
        dock.preset.value = "tiny"
    else:
        dock.init_run.value = str(init)


# --- fine-tuning dock ---------------------------------------------------------------------------------------------
def test_dock_trains_from_layers_draws_curves_cancels_and_resumes(
    make_napari_viewer, qtbot, shared_data, tiny_run, tmp_path
):
    viewer = make_napari_viewer()
    ct, seg = open_pair(viewer, shared_data, "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")
    dock = FinetuneWidget(viewer)
    dock.image.value, dock.labels.value = ct, seg
    assert dock.offered_organs[5] == "liver" and dock.offered_organs[1] == "spleen"  # picker with names
    assert dock.organs.native.item(0).text() == "spleen (1)"
    dock.organs.value = [5, 1]
    fill_fast_form(dock, tmp_path, tiny_run)
    dock.run_name.value = "gui"
    dock.steps.value = 20
    assert dock.start()
    assert dock.running and dock.start_button.text() == "Cancel"
    # cancel as soon as the first step is drawn: the run stops at the next step boundary and saves
    qtbot.waitUntil(lambda: bool(dock.loss_plot.series("loss")[0]), timeout=300_000)
    dock.cancel()
    assert dock.wait(300)
    finished = dock.last_finished
    assert finished is not None and finished.cancelled and 1 <= finished.steps_done < 20
    run = tmp_path / "gui"
    assert (run / "resume.safetensors").is_file()
    assert any("loaded bit-exactly from the teacher" in m for m in dock.messages)
    assert json.loads((run / "config.json").read_text())["classes"]["names"] == ["spleen", "liver"]

    # resume the same run from its folder, with the same layers
    dock.resume_from.value = str(run)
    dock.steps.value = finished.steps_done + 1
    assert dock.start() and dock.wait(300)
    assert not dock.last_finished.cancelled and dock.last_finished.steps_done == finished.steps_done + 1
    xs, _ = dock.dice_plot.series("liver")
    assert xs and xs[-1] == finished.steps_done + 1  # live validation curve per organ
    assert not dock.running and dock.start_button.text() == "Start" and dock.results_button.isEnabled()


def test_dock_bad_input_gives_one_line_notifications(
    make_napari_viewer, shared_data, tiny_run, ft_run, tmp_path, notifications
):
    viewer = make_napari_viewer()
    ct, seg = open_pair(viewer, shared_data, "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")
    dock = FinetuneWidget(viewer)
    fill_fast_form(dock, tmp_path, tiny_run)

    dock.image.value, dock.labels.value = ct, None
    assert not dock.start()
    assert "choose an image layer and its labels layer" in notifications[-1][1]

    # a label map on another grid (the 30-slice crop's segmentation)
    small = viewer.open(shared_data / "example_seg.nii.gz", plugin="napari-dagman")[0]
    dock.labels.value = small
    assert dock.start() and dock.wait(120)
    assert "is not on the grid of image" in notifications[-1][1] and "\n" not in notifications[-1][1]
    assert dock.status.text().startswith("failed:") and not dock.running

    # labels that hold none of the chosen organs (spleen asked of a liver-only label map)
    liver = (np.asarray(seg.data) == 5).astype(np.uint8) * 5
    only_liver = viewer.add_labels(liver, scale=seg.scale, translate=seg.translate, name="liver only")
    dock.labels.value = only_liver
    assert dock.offered_organs == {5: "label_5"}  # painted without names: called by its number, never guessed
    dock.offer_organs({1: "spleen"})
    dock.organs.value = [1]
    assert dock.start() and dock.wait(120)
    assert "(1) occur in none of the label maps" in notifications[-1][1]

    # a fine-tuning run given where a pretraining run is expected: refused at Start, nothing started
    dock.labels.value = seg
    dock.refresh_organs()
    dock.organs.value = [5]
    dock.init_run.value = str(ft_run)
    assert not dock.start() and not dock.running
    assert "is a finetune run, not a pretraining run" in notifications[-1][1]
    assert dock.status.text().startswith("not started:")
    assert not list(tmp_path.glob("finetune-*/model.safetensors"))  # nothing was trained


# --- results dock ---------------------------------------------------------------------------------------------------
def test_prediction_layer_with_names_disagreement_and_export(
    make_napari_viewer, shared_data, ft_run, tmp_path
):
    viewer = make_napari_viewer()
    ct, ref = open_pair(viewer, shared_data, "example_ct_sm.nii.gz", "example_seg.nii.gz")
    dock = SegmentationResultsWidget(viewer)
    dock.set_run(str(ft_run), image=ct, reference=ref)
    dock.device.value = "cpu"
    assert dock.predict() and dock.wait(300)
    pred = dock.prediction_layer
    assert pred is not None and pred.name == f"{ct.name} prediction" and pred.data.shape == ct.data.shape
    np.testing.assert_allclose(pred.scale, ct.scale)
    np.testing.assert_allclose(pred.translate, ct.translate)
    names = dict(zip(pred.features["index"], pred.features["name"], strict=True))
    assert {5: "liver", 1: "spleen", 20: "colon"}.items() <= names.items()
    # stable organ colours: the same as the reference layer's for the same organ
    np.testing.assert_allclose(pred.colormap.map(5), ref.colormap.map(5))
    diff = dock.disagreement_layer
    assert diff is not None and set(np.unique(diff.data)) <= {0, 1, 2, 3}
    assert {"false_positive", "false_negative"} <= set(diff.features["name"])
    assert dock.table.rowCount() == 5 and dock.table.item(0, 0).text() == "liver"

    written = dock.export_prediction(str(tmp_path / "pred.nii.gz"))
    source, back = sitk.ReadImage(str(shared_data / "example_ct_sm.nii.gz")), sitk.ReadImage(written[0])
    assert back.GetSize() == source.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), source.GetDirection(), atol=1e-6)
    assert json.loads(Path(written[1]).read_text())["5"] == "liver"
    csv = Path(dock.export_table(str(tmp_path / "table.csv"))).read_text()
    assert csv.startswith("id,organ,volume_ml,reference_ml,dice,hd95_mm")


def test_click_through_moves_dims_and_camera_to_the_organ(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    ct, ref = open_pair(viewer, shared_data, "example_ct_sm.nii.gz", "example_seg.nii.gz")
    reference = np.asarray(ref.data)
    liver = reference == 5
    areas = liver.sum(axis=(1, 2))
    z = int(np.argmax(areas))
    # a "prediction": the reference without the liver on its largest slice (the known worst slice)
    predicted = reference.copy()
    predicted[z][predicted[z] == 5] = 0
    pred = viewer.add_labels(
        predicted, scale=ref.scale, translate=ref.translate, name="pred", features=ref.features
    )
    dock = SegmentationResultsWidget(viewer)
    dock.prediction.value, dock.reference.value = pred, ref
    assert dock.evaluate_layers() and dock.wait(120)
    organs = [dock.table.item(r, 0).text() for r in range(dock.table.rowCount())]
    row = organs.index("liver")

    # axial view: the slider goes to the slice where the liver is largest in the reference (a false-positive
    # blob of the prediction must not stand for the organ), camera on its centre
    assert dock.go_to_organ(row)
    scale, translate = np.asarray(ref.scale), np.asarray(ref.translate)
    assert viewer.dims.point[0] == pytest.approx(translate[0] + scale[0] * z)
    yx = np.argwhere(reference[z] == 5).mean(axis=0)
    np.testing.assert_allclose(viewer.camera.center[1:], translate[1:] + scale[1:] * np.round(yx), atol=1e-6)
    assert pred.selected_label == 5 and dock.current_row == row and "of the reference" in dock.status.text()

    # next / previous organ walk the table
    assert dock.step_organ(1) and dock.current_row == (row + 1) % len(organs)
    assert dock.step_organ(-1) and dock.current_row == row

    # worst slice of the liver: the slice we emptied
    assert dock.go_to_worst_slice()
    assert viewer.dims.point[0] == pytest.approx(translate[0] + scale[0] * z)

    # sagittal view: the slider now runs along x (physical scale kept)
    viewer.dims.order = (2, 0, 1)
    assert dock.go_to_organ(row)
    px = int(np.argmax((reference == 5).sum(axis=(0, 1))))
    assert viewer.dims.point[2] == pytest.approx(translate[2] + scale[2] * px)

    # 3D view: the camera centres on the organ
    viewer.dims.order = (0, 1, 2)
    viewer.dims.ndisplay = 3
    assert dock.go_to_organ(row)
    assert viewer.camera.center[0] == pytest.approx(translate[0] + scale[0] * z)

    # the prediction / reference / both toggle (contours in a 2D view)
    viewer.dims.ndisplay = 2
    dock.set_view("prediction")
    assert pred.visible and not ref.visible
    dock.set_view("reference")
    assert ref.visible and not pred.visible and ref.contour == 0
    dock.set_view("both (contours)")
    assert pred.visible and ref.visible and ref.contour == 2
    table = dock.results.table.set_index("organ")
    assert table.loc["liver", "dice"] < 1.0 and table.loc["spleen", "dice"] == pytest.approx(1.0)


def test_a_prediction_of_a_dicom_series_exports_as_dicom_seg(
    make_napari_viewer, shared_data, ft_run, tmp_path
):
    from napari_dagman.core.segmentation.dicom_seg import series_source

    hd = pytest.importorskip("highdicom")
    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(shared_data / "example_ct_dicom"), plugin="napari-dagman")
    dock = SegmentationResultsWidget(viewer)
    dock.set_run(str(ft_run), image=ct)
    dock.device.value = "cpu"
    assert dock.predict() and dock.wait(300)
    # the layer names its series itself, for napari's File > Save as a DICOM SEG (`_writer`)
    assert series_source(dock.prediction_layer.metadata) == series_source(ct.metadata) != {}
    written = dock.export_prediction(str(tmp_path / "seg.dcm"))
    seg = hd.seg.segread(written[0])
    names = layer_label_names(dock.prediction_layer)
    assert [str(d.SegmentLabel) for d in seg.SegmentSequence] == [names[i] for i in sorted(names) if i]
    # the SEG's frames hold the prediction: its voxel count per segment is the layer's
    counts = {int(d.SegmentNumber): 0 for d in seg.SegmentSequence}
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] += int(frame.astype(bool).sum())
    ids = [i for i in sorted(names) if i]
    assert [counts[n + 1] for n in range(len(ids))] == [
        int((dock.prediction_layer.data == i).sum()) for i in ids
    ]
    # a CT that is not a DICOM series is refused in one line
    nifti = viewer.open(str(shared_data / "example_ct_sm.nii.gz"), plugin="napari-dagman")[0]
    dock._image_layer = nifti
    with pytest.raises(DagmanInputError, match="DICOM series"):
        dock.export_prediction(str(tmp_path / "other.dcm"))


def test_a_cohort_folder_opens_as_a_table_of_cases_whose_rows_open_each_case(
    make_napari_viewer, shared_data, ft_run, tmp_path, capsys
):
    from tests.helpers import run_cli

    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    for case in ("abd01", "abd02"):
        (images / f"{case}_0000.nii.gz").symlink_to(shared_data / "example_ct_sm.nii.gz")
    (labels / "abd02.nii.gz").symlink_to(shared_data / "example_seg.nii.gz")  # abd01 has no reference
    out = tmp_path / "predictions"
    status, err = run_cli(
        capsys, "predict", images, "--checkpoint", ft_run, "--out", out, "--reference", labels, "--device", "cpu",
        "--quiet",
    )  # fmt: skip
    assert status == 0, err

    viewer = make_napari_viewer()
    dock = SegmentationResultsWidget(viewer)
    assert not dock.open_cohort(str(images))  # not a cohort folder: refused, one line
    assert "not a cohort folder" in dock.status.text()
    assert dock.cohort_table.isHidden() and dock.open_cohort(str(out)) and not dock.cohort_table.isHidden()
    rows = [dock.cohort_table.item(r, 0).text() for r in range(dock.cohort_table.rowCount())]
    assert rows == ["abd02", "abd01"]  # the scored case first, the case without a reference last
    assert dock.cohort_table.item(1, 2).text() == "-"

    assert dock.open_case(0) and dock.wait(300)
    names = [layer.name for layer in viewer.layers]
    assert {"abd02", "abd02 reference", "abd02 prediction", "abd02 prediction vs reference"} <= set(names)
    ct = viewer.layers["abd02"]
    assert dock.prediction_layer.data.shape == ct.data.shape == dock.reference_layer.data.shape
    np.testing.assert_allclose(dock.prediction_layer.translate, ct.translate)
    table = pd.read_csv(out / "cohort.csv")
    assert dock.table.rowCount() == int((table["case"] == "abd02").sum())
    assert dock.go_to_organ(0)  # the organ table of the case clicks through as after a prediction

    assert dock.open_case(1) and dock.wait(300)
    assert "abd01 prediction" in [layer.name for layer in viewer.layers] and dock.reference_layer is None
