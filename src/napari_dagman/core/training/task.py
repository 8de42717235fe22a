"""What a training job tells the one training loop: its inputs, networks, step, validation and records.

Pretraining (`core.training.pretrain`) and segmentation fine-tuning (`core.segmentation.train`) are two tasks
on the same loop, the way MONAI Label's training tasks specialise one base. The loop (`core.training.loop`)
owns everything they have in common: seeding per step, the learning-rate schedule, mixed precision, gradient
clipping, the finite checks, checkpoint timing, resume, cancel, DDP, metrics and the start/finish records.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from napari_dagman.core.checkpoint import RunFolder
from napari_dagman.core.training.distributed import DistContext


@dataclass
class StepResult:
    """One step's loss (a tensor, before backward), its terms and values to log, and warnings to say once."""

    loss: torch.Tensor
    terms: dict[str, float]
    extras: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: what the task needs after the step (e.g. the method's output for a preview)
    output: Any = None


def new_tracker() -> dict[str, Any]:
    """The loss/score bookkeeping a checkpoint carries (tasks may add their own keys)."""
    return {"running_loss": math.inf, "best_loss": math.inf, "best_score": -math.inf, "best_step": 0}


class TrainingTask(ABC):
    """Base of a training job. Subclasses set ``config`` (resolved in `prepare`) and implement the hooks."""

    job: ClassVar[str] = "train"
    #: the network's `Architecture` (set by `prepare`; what a checkpoint to resume must match)
    arch: Any = None
    #: parameters without gradient are looked for by DDP (a module a loss does not reach)
    find_unused_parameters: bool = False
    #: the arithmetic of the steps, fp32 or bf16 (resolved and set by the loop before the first step)
    precision: str = "fp32"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.total_steps = 0
        self.notes: list[str] = []  # warnings about the inputs, said at the start
        self.data_records: list[dict[str, Any]] = []  # what run.json records of the data

    # --- before anything is written ---------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, run: RunFolder, resume: bool) -> None:
        """Read and check the inputs, resolve ``config`` and ``total_steps``; raise on bad input, write nothing."""

    def preparing(
        self, run: RunFolder, resume: bool, dist: DistContext | None = None, cancel: Any = None
    ) -> Iterator[Any]:
        """`prepare`, yielding progress events: what the loop calls (a task reading a cohort overrides it; ``dist``
        says which process this is, ``cancel`` stops a long preparation)."""
        self.prepare(run, resume)
        return iter(())

    @abstractmethod
    def build(self, device: torch.device, dist: DistContext) -> None:
        """Build the networks on ``device`` (seeded) and anything the steps need (``dist``: rank, world)."""

    # --- what the optimiser, DDP and checkpoints cover ---------------------------------------------------------
    @abstractmethod
    def trained_modules(self) -> dict[str, nn.Module]:
        """Name -> module updated by the optimiser (key prefix in the weights files)."""

    def ema_modules(self) -> dict[str, nn.Module]:
        """Name -> module kept by EMA (saved, never optimised)."""
        return {}

    @abstractmethod
    def state_modules(self) -> dict[str, nn.Module]:
        """Name -> unwrapped module for every module a checkpoint holds (trained and EMA)."""

    @abstractmethod
    def wrap_trained(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each trained module by ``wrapper(module)`` (DistributedDataParallel)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Buffers outside the modules that a resumed run needs (e.g. distillation centres)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `extra_state`."""
        return None  # nothing by default

    @abstractmethod
    def weights_metadata(self) -> dict[str, Any]:
        """What every weights file records besides the step (architecture, job, classes, published encoders)."""

    def check_checkpoint(self, metadata: dict[str, str], name: str) -> None:
        """Refuse a resumable checkpoint this task cannot continue: one of another architecture than ``arch``
        (the loop has already refused another job's)."""
        from napari_dagman.core.checkpoint import architecture_from_metadata
        from napari_dagman.core.errors import CheckpointError

        diff = self.arch.differences(architecture_from_metadata(metadata, name))
        if diff:
            raise CheckpointError(f"{name} was trained with another architecture: {'; '.join(diff)}")

    @abstractmethod
    def run_config(self) -> dict[str, Any]:
        """config.json: the resolved configuration with what rebuilds the networks."""

    def run_info(self) -> dict[str, Any]:
        """Extra entries of run.json (method, seed, init...)."""
        return {}

    def start_messages(self, start: int, resume: bool) -> list[str]:
        """Lines said when the loop starts (after the notes)."""
        return []

    def begin(self, run: RunFolder, is_main: bool, start: int) -> None:
        """Called once the run folder exists, before the first step (e.g. fixed probe crops)."""
        return None  # nothing by default

    # --- steps ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def step(self, step: int, generator: torch.Generator, device: torch.device) -> StepResult:
        """Forward pass and loss of step ``step`` (0-based), networks in training mode; no backward."""

    def after_backward(self, step: int) -> None:
        """Between backward and the optimiser step."""
        return None  # nothing by default

    def after_optimizer_step(self, step: int, device: torch.device) -> dict[str, float]:
        """After the optimiser step (EMA updates, measurements due at this step); values to log."""
        return {}

    def after_step(self, step: int, extras: dict[str, float]) -> list[str]:
        """Warnings about the finished step ``step`` (1-based) from all its logged figures (e.g. a collapse)."""
        return []

    def events_after_step(self, step: int, result: StepResult) -> Iterator[Any]:
        """Events that follow a step's `StepEvent` (previews)."""
        return iter(())

    def samples(self) -> int:
        """Samples one step sees on this process (for samples per second)."""
        return int(getattr(self.config, "batch_size", 1))

    def steps_per_epoch(self, world_size: int) -> int:
        return 1

    # --- validation ------------------------------------------------------------------------------------------------
    @property
    def validates(self) -> bool:
        """True when 'best' follows a validation score (higher is better) instead of the running loss."""
        return False

    def validate(
        self, step: int, device: torch.device, tracker: dict[str, Any]
    ) -> Generator[Any, None, tuple[list[Any], float]]:
        """Validate after ``step`` steps, yielding its progress (`ProgressEvent`s of stage `VALIDATING`); returns
        (events, score), and the loop saves 'best' when the score improves."""
        yield from ()
        return [], math.nan

    def validation_due(self, step: int) -> bool:
        return False

    def validation_record(self, tracker: dict[str, Any]) -> dict[str, Any] | None:
        """The metrics.jsonl line of the validation just done (None: nothing to log)."""
        return None

    # --- the end ---------------------------------------------------------------------------------------------------
    def summary(self, tracker: dict[str, Any]) -> dict[str, Any]:
        """The `FinishedEvent` summary."""
        return {"best_loss": tracker["best_loss"], "final_running_loss": tracker["running_loss"]}

    def finish_info(self, tracker: dict[str, Any] | None) -> dict[str, Any]:
        """Extra entries of run.json when the job ends."""
        return {}

    def release(self) -> None:
        """Drop the networks (GPU memory is freed with the generator's frame, not when it is collected)."""
        return None  # nothing by default


class SingleNetworkTask(TrainingTask):
    """A task that trains one network, ``net``, saved under the key prefix ``model`` (fine-tuning jobs)."""

    net: nn.Module | None = None

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def state_modules(self) -> dict[str, nn.Module]:
        from napari_dagman.core.methods.base import unwrap

        return {"model": unwrap(self.net)}

    def wrap_trained(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        self.net = wrapper(self.net)

    def release(self) -> None:
        self.net = None  # drop the model with the generator's frame (GPU memory), not when it is collected
