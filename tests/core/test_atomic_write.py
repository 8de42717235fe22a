"""Atomic writes: a write that fails (writer error, failed check, full disk, read-only folder) leaves the old file
and no temporary behind and says why in one line; a finished one has the permissions a plain open() gives."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from tests.helpers import file_size_limit, read_only_folder

from napari_dagman.core.embeddings import EmbeddingCache
from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.io import atomic_write, atomic_write_text, read_volume, write_volume
from napari_dagman.core.volume import Volume

VOLUME_SUFFIXES = [".nii.gz", ".nii", ".mha", ".nrrd"]


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def seg(shared_data) -> Volume:
    """The real label map example_seg.nii.gz (122 x 101 x 30, uint8)."""
    return read_volume(shared_data / "example_seg.nii.gz")


def test_a_failing_writer_leaves_no_file(tmp_path):
    target = tmp_path / "table.csv"

    def write(tmp):
        tmp.write_text("half a table")
        raise RuntimeError("the writer broke")

    # a writer's own exception (torch, pydicom) is one line naming the file, with what it said
    with pytest.raises(DagmanInputError, match="cannot write .*table.csv: RuntimeError: the writer broke"):
        atomic_write(target, write)
    assert listing(tmp_path) == []
    target.write_text("old")
    with pytest.raises(DagmanInputError, match="the writer broke"):
        atomic_write(target, write)
    assert listing(tmp_path) == ["table.csv"] and target.read_text() == "old"


def test_a_failed_check_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": 1}')

    def verify(tmp):
        assert tmp.read_text() == '{"new"'  # the check sees what was written, before the rename
        raise DagmanInputError("the written file is incomplete")

    with pytest.raises(DagmanInputError) as info:
        atomic_write(target, lambda tmp: tmp.write_text('{"new"'), verify=verify)
    assert str(info.value) == f"cannot write {target}: the written file is incomplete"
    assert target.read_text() == '{"old": 1}' and listing(tmp_path) == ["metrics.json"]


def test_the_writer_gets_a_hidden_temporary_with_the_target_ending(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"data")

    assert atomic_write(tmp_path / "sub" / "a.nii.gz", write) == tmp_path / "sub" / "a.nii.gz"
    (tmp,) = seen
    assert tmp.parent == tmp_path / "sub" and tmp.name.startswith(".") and tmp.name.endswith(".tmp.nii.gz")
    assert (
        listing(tmp_path / "sub") == ["a.nii.gz"] and (tmp_path / "sub" / "a.nii.gz").read_bytes() == b"data"
    )
    atomic_write(tmp_path / "b.npz", lambda tmp: seen.append(tmp), suffix=".bin")
    assert seen[-1].name.endswith(".tmp.bin")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(seg, tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "notes.txt", "text")
        write_volume(seg, tmp_path / "seg.nii.gz", label_names={5: "liver"})
        EmbeddingCache(tmp_path / "cache").save_array("key", np.zeros((3, 2), np.float32))
    finally:
        os.umask(old)
    for name in ("notes.txt", "seg.nii.gz", "seg.labels.json", "cache/key.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("suffix", VOLUME_SUFFIXES)
def test_a_full_disk_keeps_the_old_volume(seg, tmp_path, suffix):
    """SimpleITK writes NIfTI to a full disk without an error; the check after writing catches it."""
    target = tmp_path / f"seg{suffix}"
    write_volume(seg, target)
    before = target.read_bytes()
    flipped = seg.with_array(np.ascontiguousarray(seg.array[::-1]))
    with file_size_limit(2000), pytest.raises(DagmanError) as info:
        write_volume(flipped, target)
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: ") and "\n" not in message
    if suffix.startswith(".nii"):
        assert "incomplete" in message
    assert target.read_bytes() == before and listing(tmp_path) == [target.name]
    np.testing.assert_array_equal(read_volume(target).array, seg.array)


def test_a_full_disk_keeps_the_old_text(tmp_path):
    target = tmp_path / "patches.csv"
    target.write_text("old")
    with file_size_limit(2000), pytest.raises(DagmanInputError) as info:
        atomic_write_text(target, "x" * 10_000)
    assert str(info.value) == f"cannot write {target}: File too large"
    assert target.read_text() == "old" and listing(tmp_path) == ["patches.csv"]


def test_a_volume_in_a_read_only_folder_is_one_line(seg):
    with read_only_folder() as folder:
        with pytest.raises(DagmanError) as info:
            write_volume(seg, folder / "seg.nii.gz")
        assert str(info.value) == f"cannot write {folder / 'seg.nii.gz'}: Permission denied"
        with pytest.raises(DagmanError) as info:
            write_volume(seg, folder / "new" / "seg.nii.gz")
        assert str(info.value) == (
            f"cannot write {folder / 'new' / 'seg.nii.gz'}: Permission denied ({folder / 'new'})"
        )
        assert listing(folder) == []
