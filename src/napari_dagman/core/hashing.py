"""Content hashes that identify data: a file's bytes, an array's values with its shape and dtype.

Kept apart and light (hashlib and numpy only) so that any module can name the data it saw without importing
checkpoints, models or torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

#: (resolved path, size, mtime in ns) -> sha256: a file is hashed again only when it changed.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def array_hash(array: np.ndarray) -> str:
    """sha256 of an array's bytes, shape and dtype (identifies the data a run saw)."""
    h = hashlib.sha256()
    h.update(str((array.shape, str(array.dtype))).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()
