"""The prepared-volume cache: CTs read, checked, resampled and cropped to the body once, kept on disk, read back
memory-mapped.

A cohort of hundreds of clinical CTs does not fit in RAM as float32 arrays, and preparing it again at every run,
every ``--resume`` and in every ``torchrun`` process costs minutes. Here a source (a file or a DICOM folder) is
prepared once per set of preprocessing settings; its volumes are stored as ``.npy`` arrays under a key made of the
source's **content** (sha256 of its bytes) and the settings, with a manifest (``<key>.json``, written last) that
holds their geometry, names and notes. A run maps the arrays read-only and copies only the crops a step needs;
`release_pages` drops the mapped pages from the process after each batch, so its resident memory is the crops,
not the cohort (the pages stay in the operating system's file cache, shared by every process).

A cache never breaks a job and is never trusted blindly:

* a changed file is a new key (its bytes are hashed; a per-file index keyed by path, size and modification time
  spares re-hashing an unchanged file at the next run), changed settings are a new key;
* a damaged entry is a miss: a manifest that does not parse, an array whose header, shape or type differs from its
  manifest, or whose file changed since it was written (size or time) and no longer has the recorded sha256;
* entries are written with `atomic_write` (a temporary renamed into place): two processes building the same
  entry leave one whole file;
* a folder that cannot be written is read as it is and the job prepares in memory, which is said once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_dagman.core.data import PreparedVolume, release_pages
from napari_dagman.core.embeddings.cache import cache_key
from napari_dagman.core.files import CacheFolder
from napari_dagman.core.hashing import file_hash

#: Bump when preparation changes what a cached array holds (invalidates every entry).
CACHE_VERSION = 1

#: Environment variable naming the cache folder (else ``$XDG_CACHE_HOME/napari-dagman/volumes``).
VOLUME_CACHE_ENV = "NAPARI_DAGMAN_VOLUME_CACHE"

#: What reading a damaged entry raises (cut file, bad header, broken or wrongly shaped JSON).
_DAMAGED = (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError)


def default_volume_cache_dir() -> Path:
    """``$NAPARI_DAGMAN_VOLUME_CACHE``, else ``$XDG_CACHE_HOME/napari-dagman/volumes`` (``~/.cache`` by default)."""
    if os.environ.get(VOLUME_CACHE_ENV):
        return Path(os.environ[VOLUME_CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "napari-dagman" / "volumes"


def _files_of(path: Path) -> list[Path]:
    """A source's files: the file itself, or every file below a folder (sorted, hidden ones skipped)."""
    if path.is_file():
        return [path]
    out = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
    return out


class VolumeCache(CacheFolder):
    """Prepared volumes on disk (see the module's text): `load` and `save` a source's volumes under a key."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        super().__init__(root or default_volume_cache_dir())
        self.warnings: list[str] = []

    # --- keys ---------------------------------------------------------------------------------------------------
    def source_digest(self, path: str | os.PathLike) -> str:
        """sha256 of a source's bytes (a folder: of its files' names and bytes), looked up in the cache's index by
        (path, size, modification time) of every file so that an unchanged cohort is not hashed again."""
        path = Path(path)
        files = _files_of(path)
        stats = [(str(f.relative_to(path)) if f != path else f.name, f.stat()) for f in files]
        signature = cache_key(
            {"path": str(path.resolve()), "files": [(n, s.st_size, s.st_mtime_ns) for n, s in stats]}
        )
        index = self.root / "sources" / f"{signature}.txt"
        try:
            known = index.read_text().strip()
            if len(known) == 64:
                return known
        except (OSError, UnicodeDecodeError):
            pass
        digest = hashlib.sha256()
        for (name, _), f in zip(stats, files, strict=True):
            digest.update(name.encode() + b"\0" + file_hash(f).encode())
        value = digest.hexdigest()
        self._write(index, lambda tmp: tmp.write_text(value))
        return value

    def key(self, path: str | os.PathLike, settings: dict[str, Any]) -> str:
        """The entry of a source prepared with ``settings`` (every setting that changes the arrays)."""
        return cache_key({"version": CACHE_VERSION, "source": self.source_digest(path), "settings": settings})

    # --- reading ------------------------------------------------------------------------------------------------
    def load(self, key: str) -> list[dict[str, Any]] | None:
        """The cached volumes of ``key``, each ``{"volume": PreparedVolume, "high_res": PreparedVolume | None}``,
        arrays memory-mapped read-only; None when missing or damaged."""
        try:
            manifest = json.loads((self.root / f"{key}.json").read_text())
            if manifest.get("version") != CACHE_VERSION:
                return None
            out = []
            for record in manifest["volumes"]:
                volume = self._volume(record["volume"])
                high = self._volume(record["high_res"]) if record.get("high_res") else None
                if volume is None or (record.get("high_res") and high is None):
                    return None
                out.append({"volume": volume, "high_res": high})
            return out
        except _DAMAGED:
            return None

    def _volume(self, meta: dict[str, Any]) -> PreparedVolume | None:
        path = self.root / meta["file"]
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.shape != tuple(meta["shape"]) or array.dtype != np.float32:
            return None
        stat = path.stat()
        if [stat.st_size, stat.st_mtime_ns] != meta["stat"] and file_hash(path) != meta["sha256"]:
            return None  # the file changed after it was written and its bytes are not the ones recorded
        return PreparedVolume(
            array=array,
            spacing=tuple(float(s) for s in meta["spacing"]),
            origin=tuple(float(o) for o in meta["origin"]),
            direction=np.asarray(meta["direction"], dtype=float).reshape(3, 3),
            name=str(meta["name"]),
            source_hash=str(meta["source_hash"]),
            notes=[str(n) for n in meta["notes"]],
        )

    # --- writing ------------------------------------------------------------------------------------------------
    def save(self, key: str, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Store a source's prepared volumes (records as `load` returns them) and return them memory-mapped from
        the cache; None when the folder cannot be written (said once in `warnings`: the caller keeps its arrays)."""
        manifest: dict[str, Any] = {"version": CACHE_VERSION, "volumes": []}
        for i, record in enumerate(records):
            entry: dict[str, Any] = {}
            for part in ("volume", "high_res"):
                pv = record.get(part)
                entry[part] = None if pv is None else self._store_array(f"{key}.{i}.{part}.npy", pv)
                if pv is not None and entry[part] is None:
                    return None
            manifest["volumes"].append(entry)
        text = json.dumps(manifest, indent=1)
        # the arrays first: a manifest is never found without its arrays
        if not self._write(self.root / f"{key}.json", lambda tmp: tmp.write_text(text)):
            return None
        return self.load(key)

    def _store_array(self, name: str, pv: PreparedVolume) -> dict[str, Any] | None:
        array = np.ascontiguousarray(pv.array, dtype=np.float32)
        path = self.root / name
        if not self._write(path, lambda tmp: np.save(tmp, array, allow_pickle=False)):
            return None
        stat = path.stat()
        return {
            "file": name,
            "shape": list(array.shape),
            "stat": [stat.st_size, stat.st_mtime_ns],
            "sha256": file_hash(path),
            "spacing": list(pv.spacing),
            "origin": list(pv.origin),
            "direction": np.asarray(pv.direction).tolist(),
            "name": pv.name,
            "source_hash": pv.source_hash,
            "notes": list(pv.notes),
        }

    def _write(self, path: Path, write) -> bool:
        """One file of the cache (`CacheFolder.store`); a failure is said once, and the job goes on in memory."""
        if self.store(path, write):
            return True
        self.warnings += [f"prepared volumes are not cached (they are kept in memory instead): {f}" for f in self.failures]
        self.failures.clear()
        return False


__all__ = ["CACHE_VERSION", "VOLUME_CACHE_ENV", "VolumeCache", "default_volume_cache_dir", "release_pages"]
