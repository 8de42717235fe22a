"""The prepared-volume cache (issue 26): a CT is prepared once per content and settings, mapped back read-only,
never trusted when damaged, written whole by concurrent processes; pretraining reads a cohort through it."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import job_result

from napari_dagman.core.errors import LabelMapAsCTError
from napari_dagman.core.training.inputs import PrepareSettings, prepare_sources
from napari_dagman.core.volume_cache import VolumeCache

SETTINGS = PrepareSettings(dims=3, spacing=4.0, hu_range=(-175.0, 250.0), roi=32)


def run(paths, settings=SETTINGS, **kwargs):
    """`prepare_sources` to its end: (Preparation, events)."""
    return job_result(prepare_sources([str(p) for p in paths], settings, **kwargs))


@pytest.fixture
def ct(tmp_path, shared_data) -> Path:
    path = tmp_path / "ct.nii.gz"
    shutil.copy(shared_data / "example_ct_sm.nii.gz", path)
    return path


def test_second_run_maps_the_same_arrays_from_disk(tmp_path, ct):
    cache = VolumeCache(tmp_path / "cache")
    first, _ = run([ct], cache=cache)
    second, _ = run([ct], cache=VolumeCache(tmp_path / "cache"))
    memory, _ = run([ct], cache=None)
    assert (first.built, first.cached, second.built, second.cached) == (1, 0, 0, 1)
    mapped = second.volumes[0]
    assert isinstance(mapped.array, np.memmap) and not mapped.array.flags.writeable
    np.testing.assert_array_equal(mapped.array, memory.volumes[0].array)
    assert mapped.origin == memory.volumes[0].origin and mapped.spacing == memory.volumes[0].spacing
    assert mapped.source_hash == memory.volumes[0].source_hash and mapped.name == memory.volumes[0].name


def test_a_changed_file_or_changed_settings_is_a_miss(tmp_path, ct, shared_data):
    cache = VolumeCache(tmp_path / "cache")
    run([ct], cache=cache)
    again, _ = run([ct], PrepareSettings(dims=3, spacing=5.0, hu_range=(-175.0, 250.0), roi=32), cache=cache)
    assert again.built == 1
    shutil.copy(shared_data / "example_ct.nii.gz", ct)  # the same path, other bytes
    changed, _ = run([ct], cache=VolumeCache(tmp_path / "cache"))
    assert changed.built == 1
    fresh, _ = run([ct], cache=None)
    np.testing.assert_array_equal(changed.volumes[0].array, fresh.volumes[0].array)


@pytest.mark.parametrize("damage", ["truncate", "flip bytes", "manifest"])
def test_a_damaged_entry_is_a_miss_and_is_rebuilt(tmp_path, ct, damage):
    root = tmp_path / "cache"
    first, _ = run([ct], cache=VolumeCache(root))
    expected = np.array(first.volumes[0].array)
    (array_file,) = root.glob("*.npy")
    if damage == "truncate":
        array_file.write_bytes(array_file.read_bytes()[:-1000])
    elif damage == "flip bytes":  # same size, other values: found by the recorded sha256
        data = bytearray(array_file.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\x7f" * 64
        array_file.write_bytes(bytes(data))
    else:
        (manifest,) = root.glob("*.json")
        manifest.write_text(manifest.read_text()[:40])
    again, _ = run([ct], cache=VolumeCache(root))
    assert (again.built, again.cached) == (1, 0)
    np.testing.assert_array_equal(again.volumes[0].array, expected)


def _build(root: str, path: str) -> int:
    out, _ = run([path], cache=VolumeCache(root))
    return out.built


def test_two_processes_building_one_entry_leave_whole_files(tmp_path, ct):
    root = tmp_path / "cache"
    # spawned, not forked: a fork of a process that has started torch's threads can hang
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = list(pool.map(_build, [str(root)] * 2, [str(ct)] * 2))
    assert sum(built) >= 1
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    assert len([n for n in names if n.endswith(".npy")]) == 1 and len([n for n in names if n.endswith(".json")]) == 1
    assert not [n for n in names if n.startswith(".")]  # no temporary left
    after, _ = run([ct], cache=VolumeCache(root))
    assert after.cached == 1
    fresh, _ = run([ct], cache=None)
    np.testing.assert_array_equal(after.volumes[0].array, fresh.volumes[0].array)


def test_a_label_map_among_the_files_is_refused_and_never_cached(tmp_path, ct, shared_data):
    seg = tmp_path / "seg.nii.gz"
    shutil.copy(shared_data / "example_seg.nii.gz", seg)
    root = tmp_path / "cache"
    with pytest.raises(LabelMapAsCTError, match="seg"):
        run([ct, seg], cache=VolumeCache(root))
    with pytest.raises(LabelMapAsCTError):
        run([seg], cache=VolumeCache(root))
    assert len(list(root.glob("*.json"))) == 1  # the CT's entry only


def test_other_processes_map_what_the_first_built(tmp_path, ct, monkeypatch):
    root = tmp_path / "cache"
    run([ct], cache=VolumeCache(root))

    def no_read(path, **kwargs):
        raise AssertionError("a torchrun process other than the first read a CT")

    monkeypatch.setattr("napari_dagman.core.training.inputs.read_volumes", no_read)
    waited = []
    out, events = run([ct], cache=VolumeCache(root), is_main=False, barrier=lambda: waited.append(1))
    assert waited == [1] and out.cached == 1 and not events  # no progress from a process that prepares nothing


def test_a_folder_that_cannot_be_written_keeps_the_job_in_memory(tmp_path, ct):
    blocker = tmp_path / "a file"
    blocker.write_text("")  # a cache folder below a file cannot be made, whoever runs this (root too)
    out, events = run([ct], cache=VolumeCache(blocker / "cache"))
    assert out.built == 1 and not isinstance(out.volumes[0].array, np.memmap)
    warnings = [e.message for e in events if getattr(e, "level", "") == "warning"]
    assert len(warnings) == 1 and "not cached" in warnings[0]
    fresh, _ = run([ct], cache=None)
    np.testing.assert_array_equal(out.volumes[0].array, fresh.volumes[0].array)


def _resident_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_release_pages_drops_a_mapped_volume_from_resident_memory(tmp_path):
    from napari_dagman.core.data import release_pages

    np.save(tmp_path / "big.npy", np.ones((64, 512, 512), np.float32))  # 64 MiB
    array = np.load(tmp_path / "big.npy", mmap_mode="r")
    before = _resident_kb()
    assert float(array.sum()) == 64 * 512 * 512  # touches every page
    touched = _resident_kb()
    release_pages(array)
    released = _resident_kb()
    assert touched - before > 50_000 and released - before < 10_000
    assert float(array[3, 4, 5]) == 1.0  # still readable after


def test_pretraining_reads_a_warm_cache_and_records_it(tmp_path, ct):
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    root = tmp_path / "cache"

    def pretrain(out: str, **more):
        config = PretrainConfig(
            images=[str(ct)], out=str(tmp_path / out), preset="tiny", roi=32, spacing=4.0, steps=1, batch_size=1,
            preview_every=0, probe_every=0, cache_dir=str(root), **more,
        )
        consume(run_pretraining(config))
        return json.loads((tmp_path / out / "run.json").read_text())

    first, second = pretrain("a"), pretrain("b")
    assert first["volume_cache"] == {"folder": str(root), "found": 0, "prepared": 1}
    assert second["volume_cache"]["found"] == 1 and second["data"] == first["data"]
    off = pretrain("c", cache=False)
    assert "volume_cache" not in off and off["data"] == first["data"]


def test_the_docks_layers_and_files_train_together_the_files_through_the_cache(tmp_path, ct):
    """The pretraining dock passes its layers as volumes and its files as images (``with_images``): both are
    trained on, the files read by the run through the cache (the dock read them itself before, all into RAM)."""
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.phantom import make_phantom
    from napari_dagman.core.training import consume, run_pretraining

    layer, _ = make_phantom()
    layer.metadata["name"] = "phantom layer"

    def pretrain(out: str, with_images: bool) -> dict:
        config = PretrainConfig(
            images=[str(ct)], out=str(tmp_path / out), preset="tiny", roi=32, spacing=4.0, steps=1, batch_size=1,
            preview_every=0, probe_every=0, cache_dir=str(tmp_path / "cache"),
        )
        consume(run_pretraining(config, [layer], with_images=with_images))
        return json.loads((tmp_path / out / "run.json").read_text())

    both = pretrain("both", True)
    assert [d["name"] for d in both["data"]] == ["phantom layer", "ct"]
    assert both["volume_cache"]["prepared"] == 1
    layers_only = pretrain("layers", False)  # the API's meaning of volumes without with_images: those only
    assert [d["name"] for d in layers_only["data"]] == ["phantom layer"]
