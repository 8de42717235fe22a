"""The embedding cache: embeddings and projections on disk under a key made of the image hash, the checkpoint
hash and every setting that changes them, so reopening a result is instant.

A cache never breaks a job: a damaged entry (truncated ``.npz``, broken ``.json``) is a miss and is written
again, and a folder that cannot be written is read as it is and stores nothing, which is said once.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_dagman.core.embeddings.patches import PatchEmbeddings
from napari_dagman.core.embeddings.projection import PROJECTIONS
from napari_dagman.core.events import LogEvent
from napari_dagman.core.files import STALE_TEMPORARY_S, CacheFolder  # noqa: F401 (STALE_TEMPORARY_S: its old home)
from napari_dagman.core.hashing import array_hash, file_hash

if TYPE_CHECKING:
    from collections.abc import Callable

    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.config import EmbedConfig
    from napari_dagman.core.volume import Volume

#: Bump when the meaning of cached embeddings changes (invalidates every cache entry).
CACHE_VERSION = 1

#: Settings that change the embeddings (anything else - device, batch size - does not).
FEATURE_SETTINGS: tuple[str, ...] = (
    "features",
    "stage",
    "pooling",
    "patch",
    "stride",
    "sampling",
    "per_organ",
    "overlap",
    "hist_bins",
    "resample_labels",
)

#: What reading a damaged entry raises: a cut zip, a bad npy header, broken or wrongly shaped JSON.
_DAMAGED = (
    OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, RecursionError, zipfile.BadZipFile
)

#: Cache folders already reported as not writable: said once per session, not at every run.
_REPORTED: set[str] = set()


def default_cache_dir() -> Path:
    """``$NAPARI_DAGMAN_CACHE``, else ``$XDG_CACHE_HOME/napari-dagman/embeddings`` (``~/.cache`` by default)."""
    if os.environ.get("NAPARI_DAGMAN_CACHE"):
        return Path(os.environ["NAPARI_DAGMAN_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "napari-dagman" / "embeddings"


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable key of JSON-able parts (order of the dict does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class EmbeddingCache(CacheFolder):
    """Embeddings and projections on disk: ``<key>.npz`` + ``<key>.json``, written atomically, no pickle."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        super().__init__(root or default_cache_dir())
        self._warnings: list[str] = []

    # writing -----------------------------------------------------------------------------------------------
    def _store(self, name: str, write: Callable[[Path], object]) -> bool:
        """Write one file of the cache; on failure stop caching (and say so once per folder and session)."""
        if self.store(self.root / name, write):
            return True
        where = str(self.root.absolute())
        if self.failures and where not in _REPORTED:
            _REPORTED.add(where)
            self._warnings.append(f"embeddings are not cached: {self.failures[-1]}")
        self.failures.clear()
        return False

    def _store_npz(self, name: str, arrays: dict[str, np.ndarray]) -> bool:
        return self._store(name, lambda tmp: np.savez(tmp, **arrays))

    def save(self, emb: PatchEmbeddings) -> None:
        """Store embeddings under their key (nothing when the folder cannot be written; see `warnings`)."""
        arrays = {"features": emb.features, "starts": emb.starts, "sampled": emb.sampled}
        if emb.organ_id is not None and emb.purity is not None:
            arrays.update(organ_id=emb.organ_id, purity=emb.purity)
        meta = {
            "version": CACHE_VERSION,
            "patch": list(emb.patch),
            "model_spacing": list(emb.model_spacing),
            "model_origin": list(emb.model_origin),
            "model_direction": np.asarray(emb.model_direction).tolist(),
            "source_geometry": emb.source_geometry,
            "organ_names": {str(k): v for k, v in emb.organ_names.items()},
            "settings": emb.settings,
        }
        text = json.dumps(meta, indent=1, default=str)
        # arrays first: a json without its npz is never taken for a hit
        if self._store_npz(f"{emb.key}.npz", arrays):
            self._store(f"{emb.key}.json", lambda tmp: tmp.write_text(text))

    def save_array(self, key: str, array: np.ndarray) -> None:
        """Store one array (a projection) under ``key``."""
        self._store_npz(f"{key}.npz", {"array": np.asarray(array)})

    def warnings(self) -> list[LogEvent]:
        """Warnings about the cache not yet shown (each is returned once)."""
        events = [LogEvent(message, "warning") for message in self._warnings]
        self._warnings.clear()
        return events

    # reading -----------------------------------------------------------------------------------------------
    def load(self, key: str) -> PatchEmbeddings | None:
        """The cached embeddings of ``key``, or None (missing, damaged or from another version)."""
        npz, meta_path = self.root / f"{key}.npz", self.root / f"{key}.json"
        try:
            if not (npz.is_file() and meta_path.is_file()):  # inside: a folder we may not enter raises
                return None
            meta = json.loads(meta_path.read_text())
            if meta.get("version") != CACHE_VERSION:
                return None
            with np.load(npz, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            emb = PatchEmbeddings(
                features=arrays["features"],
                starts=arrays["starts"],
                patch=tuple(meta["patch"]),
                sampled=arrays["sampled"],
                model_spacing=tuple(meta["model_spacing"]),
                model_origin=tuple(meta["model_origin"]),
                model_direction=np.asarray(meta["model_direction"]),
                source_geometry=meta["source_geometry"],
                organ_id=arrays.get("organ_id"),
                purity=arrays.get("purity"),
                organ_names={int(k): v for k, v in meta["organ_names"].items()},
                settings=meta["settings"],
                key=key,
            )
        except _DAMAGED:
            return None  # a damaged entry is recomputed (and overwritten), never trusted
        return emb if _consistent(emb) else None

    def load_array(self, key: str) -> np.ndarray | None:
        """The cached array of ``key``, or None (missing or damaged)."""
        try:
            with np.load(self.root / f"{key}.npz", allow_pickle=False) as data:
                return data["array"]
        except _DAMAGED:
            return None


def _consistent(emb: PatchEmbeddings) -> bool:
    """Every per-patch array has one row per patch (a damaged file can load with the wrong shapes)."""
    n = len(emb.features) if emb.features.ndim == 2 else -1
    rows = [emb.sampled, *(a for a in (emb.organ_id, emb.purity) if a is not None)]
    return emb.starts.shape == (n, 3) and all(a.shape == (n,) for a in rows) and len(emb.patch) == 3


def embedding_key(
    config: EmbedConfig, volume: Volume, labels: Volume | None, pretrained: PretrainedEncoder
) -> str:
    """Cache key: image and label hashes with their geometry, checkpoint hash and the feature settings."""
    parts: dict[str, Any] = {
        "version": CACHE_VERSION,
        "image": array_hash(volume.array),
        "geometry": volume.geometry(),
        "labels": None if labels is None else [array_hash(labels.array), labels.geometry()],
        "settings": {name: getattr(config, name) for name in FEATURE_SETTINGS},
        "run": {
            "spacing": pretrained.spacing,
            "hu_range": list(pretrained.hu_range),
            "roi": pretrained.roi,
            "arch": pretrained.arch.to_dict(),
        },
    }
    if config.features == "encoder":
        parts["checkpoint"] = [file_hash(pretrained.source), pretrained.which]
    if config.features == "random-init" or config.sampling != "grid":
        parts["seed"] = config.seed
    if config.features == "random-init" and config.init_seed is not None:
        parts["init_seed"] = int(config.init_seed)
    return cache_key(parts)


def projection_key(embeddings_key: str, config: EmbedConfig) -> str:
    """Cache key of a projection: the embeddings, the method, its seed and the settings it reads."""
    parts: dict[str, Any] = {
        "embeddings": embeddings_key,
        "method": config.method,
        "seed": config.seed,
        "fast": config.fast,
    }
    for name, projection in PROJECTIONS.items():
        if projection.settings:
            values = [getattr(config, setting) for setting in projection.settings]
            # a single setting is stored bare, as before the registry, so earlier cache entries stay valid
            parts[name] = (values if len(values) > 1 else values[0]) if name == config.method else None
    return cache_key(parts)
