"""The one training loop and the tasks on it (pretraining here; segmentation in `core.segmentation`)."""

from napari_dagman.core.training.distributed import DistContext, step_seed
from napari_dagman.core.training.loop import consume, optimizer_step, parameter_groups, run_training
from napari_dagman.core.training.pretrain import (
    ARCHITECTURE_KEYS,
    PretrainTask,
    build_architecture,
    build_method,
    describe_method,
    prepare_inputs,
    resolve_config,
    run_pretraining,
)
from napari_dagman.core.training.task import StepResult, TrainingTask

__all__ = [
    "ARCHITECTURE_KEYS",
    "DistContext",
    "PretrainTask",
    "StepResult",
    "TrainingTask",
    "build_architecture",
    "build_method",
    "consume",
    "describe_method",
    "optimizer_step",
    "parameter_groups",
    "prepare_inputs",
    "resolve_config",
    "run_pretraining",
    "run_training",
    "step_seed",
]
