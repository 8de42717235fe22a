"""Processes and random streams: torchrun's DistributedDataParallel context and per-step seeds."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from napari_dagman.core.devices import resolve_device


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed for one (run seed, step, process, stream): independent streams, reproducible."""
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class DistContext:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and not device_name.startswith(("cpu", "mps"))
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        return cls(rank, world, local, owns)

    def device(self, name: str) -> torch.device:
        if self.world_size > 1 and torch.cuda.is_available() and not name.startswith(("cpu", "mps")):
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return resolve_device(name)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def wrapper(self, device: torch.device, find_unused_parameters: bool):
        """A function that wraps a trained module in DistributedDataParallel (None for one process)."""
        if self.world_size <= 1:
            return None
        from torch.nn.parallel import DistributedDataParallel

        def wrap(module: torch.nn.Module) -> torch.nn.Module:
            return DistributedDataParallel(
                module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )

        return wrap

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
