"""Test helpers that write small inputs (synthetic DICOM series, broken files) and make writing fail."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    *,
    uid: str,
    description: str,
    spacing=(0.8, 0.8, 2.5),
    prefix: str = "s",
    tilt_mm: float = 0.0,
    origin=(0.0, 0.0, 0.0),
    edits: dict[int, dict[str, str | None]] | None = None,
) -> list[Path]:
    """Write ``array`` (z, y, x int16 HU) as a DICOM CT series with SimpleITK (one file per slice).

    ``tilt_mm`` shifts each slice's position by that much along y per slice, as a tilted gantry does. ``edits``
    then changes the header of slice k: ``{k: {"RescaleSlope": "abc", "Modality": None}}`` sets each tag (by
    keyword) to that text as stored, whatever its VR, or removes it (None); as a PACS export can have it.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(array.shape[0]):
        sl = image[:, :, k]
        x, y, z = image.TransformIndexToPhysicalPoint((0, 0, k))
        position = "\\".join(str(v) for v in (x, y + k * tilt_mm, z))
        tags = {
            "0008|0060": "CT",
            "0020|000e": uid,
            "0008|103e": description,
            "0020|0013": str(k + 1),
            "0020|0032": position,
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "0",
            "0028|1053": "1",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    for k, changes in (edits or {}).items():
        _edit_dicom(files[k], changes)
    return files


def _edit_dicom(path: Path, changes: dict[str, str | None]) -> None:
    """Set tags of a DICOM file (implicit VR, as SimpleITK writes it) to raw text, or remove them (None)."""
    import pydicom
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(path)
    for keyword, text in changes.items():
        tag = tag_for_keyword(keyword)
        if text is None:
            if tag in ds:
                del ds[tag]
        else:  # as LO: the text is stored as given (a DS would be checked); implicit VR keeps no VR in the file
            ds[tag] = DataElement(tag, "LO", text)
    ds.save_as(path)


#: The user id of 'nobody': who root becomes to meet permissions it would otherwise ignore.
NOBODY = 65534


@contextmanager
def read_only_folder() -> Iterator[Path]:
    """A folder this process may read but not write to, during the block (the kernel answers EACCES).

    Root ignores permissions, so as root the block runs with the effective user id of 'nobody' (the folder
    sits in the system temporary folder, which everyone can traverse; pytest's tmp_path is owner-only).
    """
    base = Path(tempfile.mkdtemp(prefix="dagman-read-only-"))
    folder = base / "read-only"
    folder.mkdir()
    base.chmod(0o755)
    folder.chmod(0o555)
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(NOBODY)
        yield folder
    finally:
        if as_root:
            os.seteuid(0)
        folder.chmod(0o755)
        shutil.rmtree(base)


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """During the block, writing past ``nbytes`` of any file fails with EFBIG, as writing to a full disk does.

    SIGXFSZ is ignored meanwhile, so the write returns the error instead of the process being killed.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


#: Organs of the small fine-tuning runs: liver, spleen, kidneys, colon.
ORGANS = [5, 1, 2, 3, 20]


def ft_config(shared_data: Path, out: Path, **changes: Any):
    """A fast fine-tuning job on the real CT: tiny model, 6 mm, ROI 64, one crop per step."""
    from napari_dagman.core.config import FinetuneConfig

    base = {
        "images": [str(shared_data / "example_ct.nii.gz")],
        "segmentations": [str(shared_data / "example_seg_fast_force_split.nii.gz")],
        "out": str(out),
        "organs": ORGANS,
        "roi": 64,
        "spacing": 6.0,
        "steps": 3,
        "batch_size": 1,
        "val_every": 3,
        "val_fraction": 0.25,
        "val_position": 0.75,
        "device": "cpu",
    }
    base.update(changes)
    return FinetuneConfig(**base)


def cancelled_job(*, cancel: Any = None) -> Iterator[int]:
    """A background job that yields once and is then cancelled (napari closed under it): for the child process."""
    from napari_dagman.core.events import JobCancelled

    yield 1
    raise JobCancelled("the job was cancelled")


def environment_job(*names: str, cancel: Any = None) -> Iterator[dict[str, str | None]]:
    """A background job that yields the environment variables ``names`` as its process sees them."""
    import os

    yield {name: os.environ.get(name) for name in names}


def run_cli(capsys: Any, *argv: Any) -> tuple[int, str]:
    """Exit status and stderr of one command; a refusal is one error line (after any progress lines it printed
    as the job ran), never a traceback."""
    from napari_dagman.cli import main

    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    if status == 2:
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return status, err


def job_result(job: Iterator[Any]) -> tuple[Any, list[Any]]:
    """Run a job generator to its end: (its return value, the events it yielded)."""
    events = []
    while True:
        try:
            events.append(next(job))
        except StopIteration as stop:
            return stop.value, events
