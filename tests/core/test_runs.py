"""The torch-free run API (`core.runs`), one config assembly (`core.config.compose`), the label-format registry
(`core.outputs`), the slab advice and the embedding patch size in millimetres: the rules the docks and the CLI
share."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_dagman.core.config import EmbedConfig, PretrainConfig
from napari_dagman.core.config.compose import compose_pretrain_config
from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.outputs import label_format, label_suffixes, narrow_labels, write_labels
from napari_dagman.core.runs import probe_figures, published
from napari_dagman.core.segmentation.data import slab_advice
from napari_dagman.core.volume import Volume

CASS_ENCODERS = {
    "transformer": {"prefix": "transformer", "kind": "swin", "class_attention_trained": True},
    "cnn": {"prefix": "cnn", "kind": "cnn", "class_attention_trained": False, "architecture": {"depth": 4}},
}


def write_run(folder, config: dict, metrics: list[dict] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": {"preset": "tiny"}} | config))
    if metrics:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return folder


def test_core_runs_imports_neither_torch_nor_simpleitk():
    """Picking a folder in a dock reads it through core.runs: importing torch there would freeze napari."""
    code = (
        "import sys, napari_dagman.core.runs, napari_dagman.core.config.compose; "
        "print(sorted(m for m in ('torch', 'SimpleITK', 'monai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_run_publishes_its_own_encoder_names(tmp_path):
    run = write_run(
        tmp_path / "cass",
        {"job": "pretrain", "method": "cass", "encoders": CASS_ENCODERS, "preferred_encoder": "transformer",
         "preferred_reason": "the Swin", "capabilities": {"has_teacher": False, "cell_masks": False}},
    )  # fmt: skip
    offers = published(run)
    assert offers.names == ["transformer", "cnn"] and offers.preferred == "transformer"
    assert offers.choices() == [("auto (transformer)", "auto"), ("transformer", "transformer"), ("cnn (cnn)", "cnn")]
    assert offers.choices(swin_only=True) == [("auto (transformer)", "auto"), ("transformer", "transformer")]
    assert offers.resolve("auto").name == "transformer" and offers.resolve("cnn").kind == "cnn"
    assert not offers.has_teacher and not offers.cell_masks
    with pytest.raises(CheckpointError, match="publishes no 'teacher' encoder; choose one of transformer, cnn"):
        offers.resolve("teacher")
    # a weights file of the run answers for its folder
    (run / "model.safetensors").write_bytes(b"")
    assert published(run / "model.safetensors").names == offers.names


def test_an_older_run_without_a_list_of_encoders_publishes_teacher_and_student(tmp_path):
    old = published(write_run(tmp_path / "old", {"method": "dagman"}))
    assert old.names == ["teacher", "student"] and old.has_teacher is False and old.cell_masks is True
    simmim = published(write_run(tmp_path / "simmim", {"method": "simmim"}))
    assert simmim.names == ["student"] and not simmim.encoders["student"].has_attention
    assert simmim.choices(attention_only=True) == []


def test_a_fine_tuning_run_is_refused_as_a_pretraining_run(tmp_path):
    with pytest.raises(CheckpointError, match="is a finetune run, not a pretraining run"):
        published(write_run(tmp_path / "seg", {"job": "finetune"}))


def test_probe_figures_are_read_by_the_names_the_run_recorded(tmp_path):
    """CASS's (and any new method's) probe figures appear under its own encoder names, not teacher/student."""
    rows = [
        {"step": 10, "probe_transformer_head_diversity": 0.1, "probe_token_cosine": 0.5},
        {"step": 20, "probe_transformer_head_diversity": 0.2, "probe_cnn_output_norm": 3.0,
         "probe_token_cosine": 0.4, "probe_output_cosine_cnn": 0.3, "loss": 1.0},
    ]  # fmt: skip
    run = write_run(tmp_path / "cass", {"method": "cass", "encoders": CASS_ENCODERS}, rows)
    figures = probe_figures(run)
    assert figures["transformer"] == {"step": 20, "head_diversity": 0.2}
    assert figures["cnn"] == {"step": 20, "output_norm": 3.0}
    assert figures["run"] == {"step": 20, "token_cosine": 0.4, "output_cosine_cnn": 0.3}
    assert probe_figures(tmp_path / "nothing") == {}


# --- one config assembly --------------------------------------------------------------------------------------
def test_a_resumed_run_keeps_its_settings_and_the_given_values_win(tmp_path):
    saved = PretrainConfig(method="smit", steps=40, lr=3e-4, options={"mask_ratio": 0.6}).to_dict()
    run = write_run(tmp_path / "run", saved | {"future_key": 1})  # written by a newer version: read leniently
    config = compose_pretrain_config({"steps": 80}, resume=run)
    assert (config.method, config.steps, config.lr) == ("smit", 80, 3e-4)
    assert config.method_options().mask_ratio == 0.6


def test_a_method_switch_keeps_the_options_the_new_method_has(tmp_path):
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"method": "smit", "steps": 5, "smit": {"mask_ratio": 0.4, "teacher_noise": "none"}}))
    config = compose_pretrain_config({"method": "simmim"}, config_file=file)
    assert (config.method, config.steps) == ("simmim", 5)
    assert config.options == {"mask_ratio": 0.4}  # SimMIM has a mask ratio, no teacher
    whole = compose_pretrain_config({"options": {"mask_ratio": 0.7}}, config_file=file)
    assert whole.options == {"mask_ratio": 0.7}  # a dock's whole set replaces the file's


def test_a_typo_in_a_config_file_is_refused_with_the_closest_name(tmp_path):
    file = tmp_path / "typo.json"
    file.write_text(json.dumps({"method": "dagman", "stpes": 5}))
    with pytest.raises(DagmanInputError, match="steps"):
        compose_pretrain_config({}, config_file=file)


# --- one label-format registry -------------------------------------------------------------------------------
def test_the_file_ending_chooses_the_format_and_an_unknown_one_is_refused(tmp_path):
    assert label_format(tmp_path / "a.nii.gz").name == "volume"
    assert label_format(tmp_path / "a.dcm").needs_source
    assert ".dcm" not in label_suffixes(with_source=False) and ".nrrd" in label_suffixes(with_source=False)
    with pytest.raises(DagmanInputError, match=r"cannot write a label map as '\.png': use one of \.nii\.gz"):
        label_format(tmp_path / "a.png")
    labels = Volume(np.zeros((2, 3, 4), np.int64), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(DagmanInputError, match="needs the image it segments"):
        write_labels(labels, tmp_path / "a.dcm", {})


def test_labels_are_written_in_the_narrowest_type_with_their_names(tmp_path):
    from napari_dagman.core.io import read_volume

    array = np.zeros((4, 5, 6), np.int64)
    array[1:3, 2:4, 1:5] = 2
    labels = Volume(array, spacing=(2.0, 1.0, 1.0))
    written = write_labels(labels, tmp_path / "seg.nii.gz", {2: "liver"})
    back = read_volume(tmp_path / "seg.nii.gz")
    assert np.asarray(back.array).dtype == np.uint8 and np.array_equal(np.asarray(back.array), array)
    assert json.loads((tmp_path / "seg.labels.json").read_text()) == {"2": "liver"} or any(
        p.endswith(".labels.json") for p in written
    )
    assert narrow_labels(np.array([0, 300])).dtype == np.uint16
    with pytest.raises(DagmanInputError, match="0..65535"):
        narrow_labels(np.array([-1, 2]))


# --- rules that were the docks' only -----------------------------------------------------------------------------
def test_slab_advice_names_the_missing_organ_and_a_slab_that_holds_it():
    labels = np.zeros((100, 4, 4), np.uint8)
    labels[5:40] = 1  # liver: top part only
    labels[60:95, :2] = 2  # kidney: bottom part only
    labels[60:95, 2:] = 1
    advice = slab_advice(labels, 1.0, 1.0, [1, 2], fraction=0.2, position=0.2, gap_mm=0.0)
    assert advice.missing == (2,) and advice.best_position is not None and advice.best_held == (1, 2)
    text = advice.text({1: "liver", 2: "kidney"}, 0.2)
    assert text.startswith("the validation slab (--val-position 0.2) holds no kidney: no Dice for them")
    assert not slab_advice(labels, 1.0, 1.0, [1, 2], fraction=0.2, position=0.8, gap_mm=0.0).missing


def test_embedding_patches_in_millimetres_and_auto_sampling():
    config = EmbedConfig(patch_mm=48.0, stride_mm=24.0, sampling="auto")
    on_3mm = config.resolved(3.0, has_labels=True)
    assert (on_3mm.patch, on_3mm.stride, on_3mm.sampling) == (16, 8, "both")
    assert config.resolved(1.5, has_labels=False).patch == 32
    assert config.resolved(3.0, has_labels=False).sampling == "grid"
    assert EmbedConfig(sampling="auto", pooling="token").resolved(3.0, has_labels=True).sampling == "grid"
