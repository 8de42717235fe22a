"""Fine-tuning and prediction: encoder transfer, organ remapping, split, crops, loop, geometry, metrics, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tests.helpers import ORGANS, ft_config

from napari_dagman.core.checkpoint import load_tensors, save_tensors
from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.events import (
    VALIDATING,
    CancelToken,
    FinishedEvent,
    JobCancelled,
    PredictionEvent,
    ProgressEvent,
    StepEvent,
    ValidationEvent,
)
from napari_dagman.core.io import read_volume, write_volume
from napari_dagman.core.labels import TOTALSEG_V2
from napari_dagman.core.models.architecture import architecture_for
from napari_dagman.core.models.encoder import SwinEncoder
from napari_dagman.core.segmentation import (
    CropSampler,
    LabelMap,
    SegmentationNet,
    build_model,
    disagreement_map,
    encoder_key_map,
    evaluate,
    load_segmenter,
    organ_focus,
    parse_organs,
    predict,
    prepare_case,
    results_summary,
    run_finetuning,
    run_prediction,
    slab_ranges,
    worst_slice,
)
from napari_dagman.core.training import consume
from napari_dagman.core.volume import Volume


# --- encoder transfer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "dims"), [("tiny", 3), ("tiny", 2), ("small", 3)])
def test_encoder_key_map_covers_every_swinunetr_encoder_weight_one_to_one(preset, dims):
    arch = architecture_for(preset, dims)
    unetr_keys = list(SegmentationNet(arch, 4).state_dict())
    run_keys = {f"teacher.encoder.{k}" for k in SwinEncoder(arch).state_dict()}
    mapping = encoder_key_map(unetr_keys, "teacher")
    swin_keys = [k for k in unetr_keys if k.startswith("swinViT.")]
    assert sorted(mapping) == sorted(swin_keys) and swin_keys
    assert len(set(mapping.values())) == len(mapping)  # one-to-one
    assert set(mapping.values()) <= run_keys
    # everything else in the run's encoder is the mask token and the class-attention module
    assert {k.split(".")[2] for k in run_keys - set(mapping.values())} == {"mask_token", "class_attention"}


def test_encoder_weights_load_bit_exactly_and_the_decoder_starts_fresh(tiny_run):
    tensors, _ = load_tensors(tiny_run / "model.safetensors")
    labels = LabelMap((5, 1), ("liver", "spleen"))
    arch = architecture_for("tiny", 3)
    net, report = build_model(arch, labels, init=tiny_run, seed=3)
    scratch, scratch_report = build_model(arch, labels, init=None, seed=3)
    state, fresh_state = net.state_dict(), scratch.state_dict()
    swin = [k for k in state if k.startswith("swinViT.")]
    assert report.which == "teacher" and report.method == "dagman"  # the default: the EMA teacher
    assert len(report.loaded) == len(swin) and report.params_loaded == sum(state[k].numel() for k in swin)
    for key in swin:
        assert torch.equal(state[key], tensors["teacher.encoder.swin." + key[len("swinViT.") :]]), key
    # the decoder is exactly what a from-scratch network with the same seed starts with
    decoder = [k for k in state if not k.startswith("swinViT.")]
    assert decoder and sorted(report.fresh) == sorted(decoder)
    for key in decoder:
        assert torch.equal(state[key], fresh_state[key]), key
    assert scratch_report.from_scratch and "from scratch" in scratch_report.summary()
    assert "loaded bit-exactly" in report.summary() and "class_attention" in report.summary()

    student, student_report = build_model(arch, labels, init=tiny_run, which="student")
    assert student_report.which == "student"
    key = swin[-1]
    assert torch.equal(student.state_dict()[key], tensors["student.encoder.swin." + key[len("swinViT.") :]])


# --- organs -------------------------------------------------------------------------------------------------------
def test_label_remapping_round_trips_and_drops_unchosen_ids():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 3, 5, 20, 21, 117], size=(6, 7, 8)).astype(np.uint8)
    label_map = LabelMap((5, 1, 21, 117), ("liver", "spleen", "urinary_bladder", "costal_cartilages"))
    classes = label_map.to_classes(labels)
    assert set(np.unique(classes)) <= set(range(label_map.num_classes))
    assert np.array_equal(classes == 1, labels == 5) and np.array_equal(classes == 4, labels == 117)
    back = label_map.to_labels(classes)
    assert np.array_equal(back, np.where(np.isin(labels, [5, 1, 21, 117]), labels, 0))
    assert np.array_equal(label_map.to_classes(back), classes)
    assert LabelMap.from_dict(json.loads(json.dumps(label_map.to_dict()))) == label_map
    assert parse_organs("liver, 2,spleen", TOTALSEG_V2) == [5, 2, 1]
    with pytest.raises(DagmanInputError, match="unknown organ 'livr'"):
        parse_organs("livr", TOTALSEG_V2)


# --- split and crops --------------------------------------------------------------------------------------------
def test_slab_split_leaves_a_gap_on_both_sides():
    train, val = slab_ranges(100, 0.2, 0.5, gap=5)
    assert val == (40, 60)
    assert train == [(0, 35), (65, 100)]
    covered = {z for a, b in train for z in range(a, b)}
    assert not covered & set(range(val[0] - 5, val[1] + 5))
    assert slab_ranges(100, 0.1, 1.0, gap=3) == ([(0, 87)], (90, 100))
    with pytest.raises(DagmanInputError, match="nothing left to train on"):
        slab_ranges(20, 0.5, 0.5, gap=10)


def test_crops_are_class_balanced_centred_and_reproducible():
    classes = np.zeros((24, 24, 24), np.uint8)
    classes[2:20, 2:20, 2:20] = 1  # a big organ
    classes[10:12, 10:12, 10:12] = 2  # a tiny one inside it
    image = classes.astype(np.float32) / 2
    sampler = CropSampler(
        [(image, classes)], roi_size=(5, 5, 5), num_classes=3, background_ratio=1.0, augment=False, seed=1
    )
    centres = []
    for step in range(150):
        _, labels = sampler.sample(step, 1)
        centres.append(int(labels[0, 0, 2, 2, 2]))
    counts = np.bincount(centres, minlength=3)
    # each class centres about a third of the crops, although the tiny organ is 8 of 13824 voxels
    assert all(30 <= c <= 70 for c in counts), counts
    a, b = sampler.sample(7, 2), sampler.sample(7, 2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# --- the loop: events, checkpoints, cancel, exact resume ---------------------------------------------------------
def test_cancel_then_resume_repeats_the_uninterrupted_run_exactly(tmp_path, shared_data, tiny_run):
    whole = consume(run_finetuning(ft_config(shared_data, tmp_path / "whole", init=str(tiny_run))))
    assert whole.steps_done == 3 and not whole.cancelled
    assert set(whole.summary["best_dice"]) == {TOTALSEG_V2[i] for i in ORGANS}

    token = CancelToken()
    events = []
    for event in run_finetuning(ft_config(shared_data, tmp_path / "cut", init=str(tiny_run)), cancel=token):
        events.append(event)
        if isinstance(event, StepEvent) and event.step == 1:
            token.cancel()
    finished = events[-1]
    assert isinstance(finished, FinishedEvent) and finished.cancelled and finished.steps_done == 1
    assert (tmp_path / "cut" / "resume.safetensors").is_file()
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "cancelled"

    resumed = list(run_finetuning(ft_config(shared_data, tmp_path / "cut", init=str(tiny_run)), resume=True))
    assert [e.step for e in resumed if isinstance(e, StepEvent)] == [2, 3]
    assert any(isinstance(e, ValidationEvent) and e.step == 3 for e in resumed)
    # validation says its progress piece by piece, between the last step and its Dice
    kinds = [type(e).__name__ for e in resumed]
    validating = [(e.done, e.total) for e in resumed if isinstance(e, ProgressEvent) and e.stage == VALIDATING]
    pieces = validating[-1][1]
    assert pieces >= 1 and validating == [(k, pieces) for k in range(pieces + 1)]
    last_step, dice = kinds.index("StepEvent", kinds.index("StepEvent") + 1), kinds.index("ValidationEvent")
    assert kinds[last_step + 1 : dice] == ["ProgressEvent"] * (pieces + 1)
    a, _ = load_tensors(tmp_path / "whole" / "model.safetensors")
    b, meta = load_tensors(tmp_path / "cut" / "model.safetensors")
    assert meta["job"] == "finetune" and json.loads(meta["classes"])["ids"] == ORGANS
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # closing the generator (napari's worker.quit, Ctrl-C) also saves before stopping
    gen = run_finetuning(ft_config(shared_data, tmp_path / "closed", init=str(tiny_run)))
    for event in gen:
        if isinstance(event, StepEvent):
            break
    gen.close()
    _, meta = load_tensors(tmp_path / "closed" / "resume.safetensors")
    assert meta["step"] == "1"
    with pytest.raises(CheckpointError, match="other settings: organs"):
        consume(
            run_finetuning(
                ft_config(shared_data, tmp_path / "closed", init=str(tiny_run), organs=[5]), resume=True
            )
        )


# --- prediction --------------------------------------------------------------------------------------------------
def test_prediction_keeps_the_input_geometry_and_names(ft_run, shared_data, tmp_path):
    source = shared_data / "example_ct_sm.nii.gz"  # RAS file, 3 mm; the model works at 6 mm
    image = read_volume(source)
    segmenter = load_segmenter(ft_run)
    assert segmenter.spacing == 6.0 and segmenter.label_map.ids == tuple(ORGANS)
    labels = predict(image, segmenter, overlap=0.25)
    assert labels.same_grid(image) and labels.array.shape == image.array.shape
    assert set(np.unique(labels.array)) <= {0, *ORGANS}
    assert labels.metadata["label_names"] == {i: TOTALSEG_V2[i] for i in ORGANS}
    written = write_volume(labels, tmp_path / "seg.nii.gz", label_names=labels.metadata["label_names"])
    original, back = sitk.ReadImage(str(source)), sitk.ReadImage(written[0])
    assert back.GetSize() == original.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), original.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), original.GetDirection(), atol=1e-6)
    assert json.loads(Path(written[1]).read_text())["5"] == "liver"

    table = evaluate(labels, read_volume(shared_data / "example_seg.nii.gz"), labels.metadata["label_names"])
    assert list(table["organ"]) == [TOTALSEG_V2[i] for i in ORGANS]
    assert table["dice"].between(0, 1).all() and (table["reference_ml"] > 0).all()
    json.dumps(results_summary(table))  # JSON-ready (no NaN, no numpy scalars)


def test_prediction_can_be_cancelled(ft_run, shared_data):
    token = CancelToken()
    token.cancel()
    events = []
    # the cancel contract of every job without a partial result: it stops by raising JobCancelled
    with pytest.raises(JobCancelled):
        for event in run_prediction(
            read_volume(shared_data / "example_ct_sm.nii.gz"), load_segmenter(ft_run), cancel=token
        ):
            events.append(event)
    assert not any(isinstance(e, PredictionEvent) for e in events)


# --- results -------------------------------------------------------------------------------------------------------
def test_metrics_focus_and_disagreement_on_known_shapes():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 5  # 1000 voxels
    pred = np.zeros_like(ref)
    pred[5:15, 5:15, 7:17] = 5  # the same cube moved 2 voxels along x
    pred[2, 2, 2] = 1  # a stray spleen voxel
    spacing = (2.0, 1.0, 1.0)
    table = evaluate(Volume(pred, spacing), Volume(ref, spacing), {5: "liver", 1: "spleen"})
    liver = table.set_index("organ").loc["liver"]
    assert liver["dice"] == pytest.approx(2 * 800 / 2000)
    assert liver["volume_ml"] == pytest.approx(1000 * 2.0 / 1000) and liver["reference_ml"] == pytest.approx(
        2.0
    )
    assert liver["hd95_mm"] == pytest.approx(2.0)
    spleen = table.set_index("organ").loc["spleen"]
    assert np.isnan(spleen["dice"]) and spleen["reference_ml"] == 0  # not in the reference: no score

    blob = np.zeros((10, 10, 10), np.uint8)
    blob[3, 2:4, 2:4] = 7
    blob[6, 4:9, 5:8] = 7  # largest on slice 6, centred at (6, 6)
    assert organ_focus(blob, 7) == (6, 6, 6)
    assert organ_focus(blob, 7, axis=2)[2] in (5, 6, 7) and organ_focus(blob, 8) is None
    other = blob.copy()
    other[6] = 0
    assert worst_slice(other, blob, 7) == (6, 6, 6)
    assert worst_slice(blob, blob, 7) is None

    codes = disagreement_map(np.array([0, 5, 5, 1, 9]), np.array([5, 0, 1, 1, 0]), organs=[5, 1])
    assert codes.tolist() == [2, 1, 3, 0, 0]  # FN, FP, wrong organ, agree, unchosen id ignored


# --- bad input ----------------------------------------------------------------------------------------------------
def test_labels_on_another_grid_are_refused_unless_resampling_is_asked(shared_data):
    image = read_volume(shared_data / "example_ct.nii.gz")
    labels = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    shifted = Volume(
        labels.array[:, :, :-1], labels.spacing, labels.origin, labels.direction, labels.metadata
    )
    label_map = LabelMap((5,), ("liver",))
    kwargs = {"dims": 3, "spacing": 6.0, "hu_range": (-175.0, 250.0)}
    with pytest.raises(DagmanInputError, match="is not on the grid of image .*--resample-labels"):
        prepare_case(image, shifted, label_map, **kwargs)
    case = prepare_case(image, shifted, label_map, resample_labels=True, **kwargs)
    assert case.classes.shape == case.image.shape and case.classes.max() == 1


def test_labels_without_the_chosen_organs_are_refused(tmp_path, shared_data):
    image = read_volume(shared_data / "example_ct.nii.gz")
    labels = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    only_liver = labels.with_array(np.where(labels.array == 5, 5, 0).astype(np.uint8), name="liver only")
    with pytest.raises(
        DagmanInputError, match="holds none of the chosen organs .*spleen \\(1\\).*it has liver"
    ):
        prepare_case(
            image, only_liver, LabelMap((1,), ("spleen",)), dims=3, spacing=6.0, hu_range=(-175, 250)
        )
    with pytest.raises(DagmanInputError, match="occur in none of the label maps"):
        consume(run_finetuning(ft_config(shared_data, tmp_path / "x", organs=[116]), [(image, only_liver)]))
    assert not (tmp_path / "x").exists()  # refused before the run folder is touched


def test_run_folders_of_another_kind_are_refused_clearly(tmp_path, shared_data, tiny_run, ft_run):
    with pytest.raises(CheckpointError, match="is a finetune run, not a pretraining run"):
        consume(run_finetuning(ft_config(shared_data, tmp_path / "a", init=str(ft_run))))
    with pytest.raises(CheckpointError, match="pretrain run .*fine-tune it first"):
        load_segmenter(tiny_run)
    with pytest.raises(
        DagmanInputError, match="--preset small contradicts the pretraining run's preset tiny"
    ):
        consume(run_finetuning(ft_config(shared_data, tmp_path / "b", init=str(tiny_run), preset="small")))
    # a pretraining run of a method whose encoder is not this Swin (say a CNN student): named, not a traceback
    other = tmp_path / "cnn_run"
    shutil.copytree(tiny_run, other)
    config = json.loads((other / "config.json").read_text())
    config["method"] = "cass"
    (other / "config.json").write_text(json.dumps(config))
    _, meta = load_tensors(tiny_run / "model.safetensors")
    save_tensors(
        other / "model.safetensors",
        {"student.encoder.stem.weight": torch.zeros(8, 1, 3, 3, 3)},
        # a file written before encoders were published by name (no "encoders" entry)
        {k: v for k, v in meta.items() if k not in ("format", "encoders", "preferred_encoder")}
        | {"method": "cass"},
    )
    with pytest.raises(CheckpointError, match="does not fit this architecture"):
        consume(run_finetuning(ft_config(shared_data, tmp_path / "c", init=str(other))))


# --- command line ---------------------------------------------------------------------------------------------------
def test_cli_predict_writes_labels_and_metrics(ft_run, shared_data, tmp_path, capsys):
    from napari_dagman.cli import main

    out = tmp_path / "pred.nii.gz"
    code = main(
        [
            "predict",
            str(shared_data / "example_ct_sm.nii.gz"),
            "--checkpoint",
            str(ft_run),
            "--out",
            str(out),
            "--reference",
            str(shared_data / "example_seg.nii.gz"),
            "--quiet",
            "--no-hd95",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and (tmp_path / "pred.labels.json").is_file()
    assert "liver" in printed and "Dice" in printed
    metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
    assert [o["id"] for o in metrics["organs"]] == ORGANS and metrics["checkpoint_step"] == 2
    assert (tmp_path / "pred.metrics.csv").read_text().startswith("id,organ,volume_ml")


def test_cli_bad_input_gives_one_line_and_exit_2(shared_data, tmp_path, capsys, tiny_run):
    from napari_dagman.cli import main

    ct = str(shared_data / "example_ct.nii.gz")
    assert main(["finetune", ct, "--out", str(tmp_path / "r")]) == 2
    assert "has no partner" in capsys.readouterr().err
    # example_seg belongs to the 30-slice crop, not to the full CT
    code = main(
        [
            "finetune",
            ct,
            str(shared_data / "example_seg.nii.gz"),
            "--out",
            str(tmp_path / "r"),
            "--labels",
            "liver",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not on the grid" in err
    code = main(["predict", ct, "--checkpoint", str(tiny_run), "--out", str(tmp_path / "p.nii.gz")])
    assert code == 2 and "fine-tune it first" in capsys.readouterr().err
