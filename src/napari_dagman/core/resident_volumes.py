"""A bounded set of prepared volumes held in RAM, MONAI's SmartCacheDataset scheme over the view sampler.

By default a run maps every prepared volume from the cache on disk (`core.volume_cache`) and reads only the pages
its crops touch: RAM holds crops, not the cohort, and the operating system's file cache keeps hot volumes. On a
slow or network disk those page reads can make the loader the bottleneck. ``--memory-cache N`` then holds N whole
volumes in RAM and draws every sample from them; each round (N samples) a fraction ``--memory-replace`` of them is
swapped for volumes not yet held, walking through the cohort (SmartCacheDataset's ``cache_num`` and
``replace_rate``). RAM is bounded by N volumes; the price is that a step's samples come from the N held, not from
the whole cohort.

Exact resume holds: which volumes are held in round t, and which of them sample s draws, are functions of the
run's seed and of s alone, so a resumed run loads the same set and draws the same volumes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from napari_dagman.core.data import PreparedVolume


class ResidentVolumes:
    """``size`` of ``volumes`` in RAM at a time, ``replace`` of them swapped every round of ``size`` samples."""

    def __init__(self, volumes: Sequence[PreparedVolume], size: int, replace_rate: float, seed: int) -> None:
        self.volumes, self.seed = volumes, seed
        self.size = max(1, min(int(size), len(volumes)))
        self.replace = max(1, math.ceil(self.size * replace_rate))
        # the order the cohort is walked in: one permutation per run
        self.order = np.random.default_rng([seed, 48271]).permutation(len(volumes))
        self.held: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the loader thread draws while the step may cut MIRAM's targets

    def window(self, round_index: int) -> list[int]:
        """The volumes held in round ``round_index``: ``size`` consecutive ones of the walk, shifted by
        ``replace`` per round."""
        n = len(self.volumes)
        first = round_index * self.replace
        return [int(self.order[(first + i) % n]) for i in range(self.size)]

    def volume_for(self, sample: int) -> int:
        """The volume of the ``sample``-th draw: the round's held volumes in a fresh order each round."""
        round_index, within = divmod(sample, self.size)
        held = self.window(round_index)
        return held[int(np.random.default_rng([self.seed, 7919, round_index]).permutation(self.size)[within])]

    def array(self, volume: int, round_index: int) -> np.ndarray:
        """The in-RAM array of a held volume; volumes that left the round's window are dropped first, so at most
        ``size`` are held."""
        from napari_dagman.core.data import release_pages

        with self._lock:
            if volume not in self.held:
                keep = set(self.window(round_index))
                for gone in [v for v in self.held if v not in keep]:
                    del self.held[gone]
                source = self.volumes[volume].array
                self.held[volume] = np.array(source, dtype=np.float32)  # a copy: off the disk for good
                release_pages(source)
            return self.held[volume]
