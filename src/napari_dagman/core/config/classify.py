"""The classification job's configuration: lesions or cases from a pretrained encoder (`core.classification`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from napari_dagman.core.config.base import DEVICE_HELP, ConfigBase, OptimiserOptions, RunOptions, option
from napari_dagman.core.errors import DagmanInputError


def parse_shots(text: str) -> list[int | str]:
    """``"1,2,5,all"`` -> [1, 2, 5, "all"]; a one-line refusal for anything else."""
    out: list[int | str] = []
    for part in (p.strip().lower() for p in str(text).split(",") if p.strip()):
        if part == "all":
            out.append("all")
            continue
        try:
            k = int(part)
        except ValueError:
            raise DagmanInputError(f"shots are numbers of labelled rows per class or 'all', got {part!r}") from None
        if k < 1:
            raise DagmanInputError(f"shots must be at least 1, got {k}")
        out.append(k)
    if not out:
        raise DagmanInputError("give at least one number of shots (e.g. 1,5,all)")
    return sorted(set(out), key=lambda v: (v == "all", v if isinstance(v, int) else 0))


@dataclass
class ClassifyConfig(ConfigBase):
    """Classify cases or lesions with a pretraining run's frozen encoder: a linear probe, cross-validated by
    patient, with bootstrap intervals, few-shot curves and the random-init and intensity controls."""

    kind: ClassVar[str] = "classify"

    table: str | None = option(None, "CSV or Parquet table of rows (image, label, x, y, z, size, ...)", cli=False)
    checkpoint: str | None = option(None, "pretraining run folder (or one of its .safetensors)", cli=False)
    out: str | None = option(None, "output folder", cli=False, group="run")
    which: str = option(
        "auto", "encoder the run publishes: auto (the method's preferred one) or its name", group="features"
    )
    weights: str = option("last", "weights of the run: last or best", choices=("last", "best"), group="features")
    stage: int = option(
        3,
        "encoder stage whose feature map is pooled over each box (0 = patch embedding ... 4 = deepest)",
        minimum=0,
        maximum=4,
        group="features",
    )
    box_mm: float = option(
        32.0, "side of the box features are pooled over when a row gives no size (mm)", minimum=1.0, group="features"
    )
    context: float = option(
        2.0,
        "box side as a multiple of the lesion's size: the lesion and its surroundings (margin, spiculae)",
        minimum=1.0,
        group="features",
    )
    overlap: float = option(0.5, "overlap of the encoder's sliding windows", minimum=0.0, maximum=0.9, group="features")
    hist_bins: int = option(32, "bins of the intensity control's histogram", minimum=2, group="features")
    controls: bool = option(
        True, "also probe a random-init encoder and the intensity histogram on the same rows and draws", group="probe"
    )
    folds: int = option(5, "patient-level cross-validation folds (without a split column)", minimum=2, group="probe")
    shots: str = option(
        "all", "labelled rows per class for the label-efficiency curve, e.g. 1,2,5,10,all", group="probe"
    )
    draws: int = option(10, "random draws of k rows per class, per number of shots", minimum=1, group="probe")
    probe_c: float | None = option(
        None,
        "the probe's inverse regularisation C; default: chosen by inner patient-level cross-validation",
        minimum=1e-8,
        group="probe",
    )
    positive: str | None = option(None, "the positive class of a binary task (default: the second)", group="probe")
    bootstrap: int = option(2000, "patient bootstrap resamples of each interval", minimum=100, group="probe")
    finetune: bool = option(
        False,
        "also fine-tune the encoder with a classification head, one run per fold (and draw) on the training loop, "
        "in OUT/finetune: resumable, cancellable, with metrics.jsonl; slow (minutes per run on a CPU)",
        group="finetune",
    )
    finetune_steps: int = option(200, "optimiser steps of each fine-tuning run", minimum=1, group="finetune")
    finetune_lr: float = option(
        1e-4, "peak learning rate of the fine-tuning runs (warm-up, cosine)", minimum=0.0, maximum=1.0, group="finetune"
    )
    finetune_batch: int = option(4, "crops per fine-tuning step (class-balanced)", minimum=1, group="finetune")
    finetune_draws: int = option(
        1,
        "draws fine-tuned per number of shots (the first draws of the probe's: the same rows); each draw costs "
        "one run per fold",
        minimum=1,
        group="finetune",
    )
    jitter_mm: float = option(
        8.0,
        "fine-tuning: random shift of the crop around each lesion (mm); rotation, zoom, intensity, noise and "
        "blur come with --augment",
        minimum=0.0,
        group="finetune",
    )
    augment: bool = option(
        True,
        "fine-tuning: random intensity scale and shift, noise, blur, small rotations and zooms (no mirroring: "
        "laterality is anatomy in CT)",
        group="finetune",
    )
    seed: int = option(0, "seed of the folds, the draws, the bootstrap and the random-init encoder", group="run")
    batch_size: int = option(2, "encoder windows per forward pass", minimum=1, group="run")
    device: str = option("auto", DEVICE_HELP, group="run")

    def validate(self) -> None:
        super().validate()
        parse_shots(self.shots)

    @property
    def shot_list(self) -> list[int | str]:
        return parse_shots(self.shots)


@dataclass
class ClassifierTrainConfig(OptimiserOptions, RunOptions):
    """One fine-tuning run of the classification head and its encoder (built by the classify job per fold and
    draw; what the training loop reads)."""

    kind: ClassVar[str] = "classify-finetune"
    job_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "weight_decay": 1e-4, "checkpoint_every": 0}

    out: str | None = option(None, "run folder", cli=False, group="run")
    steps: int = option(200, "optimiser steps", minimum=1, group="optimisation")
    stage: int = option(3, "encoder stage the head pools", minimum=0, maximum=4)
    jitter_mm: float = option(8.0, "random shift of the crop around each lesion (mm)", minimum=0.0)
    augment: bool = option(True, "intensity, noise, blur, rotation and zoom augmentation")
    train_rows: list[int] = option([], "table rows (0-based) the run trains on", cli=False)
