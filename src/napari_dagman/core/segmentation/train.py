"""Segmentation fine-tuning as a task on the one training loop (`core.training.loop`).

The loop brings what every job shares: seeding per step, the learning-rate schedule, mixed precision, clipping,
the finite checks, atomic safetensors checkpoints (last, best, resumable), exact resume, cancel, metrics and
run.json. This task brings the data (image/label-map pairs, organs, the validation split, class-balanced crops),
the SwinUNETR with the pretrained encoder, the Dice + cross-entropy loss and validation Dice per organ, by which
'best' is chosen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dagman.core.checkpoint import RunFolder
from napari_dagman.core.config import FinetuneConfig
from napari_dagman.core.devices import resolve_device
from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.events import VALIDATING, CancelToken, FinishedEvent, ProgressEvent, ValidationEvent
from napari_dagman.core.io import check_ct
from napari_dagman.core.memory import check_training_memory
from napari_dagman.core.models.architecture import Architecture
from napari_dagman.core.models.encoder import set_fused_window_attention
from napari_dagman.core.segmentation.data import (
    Case,
    CropSampler,
    Piece,
    Split,
    _names,
    load_pairs,
    prepare_case,
    roi_size_for,
    split_cases,
)
from napari_dagman.core.segmentation.labels import LabelMap, check_label_volume, choose_organs, present_ids
from napari_dagman.core.segmentation.metrics import dice_per_class
from napari_dagman.core.segmentation.model import (
    build_model,
    input_spec,
    model_architecture,
    resolve_finetune_config,
)
from napari_dagman.core.segmentation.prediction import sliding_window_logits
from napari_dagman.core.training.distributed import DistContext
from napari_dagman.core.training.loop import run_training
from napari_dagman.core.training.task import SingleNetworkTask, StepResult
from napari_dagman.core.volume import Volume

#: Fine-tuning config keys that fix the network, the data split or the random streams: a resumed run keeps them.
RESUME_KEYS = (
    "init",
    "init_encoder",
    "init_weights",
    "preset",
    "dims",
    "organs",
    "roi",
    "spacing",
    "hu_min",
    "hu_max",
    "val_split",
    "val_fraction",
    "val_position",
    "val_gap_mm",
    "val_cases",
    "train_pieces",
    "train_slabs",
    "seed",
    "batch_size",
    "background_ratio",
    "augment",
)


def validate(
    net: torch.nn.Module,
    cases: Sequence[Case],
    pieces: Sequence[Piece],
    *,
    roi_size: tuple[int, int, int],
    overlap: float,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
) -> Generator[ProgressEvent, None, np.ndarray]:
    """Mean Dice per organ class over the validation pieces (NaN for organs absent from all of them); yields a
    `ProgressEvent` per piece (stage `VALIDATING`): validating a few whole CTs takes minutes on a CPU.

    A slab is segmented with half a window of image context above and below it (as it would be inside a
    whole-volume prediction), and scored on its own voxels only: labels outside the slab are never looked at.
    """
    net.eval()
    scores = []
    for i, piece in enumerate(pieces):
        yield ProgressEvent(i, len(pieces), VALIDATING)
        depth = cases[piece.case].image.shape[0]
        c0, c1 = max(0, piece.z0 - roi_size[0] // 2), min(depth, piece.z1 + roi_size[0] // 2)
        logits = sliding_window_logits(
            net, cases[piece.case].image[c0:c1], roi_size=roi_size, overlap=overlap, device=device, amp=amp
        )
        prediction = logits.argmax(0).numpy()[piece.z0 - c0 : piece.z1 - c0]
        scores.append(dice_per_class(prediction, piece.classes(cases), num_classes))
    yield ProgressEvent(len(pieces), len(pieces), VALIDATING)
    stacked = np.stack(scores)
    present = ~np.isnan(stacked)
    count = present.sum(axis=0)
    # a plain mean over the pieces that hold the organ (np.nanmean warns on all-NaN columns)
    return np.where(count > 0, np.where(present, stacked, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)


class FinetuneTask(SingleNetworkTask):
    """Fine-tuning of a SwinUNETR on image/label-map pairs (in memory, or the files of the config)."""

    job = "finetune"

    def __init__(self, config: FinetuneConfig, pairs: Sequence[tuple[Volume, Volume]] | None = None) -> None:
        super().__init__(config)
        self.pairs = list(pairs) if pairs else None
        self.in_memory = bool(pairs)
        self.arch: Architecture | None = None
        self.init_info: dict[str, Any] = {}
        self.label_map: LabelMap | None = None
        self.cases: list[Case] = []
        self.split: Split | None = None
        self.sampler: CropSampler | None = None
        self.roi_size: tuple[int, int, int] = (0, 0, 0)
        self.net: nn.Module | None = None
        self.loss_fn: Any = None

    # --- before anything is written ---------------------------------------------------------------------------
    def prepare(self, run: RunFolder, resume: bool) -> None:
        config = self.config
        if resume:
            # the resumed run keeps its resolved settings; it needs neither the pretraining run (the weights
            # come from resume.safetensors) nor the flags it was started with, only ones that do not differ
            config, self.arch, self.init_info = _resume_settings(run, config, in_memory=self.in_memory)
            notes: list[str] = []
        else:
            config, notes = resolve_finetune_config(config)
            self.arch = model_architecture(config)
        pairs = self.pairs or load_pairs(config)
        if not pairs:
            raise DagmanInputError("no image/label-map pairs to train on")
        names = _names(pairs)
        for (image, _), name in zip(pairs, names, strict=True):
            check_ct(image, f"the image '{name}'")
        check_training_memory(
            [image for image, _ in pairs],
            spacing=config.spacing,
            roi=int(config.roi),
            dims=int(config.dims or 3),
            crops=int(config.batch_size or 1),
            batch=int(config.batch_size or 1),
            embed_dim=self.arch.embed_dim,
            device=resolve_device(config.device).type,
            what=f"fine-tuning on {len(pairs)} image(s) at {config.spacing or 'their own'} mm, ROI {config.roi}",
        )
        label_vols = [
            check_label_volume(labels, f"label map of '{name}'")
            for (_, labels), name in zip(pairs, names, strict=True)
        ]
        label_map = choose_organs(label_vols, config.organs)
        if not config.organs:
            config = config.replace(organs=list(label_map.ids))
        self.cases = [
            prepare_case(
                image,
                labels,
                label_map,
                dims=int(config.dims or 3),
                spacing=config.spacing,
                hu_range=(float(config.hu_min), float(config.hu_max)),
                resample_labels=config.resample_labels,
                name=name,
            )
            for (image, labels), name in zip(pairs, names, strict=True)
        ]
        self.split = split_cases(self.cases, config)
        self.roi_size = roi_size_for(self.arch.dims, int(config.roi))
        self.sampler = CropSampler(
            [(p.image(self.cases), p.classes(self.cases)) for p in self.split.train],
            roi_size=self.roi_size,
            num_classes=label_map.num_classes,
            background_ratio=config.background_ratio,
            augment=config.augment,
            seed=config.seed,
        )
        self.config, self.label_map, self.total_steps = config, label_map, config.steps
        self.notes = notes + self._data_notes()
        self.data_records = [
            {
                "name": c.name,
                "sha256": c.source_hash,
                "shape": list(c.image.shape),
                "spacing": list(c.spacing),
            }
            for c in self.cases
        ]

    def _data_notes(self) -> list[str]:
        """Organs missing from a case, from the training part or from the validation part."""
        label_map, notes = self.label_map, []
        unnamed = [i for i, name in zip(label_map.ids, label_map.names, strict=True) if name == f"label_{i}"]
        if unnamed:  # said once, here: the run, its bundle and its DICOM SEG carry these names
            from napari_dagman.core.label_names import unnamed_note

            notes.append(unnamed_note(unnamed, "the label maps"))
        untrained = [
            label_map.names[k - 1]
            for k in range(1, label_map.num_classes)
            if not self.sampler.classes_present()[k]
        ]
        if len(untrained) == len(label_map.ids):
            raise DagmanInputError("the training part of the data holds none of the chosen organs")
        for case in self.cases:
            missing = [label_map.id_names[i] for i in label_map.ids if i not in case.ids_present]
            if missing:
                notes.append(f"{case.name}: no {', '.join(missing)} in its label map")
        if untrained:
            notes.append(f"no training voxels of {', '.join(untrained)} (all in the validation part)")
        if self.split.val:
            in_val: set[int] = set()
            for piece in self.split.val:
                in_val.update(int(c) for c in present_ids(piece.classes(self.cases)))
            unvalidated = [n for k, n in enumerate(label_map.names, start=1) if k not in in_val]
            if len(unvalidated) == len(label_map.names):
                notes.append(
                    "the validation part holds none of the chosen organs, so validation Dice stays empty; "
                    "move the slab (--val-position) or make it thicker (--val-fraction)"
                )
            elif unvalidated:
                notes.append(f"not in the validation part (no Dice for them): {', '.join(unvalidated)}")
        return notes

    def build(self, device: torch.device, dist: DistContext) -> None:
        from monai.losses import DiceCELoss

        config = self.config
        net, report = build_model(
            self.arch,
            self.label_map,
            init=None if self.init_info else config.init,
            which=config.init_encoder,
            weights=config.init_weights,
            drop_path=config.drop_path,
            seed=config.seed,
        )
        self.init_info = self.init_info or report.to_dict()
        self.net = net.to(device)
        set_fused_window_attention(self.net, config.fused_attention)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    # --- modules and records ------------------------------------------------------------------------------------
    def weights_metadata(self) -> dict[str, Any]:
        return {
            "architecture": self.arch.to_json(),
            "classes": self.label_map.to_dict(),
            "input": input_spec(self.config),
        }

    def run_config(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "architecture": self.arch.to_dict(),
            "job": "finetune",
            "classes": self.label_map.to_dict(),
            "init_report": self.init_info,
            "split": self.split.to_dict(),
        }

    def run_info(self) -> dict[str, Any]:
        return {"init": self.config.init}

    def start_messages(self, start: int, resume: bool) -> list[str]:
        c = self.config
        return [
            ("resuming from resume.safetensors; at the start, " if resume else "")
            + str(self.init_info.get("summary", "")),
            f"organs: {self.label_map.describe()}; {self.split.description}",
            f"fine-tuning {self.arch.preset} {self.arch.dims}D SwinUNETR, ROI {c.roi}, {c.spacing} mm, "
            f"{self.total_steps} steps on {next(self.net.parameters()).device}"
            + (f" (resuming at step {start})" if resume else ""),
        ]

    # --- steps ---------------------------------------------------------------------------------------------------
    def step(self, step: int, generator: torch.Generator, device: torch.device) -> StepResult:
        images_np, labels_np = self.sampler.sample(step, self.config.batch_size)
        images = torch.from_numpy(images_np).to(device, non_blocking=True)
        labels = torch.from_numpy(labels_np).to(device, non_blocking=True)
        self.net.train()
        logits = self.net(images).float()
        dice_term = self.loss_fn.dice(logits, labels)
        ce_term = self.loss_fn.ce(logits, labels)
        loss = self.loss_fn.lambda_dice * dice_term + self.loss_fn.lambda_ce * ce_term
        return StepResult(loss, {"dice": float(dice_term.detach()), "ce": float(ce_term.detach())})

    # --- validation ------------------------------------------------------------------------------------------------
    @property
    def validates(self) -> bool:
        return bool(self.split.val)

    def validation_due(self, step: int) -> bool:
        return step % self.config.val_every == 0 or step == self.total_steps

    def validate(
        self, step: int, device: torch.device, tracker: dict[str, Any]
    ) -> Generator[Any, None, tuple[list[Any], float]]:
        t0 = time.perf_counter()
        scores = yield from validate(
            self.net,
            self.cases,
            self.split.val,
            roi_size=self.roi_size,
            overlap=self.config.overlap,
            num_classes=self.label_map.num_classes,
            device=device,
            amp=self.precision == "bf16",  # validation in the arithmetic the loop trains in
        )
        dice = {name: float(s) for name, s in zip(self.label_map.names, scores, strict=True)}
        finite = [v for v in dice.values() if math.isfinite(v)]
        mean = float(np.mean(finite)) if finite else math.nan
        tracker["last_val"] = {"step": step, "dice": dice, "mean_dice": mean}
        best = math.isfinite(mean) and mean > tracker["best_score"]
        if best:
            tracker["best_val"] = dict(dice)
        return [ValidationEvent(step, dice, mean, seconds=time.perf_counter() - t0, best=best)], mean

    def validation_record(self, tracker: dict[str, Any]) -> dict[str, Any]:
        last = tracker["last_val"]
        return {
            "step": last["step"],
            "kind": "validation",
            "mean_dice": last["mean_dice"],
            "dice": last["dice"],
        }

    # --- the end ---------------------------------------------------------------------------------------------------
    def summary(self, tracker: dict[str, Any]) -> dict[str, Any]:
        best = tracker["best_score"]
        return {
            "organs": self.label_map.to_dict(),
            "best_mean_dice": best if math.isfinite(best) else None,
            "best_step": tracker["best_step"],
            "best_dice": tracker.get("best_val", {}),
            "last_validation": tracker.get("last_val", {}),
            "final_running_loss": tracker["running_loss"],
            "init": self.init_info,
            "split": self.split.description,
        }

    def finish_info(self, tracker: dict[str, Any] | None) -> dict[str, Any]:
        if tracker and math.isfinite(tracker.get("best_score", -math.inf)):
            return {"best_mean_dice": tracker["best_score"], "best_step": tracker["best_step"]}
        return {}


def run_finetuning(
    config: FinetuneConfig,
    pairs: Sequence[tuple[Volume, Volume]] | None = None,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    command: str | None = None,
) -> Generator[Any, None, FinishedEvent]:
    """Fine-tune a segmentation network and yield events; returns (and yields last) the `FinishedEvent`.

    ``config.out`` is the run folder, ``config.init`` the pretraining run (None: from scratch); ``pairs`` are
    in-memory (image, label map) pairs (the GUI's layers), else ``config.images`` and ``config.segmentations``
    are read; ``resume`` continues the run in ``config.out`` (same organs, split, seed); ``cancel`` is checked
    before every step. Yields the init report and the split as `LogEvent`s, a `StepEvent` per step (terms
    ``dice`` and ``ce``), a `ValidationEvent` every ``val_every`` steps, `CheckpointEvent`s, and a final
    `FinishedEvent` whose summary holds the best validation Dice per organ.
    """
    return run_training(FinetuneTask(config, pairs), resume=resume, cancel=cancel, command=command)


def _resume_settings(
    run: RunFolder, config: FinetuneConfig, *, in_memory: bool
) -> tuple[FinetuneConfig, Architecture, dict[str, Any]]:
    """The saved run's settings, with what ``config`` may change (steps, lr, device, logging), checked.

    Fields of ``config`` left at None (or empty organs / files) take the saved values; a given value that
    differs from the saved one in a key that fixes the network, the organs, the split or the random streams
    (`RESUME_KEYS`) is refused.
    """
    saved_dict = run.config_dict()
    if saved_dict.get("job") != "finetune":
        raise CheckpointError(
            f"{run.path} is a {saved_dict.get('job', 'pretrain')} run, not a fine-tuning run"
        )
    saved = FinetuneConfig.from_dict(saved_dict, strict=False)
    data = config.to_dict()
    for key, value in saved.to_dict().items():
        if data.get(key) is None or (key in ("organs", "images", "segmentations") and not data.get(key)):
            data[key] = value
    if in_memory:  # layers given again: the files recorded (if any) are not read
        data["images"], data["segmentations"] = [], []
    given = FinetuneConfig.from_dict(data)
    changed = [k for k in RESUME_KEYS if getattr(saved, k) != getattr(given, k)]
    if changed:
        details = ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(given, k)!r}" for k in changed)
        raise CheckpointError(f"cannot resume {run.path} with other settings: {details}")
    return (
        given,
        Architecture.from_dict(saved_dict["architecture"]),
        dict(saved_dict.get("init_report") or {}),
    )
