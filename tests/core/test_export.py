"""Exports for MONAI: encoder weights in SwinUNETR's layout, and a MONAI Bundle that segments like `predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_dagman.cli import main
from napari_dagman.core.checkpoint import load_pretrained_encoder
from napari_dagman.core.export import check_bundle, export_encoder
from napari_dagman.core.io import read_volume, stem_of

UNETR = pytest.importorskip("monai.networks.nets").SwinUNETR


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def swin_stages(net: UNETR, x: torch.Tensor) -> list[torch.Tensor]:
    net.eval()
    with torch.no_grad():
        return net.swinViT(x, net.normalize)


# --- encoder weights ----------------------------------------------------------------------------------------------
def test_encoder_loads_into_monai_swinunetr_and_computes_what_ours_does(tiny_run, tmp_path):
    written = export_encoder(tiny_run, tmp_path / "encoder.pt")
    assert written == [str(tmp_path / n) for n in ("encoder.pt", "encoder.json", "encoder.input.json")]
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)  # tensors only: nothing executes
    arguments = json.loads((tmp_path / "encoder.json").read_text())
    assert {"feature_size", "depths", "num_heads", "window_size", "patch_size", "spatial_dims"} <= set(
        arguments
    )
    net = UNETR(**arguments, out_channels=3)
    report = net.load_state_dict(state, strict=False)
    assert not [k for k in report.missing_keys if k.startswith("swinViT.")]
    assert report.unexpected_keys == []
    assert all(k.startswith("swinViT.") for k in state)

    ours = load_pretrained_encoder(tiny_run).encoder  # the run's preferred encoder (DAGMaN: the teacher)
    x = torch.rand(2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.stages(ours.embed(x))
    for a, b in zip(expected, swin_stages(net, x), strict=True):
        assert torch.equal(a, b)  # the same weights in the same MONAI modules: bit for bit

    about = json.loads((tmp_path / "encoder.input.json").read_text())
    config = json.loads((tiny_run / "config.json").read_text())
    assert about["spacing_mm"] == config["spacing"] and about["axcodes"] == "SPL"
    assert about["source"]["encoder"] == "teacher" and about["source"]["step"] == 3


def test_safetensors_export_holds_the_same_tensors_and_the_student_on_request(tiny_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    export_encoder(tiny_run, tmp_path / "teacher.pt")
    export_encoder(tiny_run, tmp_path / "student.safetensors", fmt="safetensors", which="student")
    teacher = torch.load(tmp_path / "teacher.pt", weights_only=True)
    student = load_file(tmp_path / "student.safetensors")
    assert set(student) == set(teacher)
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # another network of the run
    with safe_open(tmp_path / "student.safetensors", framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["swinunetr"]) == json.loads((tmp_path / "student.json").read_text())
    net = UNETR(**json.loads(meta["swinunetr"]), out_channels=2)
    assert net.load_state_dict(student, strict=False).unexpected_keys == []


def test_a_cnn_encoder_and_bad_requests_are_refused_with_one_line(
    shared_data, tmp_path, capsys, tiny_run, ft_run
):
    cass = tmp_path / "cass"
    argv = ["pretrain", str(shared_data / "example_ct.nii.gz"), "--out", str(cass), "--method", "cass",
            "--preset", "tiny", "--roi", "32", "--spacing", "4", "--steps", "1", "--batch-size", "1", "--cnn-width", "0.125",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    out = str(tmp_path / "enc.pt")
    assert main(["export", str(cass), "--format", "monai-swinunetr", "--out", out, "--which", "cnn"]) == 2
    assert "not a Swin" in one_error_line(capsys) and not Path(out).exists()
    # CASS's transformer is a Swin: it exports
    assert (
        main(["export", str(cass), "--format", "monai-swinunetr", "--out", out, "--which", "transformer"])
        == 0
    )
    capsys.readouterr()
    bad = [
        (
            [
                "export",
                str(tiny_run),
                "--format",
                "monai-swinunetr",
                "--out",
                str(tmp_path / "e.safetensors"),
            ],
            ".pt",
        ),
        (["export", str(tiny_run), "--format", "monai-swinunetr", "--out", out, "--which", "nope"], "nope"),
        (["export", str(tiny_run), "--format", "monai-swinunetr", "--out", out, "--inverse", "labels"], "--inverse"),
        (["export", str(ft_run), "--format", "monai-swinunetr", "--out", out], "not a pretraining run"),
        (
            ["export", str(tiny_run), "--format", "monai-bundle", "--out", str(tmp_path / "b")],
            "fine-tune it first",
        ),
        (
            ["export", str(ft_run), "--format", "monai-bundle", "--out", str(tmp_path / "b"), "--roi", "40"],
            "32",
        ),
        (
            ["export", str(tmp_path / "none"), "--format", "monai-bundle", "--out", str(tmp_path / "b")],
            "not exist",
        ),
    ]
    for argv, words in bad:
        assert main(argv) == 2, argv
        assert words in one_error_line(capsys), argv


# --- the MONAI Bundle -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(ft_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "seg_bundle"
    assert main(["export", str(ft_run), "--format", "monai-bundle", "--out", str(out)]) == 0
    return out


def test_the_bundle_passes_monais_own_checks(bundle, ft_run, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    config, meta = bundle / "configs" / "inference.json", bundle / "configs" / "metadata.json"
    check_bundle(
        bundle
    )  # the inference workflow's required properties, the spec's metadata keys, strict weights
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config), device="cpu")
    ckpt_export(  # TorchScript by tracing (MONAI's SwinUNETR does not script under this torch)
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(meta),
        config_file=str(config),
        bundle_root=str(bundle),
        use_trace=True,
        input_shape=[1, 1, 64, 64, 64],
    )
    assert (tmp_path / "model.ts").stat().st_size > 0
    metadata = json.loads(meta.read_text())
    labels = json.loads((bundle / "configs" / "labels.json").read_text())
    assert labels == {
        "0": "background",
        "5": "liver",
        "1": "spleen",
        "2": "kidney_right",
        "3": "kidney_left",
        "20": "colon",
    }
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "liver"
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def run_predict_and_bundle(ct: Path, run: Path, bundle: Path, inverse: str, out: Path) -> tuple:
    """``predict --inverse`` and ``python -m monai.bundle run`` of ``ct`` in two fresh processes: both label maps."""
    predict = [sys.executable, "-m", "napari_dagman.cli", "predict", str(ct), "--checkpoint", str(run),
               "--out", str(out / "p.nii.gz"), "--inverse", inverse, "--quiet"]  # fmt: skip
    run_bundle = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                  "--bundle_root", str(bundle), "--image", str(ct), "--output_dir", str(out / "bundle_out")]  # fmt: skip
    # two fresh processes with the same threads (a thread count can change the order of a sum's terms)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    for command in (predict, run_bundle):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    return read_volume(out / "p.nii.gz"), read_volume(out / "bundle_out" / f"{stem_of(ct)}_seg.nii.gz")


@pytest.mark.parametrize("inverse", ["labels", "probabilities"])
def test_monai_bundle_run_gives_predicts_labels(inverse, bundle, ft_run, shared_data, tmp_path):
    """The default bundle (labels) and one exported with --inverse probabilities segment as `predict --inverse`
    does: predict resamples slab by slab, the bundle's Invertd at once, so they may differ by the float rounding of
    the sampling grid; on the shared CT they agree on every voxel (the bound allows one in 10^5)."""
    ct = shared_data / "example_ct_sm.nii.gz"  # 3 mm, RAS; the run works at 6 mm: resampled there and back
    if inverse != "labels":
        bundle = tmp_path / "bundle"
        assert main(["export", str(ft_run), "--format", "monai-bundle", "--out", str(bundle), "--inverse", inverse]) == 0
    ours, theirs = run_predict_and_bundle(ct, ft_run, bundle, inverse, tmp_path)
    assert theirs.same_grid(ours) and theirs.metadata["source_orientation"] == "RAS"
    assert len(np.unique(ours.array)) > 1  # a segmentation, not an empty map
    assert np.mean(theirs.array != ours.array) <= 1e-5, int(np.sum(theirs.array != ours.array))


def test_the_default_bundle_inverts_one_channel_whatever_the_class_count(bundle, ft_run):
    """The bundle's default takes the arg-max on the model's grid and inverts that one channel (nearest); the
    probabilities option inverts all K+1 softmax channels, as the bundles before issue 26 did."""
    from napari_dagman.core.export import inference_config
    from napari_dagman.core.segmentation import load_segmenter

    steps = json.loads((bundle / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    targets = [t["_target_"] for t in steps]
    assert targets == ["AsDiscreted", "Invertd", "MapLabelValued", "SaveImaged"]
    assert steps[0]["argmax"] and steps[1]["nearest_interp"] is True
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["inverse"] == "labels" and "nearest" in metadata["description"]
    assert "arg-max on the model's grid" in (bundle / "docs" / "README.md").read_text()

    config = inference_config(load_segmenter(ft_run), roi=64, overlap=0.5, sw_batch_size=1, inverse="probabilities")
    steps = config["postprocessing"]["transforms"]
    assert [t["_target_"] for t in steps][:3] == ["Activationsd", "Invertd", "AsDiscreted"]
    assert steps[1]["nearest_interp"] is False


@pytest.fixture(scope="module")
def model_space(ft_run, shared_data):
    """The shared small CT at the run's spacing (what predict and the bundle resample back from)."""
    from napari_dagman.core.segmentation import load_segmenter, pipeline

    segmenter = load_segmenter(ft_run)
    image = read_volume(shared_data / "example_ct_sm.nii.gz")
    data, preprocessing = pipeline.to_model_space(image, segmenter.spacing, 3, segmenter.hu_range)
    return image, data, preprocessing


@pytest.mark.parametrize("inverse", ["labels", "probabilities"])
def test_classes_go_back_to_the_input_grid_the_same_in_slabs_as_at_once(inverse, model_space, monkeypatch):
    """`predict` resamples a slab of slices at a time to bound its memory; the bundle's Invertd all at once: the
    same classes, 60 organs, ties to the first class (slabs of 2 slices; a last single slice joins the one before)."""
    from napari_dagman.core.segmentation import pipeline

    image, data, preprocessing = model_space
    logits = torch.randn(61, *data["image"].shape[1:], generator=torch.Generator().manual_seed(1))
    logits[2] = logits[1]  # ties go to the first class, as torch.argmax
    channels = 61 if inverse == "probabilities" else 1
    monkeypatch.setattr(pipeline, "SLAB_BYTES", 4 * 122 * 101 * (4 * channels + pipeline.GRID_BYTES_PER_VOXEL))
    assert [b - a for a, b in pipeline.slabs(image.shape, channels)] == [4] * 7 + [2]  # 30 slices
    monkeypatch.setattr(pipeline, "SLAB_BYTES", 29 * 122 * 101 * (4 * channels + pipeline.GRID_BYTES_PER_VOXEL))
    assert [b - a for a, b in pipeline.slabs(image.shape, channels)] == [30]  # not 29 + 1
    monkeypatch.setattr(pipeline, "SLAB_BYTES", 2 * 122 * 101 * (4 * channels + pipeline.GRID_BYTES_PER_VOXEL))
    in_slabs = pipeline.classes_on_input_grid(image, data["image"], logits, inverse)
    at_once = pipeline.instantiate(
        {"_target_": "Compose", "transforms": pipeline.output_transforms(list(range(1, 61)), "@preprocessing", inverse)},
        preprocessing=preprocessing,
    )({**data, "pred": logits.clone()})["pred"]
    assert in_slabs.shape == image.shape and in_slabs.dtype == np.uint8
    assert np.mean(in_slabs != np.asarray(at_once[0])) <= 1e-5
    assert 2 not in np.unique(in_slabs) and len(np.unique(in_slabs)) > 50


def test_resampling_memory_does_not_grow_with_the_class_count(model_space, monkeypatch):
    """What goes through MONAI's resampling onto the input grid: predict's slabs stay within `SLAB_BYTES` with 5
    or 60 organs; the default bundle's Invertd gets one channel whatever the count."""
    import monai.transforms.spatial.array as spatial

    from napari_dagman.core.segmentation import pipeline

    image, data, preprocessing = model_space
    seen: list[tuple[int, ...]] = []
    resample = spatial.spatial_resample

    def spy(img, dst_affine, spatial_size, *args, **kwargs):
        out = resample(img, dst_affine, spatial_size, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(spatial, "spatial_resample", spy)
    monkeypatch.setattr(pipeline, "SLAB_BYTES", 8 << 20)
    for classes in (6, 61):
        logits = torch.randn(classes, *data["image"].shape[1:], generator=torch.Generator().manual_seed(0))
        seen.clear()
        pipeline.classes_on_input_grid(image, data["image"], logits, "probabilities")
        assert len(seen) > 1 and sum(s[1] for s in seen) == image.shape[0]  # slabs of the input's slices
        assert max(4 * int(np.prod(s)) for s in seen) <= 8 << 20
        seen.clear()
        pipeline.instantiate(
            {"_target_": "Compose", "transforms": pipeline.output_transforms(list(range(1, classes)), "@preprocessing")},
            preprocessing=preprocessing,
        )({**data, "pred": logits})
        assert [s[0] for s in seen] == [1]  # Spacingd's inverse (Orientationd's is a flip, not a resampling)
