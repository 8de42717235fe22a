"""Files written safely, without SimpleITK or torch: one atomic write (a temporary file in the target folder,
verified, fsynced, renamed), the clean-up of what a killed job left, and output folders and files checked before
any work (`core.io` re-exports these for its readers and writers)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.errors import DagmanError, DagmanInputError, first_line


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case file ending, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike) -> str:
    """File name without its (possibly double) suffix."""
    name = Path(path).name
    suffix = suffix_of(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    *,
    verify: Callable[[Path], object] | None = None,
    suffix: str | None = None,
) -> Path:
    """Write ``path`` completely or not at all: the project's one way to write a whole file.

    ``write(tmp)`` fills a temporary file in the target's folder whose name ends like the target (or in
    ``suffix``), so writers that choose the format by extension (SimpleITK, numpy) write the right one.
    ``verify(tmp)``, when given, checks what was written and raises if it is wrong. The file is then fsynced,
    given the permissions of a plain ``open()`` and renamed onto ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was. An `OSError` (disk full, no
    permission, read-only file system) or a `DagmanError` from ``write``/``verify`` (whose message is the
    reason) is raised as one line, ``cannot write <path>: <reason>``, of the same `DagmanError` class
    (`DagmanInputError` for an `OSError`).
    """
    path = Path(path)
    ending = suffix_of(path) if suffix is None else suffix
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # hidden, and ".tmp" before the ending: a leftover from a killed process is recognisable as one
        fd, name = tempfile.mkstemp(prefix=f".{stem_of(path)}.", suffix=f".tmp{ending}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        if verify is not None:
            verify(tmp)
        publish(tmp, path)
        tmp = None  # renamed into place: nothing left to clean up
    except OSError as err:
        raise DagmanInputError(f"cannot write {path}: {_os_reason(err, path.parent)}") from None
    except DagmanError as err:
        raise type(err)(f"cannot write {path}: {err}") from None
    except Exception as err:  # a library's own words for a failed write (torch: "enforce fail at ...")
        raise DagmanInputError(f"cannot write {path}: {_library_reason(err, path.parent)}") from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # gone with its folder: nothing more to clean
                tmp.unlink()
    return path


#: The name `atomic_write` gives its temporary file: hidden, the target's stem, mkstemp's 8 random characters,
#: ".tmp" and the target's ending. What a killed process leaves behind; nothing else is named like this.
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?")


def is_temporary(name: str) -> bool:
    """True for the name of a temporary file of `atomic_write` (a leftover when its process was killed)."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_temporaries(folder: str | os.PathLike, *, older_than_s: float | None = None) -> list[str]:
    """Delete the leftovers of killed writes in ``folder``.

    Without ``older_than_s`` only safe while no other process writes there (a run folder under its lock); a
    folder that several processes share (the embedding cache) passes an age no live write reaches.
    """
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            if is_temporary(entry.name) and entry.is_file():
                with contextlib.suppress(OSError):
                    if older_than_s is not None and now - entry.stat().st_mtime < older_than_s:
                        continue
                    entry.unlink()
                    removed.append(entry.name)
    return removed


#: Age (s) after which an `atomic_write` temporary in a shared cache folder is a leftover of a killed process: a
#: cache write takes seconds, so an hour-old one is no live write of another napari or CLI job sharing the folder.
STALE_TEMPORARY_S = 3600.0


class CacheFolder:
    """A cache folder that several processes share: each file written whole (`atomic_write`), the leftovers of
    killed writes swept before the first write, and a write that fails turning the cache read-only (reads still
    serve) with one warning in `failures`, instead of failing the job."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        #: Set when a write failed: later writes are skipped.
        self.read_only = False
        #: The reason of the write that failed (one at most).
        self.failures: list[str] = []
        self._swept = False

    def sweep(self, *folders: Path) -> list[str]:
        """Remove what killed writes left in the cache (temporaries older than `STALE_TEMPORARY_S`; younger ones
        may belong to another process writing now). Done before the first write."""
        self._swept = True
        return [n for folder in (self.root, *folders) for n in remove_temporaries(folder, older_than_s=STALE_TEMPORARY_S)]

    def store(self, path: Path, write: Callable[[Path], object]) -> bool:
        """Write one file of the cache; False (and read-only from now on) when it cannot be written."""
        if self.read_only:
            return False
        if not self._swept:
            self.sweep(*({path.parent} - {self.root}))
        try:
            atomic_write(path, write)
        except DagmanError as err:
            self.read_only = True
            self.failures.append(str(err))
            return False
        return True


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> None:
    """Refuse, before any work is spent, an output folder that cannot be written.

    It must not be a file nor lie under one, and the folder (or, when it does not exist yet, the nearest folder
    above it, where it will be created) must accept a new file: that is tried, not guessed from permissions
    (root, ACLs and read-only mounts make guesses wrong). Nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DagmanInputError(f"the {what} {path} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DagmanInputError(f"cannot create the {what} {path}: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dagman-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DagmanInputError(f"cannot write to the {what} {path}: {_os_reason(err, existing)}") from None


def check_output_file(path: str | os.PathLike, what: str = "output file") -> None:
    """Refuse, before any work is spent, a file that cannot be written (a folder by that name, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise DagmanInputError(f"the {what} {path} is a folder")
    check_output_folder(path.parent, f"folder of the {what}")


def _os_reason(err: OSError, folder: Path) -> str:
    """The system's reason, naming the file concerned when it lies outside the target's folder (a parent)."""
    reason = err.strerror
    if not reason:  # a library that re-raised the system's error with its own text (pydicom: tag, then a traceback)
        found = re.search(r"\[Errno (\d+)\]", str(err))
        reason = os.strerror(int(found.group(1))) if found else first_line(err)
    if isinstance(err.filename, (str, bytes, os.PathLike)):
        concerned = Path(os.fsdecode(err.filename))
        if concerned.parent != folder:
            return f"{reason} ({concerned})"
    return reason


#: Free space under which a failed write is put down to a full disk (a library that hides the system's error).
_NEARLY_FULL_BYTES = 1 << 20


def _library_reason(err: Exception, folder: Path) -> str:
    """One line for a writer that failed with its own exception: a full disk when the folder's file system is
    (nearly) full, else the first line of what it said, with its type."""
    with contextlib.suppress(OSError):
        info = os.statvfs(folder)
        if info.f_bavail * info.f_frsize < _NEARLY_FULL_BYTES:
            return os.strerror(28)  # ENOSPC: "No space left on device"
    return f"{type(err).__name__}: {first_line(err)}"


def _umask_mode() -> int:
    """Permissions a normal ``open()`` would give a new file (mkstemp's are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync a finished temporary file, give it normal permissions and rename it onto ``path``.

    The last step of `atomic_write`; the caller removes ``tmp`` when this raises.
    """
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file and a rename (see `atomic_write`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


# --- reading JSON with limits ------------------------------------------------------------------------------------
#: Most bytes of JSON we parse from one file or header: far above what this tool writes (a run config holds a few
#: KB, a base-preset safetensors header well under 1 MB), far below what would exhaust memory or time.
MAX_JSON_BYTES = 16 * 2**20
#: Deepest nesting of JSON we parse: ours nest at most 5 levels; Python's parser recurses once per level, and a
#: hostile file nested 100,000 deep would end in a RecursionError (or, in native parsers, a crash).
MAX_JSON_DEPTH = 64
#: A JSON string literal (escapes included): its brackets are text, not nesting.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def json_depth(raw: str | bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a bare value), counted without parsing it."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    opens = (bare == ord("[")) | (bare == ord("{"))
    closes = (bare == ord("]")) | (bare == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def parse_json(
    raw: str | bytes,
    what: str,
    *,
    error: type[DagmanError] = DagmanInputError,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """JSON parsed with limits on size and nesting checked first; anything wrong is ``error`` in one line naming
    ``what``. Every JSON this tool reads from a file a user hands it goes through here."""
    if len(raw) > max_bytes:
        raise error(f"{what} is larger than it can be ({len(raw):,} bytes; at most {max_bytes:,})")
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{what} nests {depth} levels deep (at most {max_depth}): not a file this tool wrote")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error(f"{what} is not valid JSON ({reason})") from None


def read_json(
    path: str | os.PathLike,
    what: str | None = None,
    *,
    error: type[DagmanError] = DagmanInputError,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """A JSON file parsed with `parse_json`'s limits; its size is checked before it is read."""
    path = Path(path)
    what = what or str(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{what} is larger than it can be ({size:,} bytes; at most {max_bytes:,})")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} does not exist") from None
    except OSError as err:
        raise error(f"cannot read {what}: {err.strerror or err}") from None
    return parse_json(raw, what, error=error, max_bytes=max_bytes)
