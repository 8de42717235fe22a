"""The bounded in-RAM set of prepared volumes (`--memory-cache`, MONAI's SmartCacheDataset scheme)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dagman.core.data import PreparedVolume, ViewSampler
from napari_dagman.core.resident_volumes import ResidentVolumes


def volumes(n: int, tmp_path=None) -> list[PreparedVolume]:
    """``n`` volumes whose every voxel holds the volume's number (a crop says where it came from); memory-mapped
    from .npy files when ``tmp_path`` is given, as the cache maps them."""
    out = []
    for i in range(n):
        array = np.full((20, 24, 24), i / 10, np.float32)
        if tmp_path is not None:
            np.save(tmp_path / f"v{i}.npy", array)
            array = np.load(tmp_path / f"v{i}.npy", mmap_mode="r")
        out.append(PreparedVolume(array, (2.0,) * 3, (0.0,) * 3, np.eye(3), f"v{i}", f"h{i}"))
    return out


def sampler(prepared, resident=None, **kw) -> ViewSampler:
    return ViewSampler(prepared, roi=8, dims=3, batch_size=kw.pop("batch_size", 2), seed=3, resident=resident, **kw)


def test_samples_come_from_the_rounds_held_volumes_and_the_walk_covers_the_cohort(tmp_path):
    prepared = volumes(6, tmp_path)
    resident = ResidentVolumes(prepared, size=2, replace_rate=0.5, seed=3)
    views = sampler(prepared, resident, batch_size=1)
    seen = set()
    for step in range(24):
        batch = views.sample(step)
        v = batch.crops[0].volume
        assert v in resident.window(step // 2)  # sample == step here (batch 1, one process)
        assert np.allclose(batch.views[:, 0], v / 10)  # the crop was cut from that volume's RAM copy
        assert len(resident.held) <= 2  # never more than --memory-cache volumes in RAM
        assert all(not isinstance(a, np.memmap) for a in resident.held.values())
        seen.add(v)
    assert seen == set(range(6))  # the window walks through every volume
    assert resident.window(1)[:1] == resident.window(0)[1:]  # one of two swapped per round


def test_the_views_are_a_function_of_the_step_alone_with_a_resident_set(tmp_path):
    """Exact resume: a fresh sampler (a resumed run) draws step k's views as the running one did."""
    prepared = volumes(5, tmp_path)
    running = sampler(prepared, ResidentVolumes(prepared, size=2, replace_rate=0.25, seed=3))
    drawn = [running.sample(step).views for step in range(8)]
    resumed = sampler(prepared, ResidentVolumes(prepared, size=2, replace_rate=0.25, seed=3))
    for step in (5, 6, 7):
        assert np.array_equal(resumed.sample(step).views, drawn[step])


@pytest.mark.parametrize("size", [0, 5])
def test_without_a_bounded_set_every_volume_is_drawn_from_its_mapped_array(tmp_path, size):
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.methods.base import InputSpec
    from napari_dagman.core.training.pretrain import make_sampler

    prepared = volumes(5, tmp_path)
    config = PretrainConfig(roi=32, batch_size=2, memory_cache=size)
    assert make_sampler(config, InputSpec(), prepared).resident is None  # 0 = off; as many as the cohort: no need
    config = PretrainConfig(roi=32, batch_size=2, memory_cache=2, memory_replace=0.5)
    resident = make_sampler(config, InputSpec(), prepared).resident
    assert resident is not None and resident.size == 2 and resident.replace == 1


def test_a_run_with_a_memory_cache_trains_and_says_what_it_holds(tmp_path, shared_data):
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import FinishedEvent, LogEvent
    from napari_dagman.core.training import run_pretraining

    images = [str(shared_data / "example_ct.nii.gz"), str(shared_data / "example_ct_sm.nii.gz")]
    config = PretrainConfig(
        images=images, out=str(tmp_path / "run"), preset="tiny", roi=32, spacing=4.0, steps=2, batch_size=1,
        preview_every=0, probe_every=0, memory_cache=1,
    )  # fmt: skip
    events = list(run_pretraining(config))
    said = [e.message for e in events if isinstance(e, LogEvent)]
    assert any(m.startswith("memory cache: 1 of 2 volumes held in RAM") for m in said), said
    assert isinstance(events[-1], FinishedEvent) and events[-1].steps_done == 2
