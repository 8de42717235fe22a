"""The second bad-input matrix (issue 28), outside the readers: label maps and CTs never taken for each other, a
reference of another labelling, empty flags, hostile JSON and safetensors headers, full disks, jobs that cannot fit
in memory or run out of it, and the embedding cache's leftovers. Each case is one line (exit 2 on the command line)
and leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import file_size_limit, run_cli

from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.io import read_volume, write_volume

TINY = ["--preset", "tiny", "--roi", "32", "--spacing", "4", "--batch-size", "1", "--steps", "1", "--quiet"]


# --- label maps and CTs ----------------------------------------------------------------------------------------
def test_a_label_map_given_as_the_ct_is_refused_by_every_job(shared_data, tmp_path, ft_run, tiny_run, capsys):
    seg = shared_data / "example_seg_fast_force_split.nii.gz"
    for argv in (
        ["pretrain", seg, "--out", tmp_path / "p", *TINY],
        ["finetune", seg, shared_data / "example_seg_fast_force_split.nii.gz", "--out", tmp_path / "f",
         "--preset", "tiny", "--roi", "64", "--spacing", "6", "--steps", "1", "--labels", "5", "--quiet"],
        ["predict", seg, "--checkpoint", ft_run, "--out", tmp_path / "pred.nii.gz", "--quiet"],
        ["embed", seg, "--checkpoint", tiny_run, "--out", tmp_path / "e", "--quiet"],
        ["attention", seg, "--checkpoint", tiny_run, "--out", tmp_path / "a", "--quiet"],
    ):
        status, err = run_cli(capsys, *argv)
        assert status == 2, (argv[0], err)
        assert "looks like a label map, not a CT" in err and "example_seg_fast_force_split" in err, err
    # nothing was written: every refusal came before the run folders and outputs
    assert not any(p.exists() for p in (tmp_path / "p", tmp_path / "f", tmp_path / "pred.nii.gz", tmp_path / "e"))


def test_a_ct_with_few_grey_values_can_be_read_as_one_when_the_user_says_so(shared_data, monkeypatch):
    from napari_dagman.core.errors import LabelMapAsCTError
    from napari_dagman.core.io import check_ct, read_volume

    seg = read_volume(shared_data / "example_seg.nii.gz")
    with pytest.raises(LabelMapAsCTError, match="NAPARI_DAGMAN_IMAGE_IS_CT=1"):
        check_ct(seg)
    seg.metadata["is_ct"] = True  # a layer marked "it is a CT" in napari
    assert check_ct(seg) is seg
    del seg.metadata["is_ct"]
    monkeypatch.setenv("NAPARI_DAGMAN_IMAGE_IS_CT", "1")
    assert check_ct(seg) is seg
    monkeypatch.setenv("NAPARI_DAGMAN_IMAGE_IS_CT", "maybe")
    with pytest.raises(DagmanInputError, match="NAPARI_DAGMAN_IMAGE_IS_CT must be 1 or 0, got 'maybe'"):
        check_ct(seg)


def test_a_folder_mixing_cts_and_segmentations_is_refused_for_pretraining(shared_data, tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        (folder / name).symlink_to(shared_data / name)
    status, err = run_cli(capsys, "pretrain", folder, "--out", tmp_path / "run", *TINY)
    assert status == 2 and "example_seg.nii.gz' looks like a label map" in err


def test_pretraining_on_a_nested_folder_uses_its_cts_and_leaves_their_label_maps_out(shared_data, tmp_path, capsys):
    """Issue 26: folders were not searched recursively, and `case_seg.nii.gz` beside `case.nii.gz` was a CT."""
    cases = tmp_path / "cohort"
    for sub, ct in (("s01", "example_ct_sm.nii.gz"), ("deeper/s02", "example_ct.nii.gz")):
        (cases / sub).mkdir(parents=True)
        (cases / sub / "ct.nii.gz").symlink_to(shared_data / ct)
    (cases / "s01" / "ct_seg.nii.gz").symlink_to(shared_data / "example_seg.nii.gz")
    (cases / ".trash").mkdir()
    (cases / ".trash" / "old.nii.gz").symlink_to(shared_data / "example_seg.nii.gz")
    status, err = run_cli(capsys, "pretrain", cases, "--out", tmp_path / "run", *TINY)
    assert status == 0, err
    images = json.loads((tmp_path / "run" / "config.json").read_text())["images"]
    assert sorted(Path(p).relative_to(cases).as_posix() for p in images) == ["deeper/s02/ct.nii.gz", "s01/ct.nii.gz"]
    assert "ct_seg.nii.gz" in err  # said once: the label map left out


def test_a_ct_given_as_the_label_map_is_refused(shared_data, tmp_path, capsys):
    ct = read_volume(shared_data / "example_ct_sm.nii.gz")
    raw = ct.with_array((ct.array + 1024).clip(0).astype(np.uint16))  # stored without its rescale: no negatives
    write_volume(raw, tmp_path / "raw_ct.nii.gz")
    status, err = run_cli(
        capsys, "finetune", shared_data / "example_ct_sm.nii.gz", tmp_path / "raw_ct.nii.gz", "--out", tmp_path / "f",
        "--preset", "tiny", "--roi", "64", "--spacing", "6", "--steps", "1", "--quiet",
    )
    assert status == 2 and "looks like a CT, not a label map" in err and "distinct values" in err


def test_a_reference_of_another_labelling_is_refused_with_both_names(shared_data, ft_run, tmp_path, capsys):
    reference = read_volume(shared_data / "example_seg_fast_force_split.nii.gz")
    names = {5: "aorta", 1: "common_carotid_artery_left", 2: "kidney_right", 3: "kidney_left"}
    write_volume(reference, tmp_path / "other.nii.gz", label_names=names)
    ct = tmp_path / "ct.nii.gz"
    ct.symlink_to(shared_data / "example_ct.nii.gz")
    out = tmp_path / "pred.nii.gz"
    status, err = run_cli(capsys, "predict", ct, "--checkpoint", ft_run, "--reference", tmp_path / "other.nii.gz",
                          "--out", out, "--quiet")
    assert status == 2 and "id 5 is 'aorta' there and 'liver' in the run" in err, err
    assert not out.exists()
    # the same ids named alike (case, spaces) are one labelling: accepted
    from napari_dagman.core.segmentation.jobs import check_reference_ids
    from napari_dagman.core.segmentation.labels import LabelMap

    reference.metadata["label_names"] = {5: "Liver", 2: "kidney right"}
    check_reference_ids(reference, LabelMap((5, 2), ("liver", "kidney_right")))


# --- flags ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "ct.nii.gz", "--checkpoint", "run", "--out", "o.nii.gz", "--reference", ""],
        ["finetune", "ct.nii.gz", "seg.nii.gz", "--out", "o", "--labels", ""],
        ["pretrain", "ct.nii.gz", "--out", "o", "--method="],
        ["export", "", "--format", "safetensors", "--out", "x.safetensors"],
    ],
)
def test_an_empty_flag_is_refused_not_taken_for_its_default(argv, capsys):
    status, err = run_cli(capsys, *argv)
    assert status == 2 and "is empty" in err


def test_a_path_that_does_not_exist_is_refused_before_napari_opens(tmp_path, capsys):
    status, err = run_cli(capsys, "view", tmp_path / "nonexistent" / "ct.nii.gz")
    assert status == 2 and "does not exist" in err
    status, err = run_cli(capsys, "view", tmp_path)
    assert status == 2 and "without DICOM" in err


# --- hostile JSON and safetensors headers ------------------------------------------------------------------------
def _safetensors(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_hostile_safetensors_headers_are_one_line_not_a_crash(tmp_path):
    deep = _safetensors(tmp_path / "deep.safetensors", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    huge = _safetensors(
        tmp_path / "huge.safetensors",
        json.dumps({"__metadata__": {"format": "napari-dagman/1", "x": "a" * (20 << 20)}}).encode(),
    )
    nested = _safetensors(
        tmp_path / "nested.safetensors",
        json.dumps({"__metadata__": {"format": "napari-dagman/1", "architecture": "[" * 5000 + "]" * 5000}}).encode(),
    )
    claim = tmp_path / "claim.safetensors"
    claim.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    code = (
        "import json, sys\nfrom napari_dagman.core.checkpoint import load_tensors\nfrom napari_dagman.core.errors "
        "import DagmanError\nfor path in sys.argv[1:]:\n    try:\n        load_tensors(path)\n    except DagmanError as "
        "err:\n        print(json.dumps(str(err)))\n"
    )
    paths = (deep, huge, nested, claim)
    # in one child (torch is imported once): a crash (signal 11) on any of them shows as a failed process
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(paths)  # one line each: the message itself holds no line break
    said = {path.stem: json.loads(line) for path, line in zip(paths, lines, strict=True)}
    assert all("\n" not in message for message in said.values())
    assert "nests 200001 levels deep" in said["deep"]
    assert "larger than it can be" in said["huge"]
    assert "metadata 'architecture' nests deeper" in said["nested"]
    assert "header length" in said["claim"]


def test_a_deeply_nested_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"steps": ' + "[" * 100_000 + "]" * 100_000 + "}")
    status, err = run_cli(capsys, "pretrain", "ct.nii.gz", "--out", tmp_path / "o", "--config", config)
    assert status == 2 and "nests 100001 levels deep" in err


def test_a_run_config_too_large_or_too_deep_is_refused(tiny_run, tmp_path):
    from napari_dagman.core.runs import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"architecture": ' + "[" * 10_000 + "]" * 10_000 + "}")
    with pytest.raises(CheckpointError, match="levels deep"):
        RunFolder(run).config_dict()


# --- full disk ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, name", [("monai-swinunetr", "enc.pt"), ("safetensors", "enc.safetensors")])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_run, tmp_path, capsys, fmt, name):
    out = tmp_path / "out"
    out.mkdir()
    with file_size_limit(64 << 10):  # the encoder is ~2 MB: its write fails part-way, as on a full disk
        status, err = run_cli(capsys, "export", tiny_run, "--format", fmt, "--out", out / name)
    assert status == 2 and "cannot write" in err and "File too large" in err, err
    assert sorted(p.name for p in out.iterdir()) == []  # no temporary, no half file


def test_a_writer_that_fails_in_its_own_words_is_one_line(tmp_path):
    from napari_dagman.core.files import atomic_write

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\nmore C++ lines")

    with pytest.raises(DagmanInputError) as info:
        atomic_write(tmp_path / "w.pt", write)
    assert str(info.value).count("\n") == 0 and "RuntimeError: [enforce fail" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --- memory -------------------------------------------------------------------------------------------------------
def test_a_prediction_that_cannot_fit_is_refused_before_it_starts(shared_data, ft_run, tmp_path, monkeypatch, capsys):
    """A CT whose header says 30 mm voxels (a tenth of the truth, as a wrong header gives) would be resampled
    to ~1.4 billion voxels at the run's spacing: refused with the figures, before the model runs."""
    import napari_dagman.core.memory as memory

    ct = read_volume(shared_data / "example_ct.nii.gz")
    write_volume(ct.with_array(ct.array), tmp_path / "coarse.nii.gz")
    coarse = read_volume(tmp_path / "coarse.nii.gz")
    coarse.spacing = (30.0, 30.0, 30.0)  # type: ignore[misc]
    write_volume(coarse, tmp_path / "coarse.nii.gz")
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 << 30)
    out = tmp_path / "pred.nii.gz"
    started = time.monotonic()
    status, err = run_cli(capsys, "predict", tmp_path / "coarse.nii.gz", "--checkpoint", ft_run, "--out", out, "--quiet")
    assert status == 2 and "segmenting this CT needs at least" in err and "8.0 GB available" in err, err
    assert "x the model's spacing (30, 30, 30 mm vs 6, 6, 6 mm): check the image's header" in err
    assert not out.exists()
    assert time.monotonic() - started < 60


def test_pretraining_that_cannot_fit_is_refused_before_it_starts(shared_data, tmp_path, monkeypatch, capsys):
    import napari_dagman.core.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 16 << 30)
    argv = ["pretrain", shared_data / "example_ct.nii.gz", "--out", tmp_path / "run", *TINY, "--spacing", "0.25"]
    status, err = run_cli(capsys, *argv)
    assert status == 2 and "pretraining on 1 volume(s) at 0.25 mm" in err and "16.0 GB available" in err, err
    assert not (tmp_path / "run").exists()
    # a ROI whose activations cannot fit (the network's share, a lower bound measured on this CPU)
    argv = ["pretrain", shared_data / "example_ct_sm.nii.gz", "--out", tmp_path / "run", *TINY, "--roi", "512",
            "--preset", "base", "--device", "cpu"]
    status, err = run_cli(capsys, *argv)
    assert status == 2 and "ROI 512 needs at least" in err and "smaller --roi" in err, err
    assert not (tmp_path / "run").exists()
    # the check can be turned off by a user who knows better
    monkeypatch.setenv(memory.NO_MEMORY_CHECK_ENV, "1")
    memory.require_memory(1e15, "x", "y")


def test_running_out_of_memory_mid_run_is_one_line_and_the_run_resumes(shared_data, tmp_path, monkeypatch, capsys):
    from napari_dagman.core.training.pretrain import PretrainTask

    original = PretrainTask.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PretrainTask, "step", step)
    run = tmp_path / "run"
    argv = ["pretrain", shared_data / "example_ct_sm.nii.gz", "--out", run, *TINY, "--steps", "5", "--save-every", "2"]
    status, err = run_cli(capsys, *argv)
    assert status == 2 and "out of memory at step 4 of 5" in err and "keeps step 2" in err, err
    assert json.loads((run / "run.json").read_text())["status"].startswith("failed: out of memory")
    monkeypatch.setattr(PretrainTask, "step", original)
    status, err = run_cli(capsys, *argv, "--resume")
    assert status == 0, err
    assert json.loads((run / "run.json").read_text())["steps_done"] == 5


# --- the embedding cache ------------------------------------------------------------------------------------------
def test_the_embedding_cache_removes_stale_temporaries_and_keeps_live_ones(tmp_path):
    from napari_dagman.core.embeddings.cache import STALE_TEMPORARY_S, EmbeddingCache

    stale, live = tmp_path / ".abc.k2j4h5g6.tmp.npz", tmp_path / ".def.a1b2c3d4.tmp.npz"
    for path in (stale, live):
        path.write_bytes(b"left by a killed write")
    old = time.time() - STALE_TEMPORARY_S - 60
    os.utime(stale, (old, old))
    cache = EmbeddingCache(tmp_path)
    cache.save_array("projection", np.zeros(3))
    assert not stale.exists() and live.exists()  # a younger one may be another process writing now
    assert (tmp_path / "projection.npz").is_file()


def test_a_system_error_rewrapped_by_a_library_is_one_line(tmp_path):
    """pydicom re-raises a full disk as an OSError whose text is the tag and a whole traceback."""
    from napari_dagman.core.files import atomic_write

    def write(tmp: Path) -> None:
        raise OSError(
            "With tag (7FE0,0010) got exception: [Errno 28] No space left on device\nTraceback (most recent call "
            'last):\n  File "pydicom/tag.py", line 29'
        )

    with pytest.raises(DagmanInputError) as info:
        atomic_write(tmp_path / "seg.dcm", write)
    assert str(info.value) == f"cannot write {tmp_path / 'seg.dcm'}: No space left on device"


def test_preparing_a_ct_for_the_model_prints_no_warning(shared_data):
    """MONAI's deprecated Orientationd default warned on every prediction and bundle run (stderr noise)."""
    import warnings

    from napari_dagman.core.segmentation.pipeline import to_model_space

    ct = read_volume(shared_data / "example_ct_sm.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data, _ = to_model_space(ct, 6.0, 3, (-1000.0, 1000.0))
    assert tuple(data["image"].shape) == (1, 15, 50, 61)  # 30 x 101 x 122 voxels of 3 mm at 6 mm


def test_a_job_cancelled_in_its_child_process_prints_no_traceback(capfd):
    """Closing napari with the explorer computing in its child: the cancel is no failure (it printed one)."""
    from tests.helpers import cancelled_job

    from napari_dagman._widgets.common.child_process import ChildProcessJob
    from napari_dagman.core.events import JobCancelled

    events = ChildProcessJob(cancelled_job, nice=0).events()
    assert next(events) == 1
    with pytest.raises(JobCancelled):
        next(events)
    assert "Traceback" not in capfd.readouterr().err


def test_the_child_process_waits_passively_in_openmp_unless_the_user_chose(monkeypatch):
    """Beside another training run, PyTorch's spinning OpenMP threads cut both runs to a fifth (0.11 and 0.19
    steps/s against 0.91 alone); passive waiting gave 0.61 and 0.60 (docs/pretraining.md#responsiveness)."""
    from tests.helpers import environment_job

    from napari_dagman._widgets.common.child_process import ChildProcessJob

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert list(ChildProcessJob(environment_job, "OMP_WAIT_POLICY", nice=0).events()) == [{"OMP_WAIT_POLICY": "PASSIVE"}]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own setting stays
    assert list(ChildProcessJob(environment_job, "OMP_WAIT_POLICY", nice=0).events()) == [{"OMP_WAIT_POLICY": "ACTIVE"}]


def test_out_of_memory_outside_training_is_one_line(shared_data, ft_run, tmp_path, monkeypatch, capsys):
    """A prediction whose allocation fails anyway (MONAI's Spacingd on a huge grid): one line, exit 2."""
    import napari_dagman.core.segmentation.prediction as prediction

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 22156689408 bytes.\nmore lines")

    monkeypatch.setattr(prediction, "sliding_window_logits", fail)
    status, err = run_cli(capsys, "predict", shared_data / "example_ct_sm.nii.gz", "--checkpoint", ft_run,
                          "--out", tmp_path / "p.nii.gz", "--quiet")
    assert status == 2 and "out of memory ([enforce fail at alloc_cpu.cpp:117]" in err and "crop the CT" in err
    assert not (tmp_path / "p.nii.gz").exists()
