"""Shared fixtures: the real CT in ../shared/data (one helper, one place) and small pretraining runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$DAGMAN_SHARED_DATA`` or ``../shared/data`` next to the repository."""
    return Path(os.environ.get("DAGMAN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def volume_cache_dir(tmp_path_factory) -> Path:
    """The prepared-volume cache of the whole session (never the user's ~/.cache), shared by the runs of the suite
    and by the child processes of the docks' jobs (they inherit the environment)."""
    path = tmp_path_factory.mktemp("volume-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_DAGMAN_VOLUME_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "example_ct.nii.gz").is_file():
        pytest.skip(f"real CT test data not found at {path} (set DAGMAN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shared_data) -> Path:
    """A 3-step tiny 3D DAGMaN run at ROI 32 on the real CT, shared by tests that need a run folder."""
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    out = tmp_path_factory.mktemp("runs") / "tiny3d"
    config = PretrainConfig(
        images=[str(shared_data / "example_ct.nii.gz")], out=str(out), preset="tiny", roi=32, spacing=4.0,
        steps=3, batch_size=1, preview_every=0, seed=0,
    )
    consume(run_pretraining(config))
    return out


@pytest.fixture(scope="session")
def tiny_run_2d(tmp_path_factory, shared_data) -> Path:
    """A 3-step tiny 2D (axial slices) DAGMaN run at ROI 64."""
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import consume, run_pretraining

    out = tmp_path_factory.mktemp("runs") / "tiny2d"
    config = PretrainConfig(
        images=[str(shared_data / "example_ct.nii.gz")], out=str(out), preset="tiny", dims=2, roi=64, spacing=3.0,
        steps=3, batch_size=1, preview_every=0, seed=0,
    )
    consume(run_pretraining(config))
    return out


@pytest.fixture(scope="session")
def ft_run(tmp_path_factory, shared_data, tiny_run) -> Path:
    """A 2-step fine-tuning run initialised from the tiny DAGMaN run."""
    from tests.helpers import ft_config

    from napari_dagman.core.segmentation import run_finetuning
    from napari_dagman.core.training import consume

    out = tmp_path_factory.mktemp("finetune") / "seg"
    consume(run_finetuning(ft_config(shared_data, out, init=str(tiny_run), steps=2, val_every=2)))
    return out
