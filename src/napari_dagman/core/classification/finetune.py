"""Fine-tuning the encoder with a classification head, as a task on the one training loop.

The network is the run's published encoder with a head that reads what the linear probe reads: the chosen
stage's feature map averaged over the tokens the row's box touches (the lesion and its surroundings; the whole
crop for a case), then LayerNorm and a linear layer (the head MONAI's ViT classifier puts on its pooled token).
So fine-tuning starts from the probe's features and is compared with the probe on the same rows.

Training: class-balanced batches (a class, then one of its training rows, each step seeded by the loop's
generator), a crop shifted at random around the lesion (``jitter_mm``) and the per-view augmentation of
`core.augment` (intensity, noise, blur, small rotation and zoom; no mirroring: laterality is anatomy), cross-
entropy, AdamW with warm-up and cosine decay. Everything the loop gives comes with it: exact resume, cancel,
finite checks, atomic safetensors checkpoints, metrics.jsonl and run.json in the run's folder.

No model selection: the test rows of a fold are never looked at while training, and its probabilities come from
the last weights (centred crop; a grid of windows for a case).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_dagman.core.checkpoint import RunFolder
from napari_dagman.core.classification.crops import RowRegion, crop_window, test_crops, training_crop
from napari_dagman.core.config.classify import ClassifierTrainConfig
from napari_dagman.core.errors import CheckpointError
from napari_dagman.core.events import (
    CancelToken,
    FinishedEvent,
    JobCancelled,
    LogEvent,
    ProgressEvent,
    StepEvent,
)
from napari_dagman.core.training.distributed import DistContext
from napari_dagman.core.training.task import SingleNetworkTask, StepResult

if TYPE_CHECKING:
    from napari_dagman.core.checkpoint import PretrainedEncoder
    from napari_dagman.core.classification.evaluate import Arm
    from napari_dagman.core.classification.splits import Split
    from napari_dagman.core.classification.table import ClassTable
    from napari_dagman.core.config.classify import ClassifyConfig


#: test crops per forward pass
PREDICT_BATCH = 4


def token_masks(los: np.ndarray, his: np.ndarray, grid: tuple[int, ...], factor: tuple[int, ...]) -> torch.Tensor:
    """(B, *grid) weights: 1 on the tokens each box (voxels lo..hi) touches, as `pool_boxes` pools them."""
    f = np.asarray(factor)
    masks = torch.zeros((len(los), *grid))
    for k, (lo, hi) in enumerate(zip(los, his, strict=True)):
        a = np.minimum(lo // f, np.asarray(grid) - 1)
        b = np.maximum(a + 1, np.minimum(-(-hi // f), grid))
        masks[(k, *(slice(int(x), int(y)) for x, y in zip(a, b, strict=True)))] = 1.0
    return masks


class BoxPooledClassifier(nn.Module):
    """Encoder + the probe's pooling (a stage's tokens inside the row's box) + LayerNorm + linear head."""

    def __init__(self, encoder: nn.Module, stage: int, classes: int) -> None:
        super().__init__()
        arch = encoder.arch
        self.encoder, self.stage, self.dims = encoder, stage, arch.dims
        channels = arch.stage_channels(stage)
        token = arch.stage_stride(stage)
        self.factor = (token,) * 3 if arch.dims == 3 else (1, token, token)
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """crops (B, 1, z, y, x) (2D: (B, 1, y, x)), masks (B, *grid) -> logits (B, classes)."""
        fmap = self.encoder(crops, class_attention=False).stages[self.stage].float()
        if self.dims == 2:
            fmap = fmap[:, :, None]
        weights = masks.to(fmap.device)[:, None]
        pooled = (fmap * weights).sum(dim=(2, 3, 4)) / weights.sum(dim=(2, 3, 4)).clamp_min(1.0)
        return self.head(self.norm(pooled))

    def batch(self, crops: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: torch.device):
        """Tensors of a list of (crop, box lo, box hi) for `forward`."""
        images = torch.from_numpy(np.stack([c for c, _, _ in crops])[:, None]).to(device)
        if self.dims == 2:
            images = images[:, :, 0]
        window = crops[0][0].shape
        grid = tuple(max(1, w // f) for w, f in zip(window, self.factor, strict=True))
        masks = token_masks(np.stack([lo for _, lo, _ in crops]), np.stack([hi for _, _, hi in crops]), grid, self.factor)
        return images, masks


class ClassifierTask(SingleNetworkTask):
    """One fine-tuning run: the rows ``config.train_rows`` of a classification table."""

    job = "classify"
    find_unused_parameters = True  # the encoder's class attention and mask token are not used here

    def __init__(
        self,
        config: ClassifierTrainConfig,
        *,
        encoder: nn.Module,
        regions: list[RowRegion],
        y: np.ndarray,
        class_names: list[str],
        roi: int,
        source: dict[str, Any],
        images: list[str] | None = None,
    ) -> None:
        super().__init__(config)
        self.images = images or []
        self.encoder, self.regions, self.y = encoder, regions, np.asarray(y, int)
        self.class_names, self.source = list(class_names), source
        self.arch = encoder.arch
        self.window = np.asarray(crop_window(self.arch.dims, roi))
        self.augmentation: Any = None
        self.net: nn.Module | None = None

    def prepare(self, run: RunFolder, resume: bool) -> None:
        if resume:
            saved = run.config_dict().get("train_rows")
            if saved != list(self.config.train_rows):
                raise CheckpointError(f"{run.path} fine-tuned other rows of the table; choose another --out")
        self.total_steps = self.config.steps
        rows = np.asarray(self.config.train_rows, int)
        self.by_class = [rows[self.y[rows] == c] for c in range(len(self.class_names))]
        self.by_class = [r for r in self.by_class if len(r)]
        if self.images:  # run.json: which images the run's rows come from, and how many rows of each
            names = [self.images[int(r)] for r in rows]
            self.data_records = [{"image": name, "rows": names.count(name)} for name in dict.fromkeys(names)]

    def build(self, device: torch.device, dist: DistContext) -> None:
        from napari_dagman.core.augment import Augmentation, AugmentSettings
        from napari_dagman.core.models.encoder import set_fused_window_attention

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the head's initialisation, the same in every arm of a seed
            net = BoxPooledClassifier(copy.deepcopy(self.encoder), self.config.stage, len(self.class_names))
        self.net = net.to(device)
        set_fused_window_attention(self.net, self.config.fused_attention)
        if self.config.augment:
            settings = AugmentSettings(intensity=0.05, noise=0.02, blur=1.0, rotate=10.0, zoom=0.1)
            self.augmentation = Augmentation(settings, self.arch.dims)

    def weights_metadata(self) -> dict[str, Any]:
        return {"architecture": self.arch.to_json(), "classes": self.class_names, "stage": self.config.stage}

    def run_config(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "job": "classify",
            "architecture": self.arch.to_dict(),
            "classes": self.class_names,
            "encoder": self.source,
        }

    def start_messages(self, start: int, resume: bool) -> list[str]:
        counts = ", ".join(f"{len(r)}" for r in self.by_class)
        return [f"fine-tuning on {len(self.config.train_rows)} rows ({counts} per class), {self.total_steps} steps"]

    def step(self, step: int, generator: torch.Generator, device: torch.device) -> StepResult:
        from napari_dagman.core.augment import view_seed

        n = int(self.config.batch_size)
        classes = torch.randint(0, len(self.by_class), (n,), generator=generator).tolist()
        crops, labels = [], []
        for i, c in enumerate(classes):
            pool = self.by_class[c]
            row = int(pool[int(torch.randint(0, len(pool), (1,), generator=generator))])
            rng = np.random.default_rng(view_seed(self.config.seed, step, 0, i, 0))
            crop, lo, hi = training_crop(self.regions[row], self.window, rng)
            if self.augmentation is not None:  # channel first: a 3D crop gains one, a 2D crop's slice is it
                seed = view_seed(self.config.seed, step, 0, i, 1)
                if self.arch.dims == 3:
                    crop = self.augmentation.apply(crop[None], seed)[0]
                else:
                    crop = self.augmentation.apply(crop, seed)
            crops.append((crop, lo, hi))
            labels.append(int(self.y[row]))
        self.net.train()
        images, masks = _unwrapped(self.net).batch(crops, device)
        logits = self.net(images, masks).float()
        target = torch.as_tensor(labels, device=device)
        loss = F.cross_entropy(logits, target)
        accuracy = float((logits.argmax(1) == target).float().mean())
        return StepResult(loss, {"ce": float(loss.detach())}, extras={"train_accuracy": accuracy})

    def samples(self) -> int:
        return int(self.config.batch_size)


def _unwrapped(net: nn.Module) -> BoxPooledClassifier:
    from napari_dagman.core.methods.base import unwrap

    return unwrap(net)  # type: ignore[return-value]


def predict_rows(
    net: nn.Module, regions: list[RowRegion], rows: np.ndarray, window: np.ndarray, device: torch.device
) -> np.ndarray:
    """(len(rows), classes) softmax probabilities of ``rows`` (their test crops; a case averages its windows)."""
    model = _unwrapped(net).eval()
    out = []
    with torch.inference_mode():
        for row in rows:
            crops = test_crops(regions[int(row)], window)
            probabilities = []
            for first in range(0, len(crops), PREDICT_BATCH):  # a case's windows a few at a time (memory)
                images, masks = model.batch(crops[first : first + PREDICT_BATCH], device)
                probabilities.append(model(images, masks).float().softmax(1).cpu())
            out.append(torch.cat(probabilities).mean(0).numpy())
    return np.stack(out) if out else np.zeros((0, model.head.out_features))


def load_classifier(path: str, net: BoxPooledClassifier) -> None:
    """Load a finished run's last weights into ``net`` (safetensors: no code runs)."""
    from napari_dagman.core.checkpoint import MODEL_FILE, check_state_fits, load_tensors, strip_prefix

    file = RunFolder(path).file(MODEL_FILE)
    tensors, meta = load_tensors(file)
    if meta.get("job") != "classify":
        raise CheckpointError(f"{file} is not a classification fine-tuning checkpoint")
    state = strip_prefix(tensors, "model")
    check_state_fits(net, state, file.name)
    net.load_state_dict(state)


# --- the runs of a classification job ------------------------------------------------------------------------
#: the fine-tuned head's name in metrics.json, curve.csv and predictions.csv
FINETUNE = "finetune"


def run_path(out: str | Path, shots: int | str, draw: int, fold: int) -> Path:
    """OUT/finetune/shots-all/fold-F, or OUT/finetune/shots-K/draw-D/fold-F."""
    base = Path(out) / FINETUNE / f"shots-{shots}"
    return (base if shots == "all" else base / f"draw-{draw}") / f"fold-{fold}"


def _state(run: RunFolder, config: ClassifierTrainConfig) -> str:
    """'new', 'resume' or 'done' for a fold's run folder; refuses a folder that trained other rows."""
    from napari_dagman.core.runs import MODEL_FILE, RESUME_FILE

    if not run.has_checkpoint():
        return "new"
    if run.config_dict().get("train_rows") != list(config.train_rows):
        raise CheckpointError(f"{run.path} fine-tuned other rows of the table; choose another --out")
    info = run.read_run_info()
    done = info.get("status") == "completed" and int(info.get("steps_done") or 0) >= config.steps
    if done and run.file(MODEL_FILE).is_file():
        return "done"
    return "resume" if run.file(RESUME_FILE).is_file() else "new"


def fine_tune_fold(
    train_config: ClassifierTrainConfig,
    task: ClassifierTask,
    test_rows: np.ndarray,
    device: torch.device,
    cancel: CancelToken | None,
    progress: Callable[[int], ProgressEvent],
) -> Generator[Any, None, tuple[np.ndarray, str]]:
    """Train (or resume, or reuse) one fold's run and return its test rows' probabilities and what was done.

    Step events become ``progress(step)``; the run's warnings pass on; a cancel stops the whole job (the run
    keeps its resumable checkpoint: rerunning the same command continues it).
    """
    from napari_dagman.core.training.loop import run_training

    run = RunFolder(train_config.out)
    state = _state(run, train_config)
    if state != "done":
        events = run_training(task, resume=state == "resume", cancel=cancel, command="classify --finetune")
        for event in events:
            if isinstance(event, StepEvent):
                yield progress(event.step)
            elif isinstance(event, LogEvent) and event.level == "warning":
                yield event
            elif isinstance(event, FinishedEvent) and event.cancelled:
                raise JobCancelled("the fine-tuning was cancelled; run the same command again to continue it")
    net = BoxPooledClassifier(copy.deepcopy(task.encoder), train_config.stage, len(task.class_names))
    load_classifier(run.path, net)
    return predict_rows(net.to(device), task.regions, test_rows, task.window, device), state


def finetune_arms(
    config: ClassifyConfig,
    table: ClassTable,
    pretrained: PretrainedEncoder,
    regions: list[RowRegion],
    splits: list[Split],
    shots: list[int | str],
    cancel: CancelToken | None = None,
) -> Generator[Any, None, tuple[list[Arm], dict[str, int]]]:
    """The fine-tuned head's arms (its draws are the probe's first ``finetune_draws``: the same rows), one run
    per fold and draw; returns the arms and how many runs were trained, resumed and reused."""
    from napari_dagman.core.classification.evaluate import Arm, training_rows
    from napari_dagman.core.devices import resolve_device

    device = resolve_device(config.device)
    source = {"run": str(pretrained.source), "which": pretrained.which, "method": pretrained.method}
    plan = [
        (k, draw, split)
        for k in shots
        for draw in range(1 if k == "all" else min(config.draws, config.finetune_draws))
        for split in splits
    ]
    total, counts = len(plan) * config.finetune_steps, {"new": 0, "resume": 0, "done": 0}
    arms: dict[tuple, Arm] = {}
    for index, (k, draw, split) in enumerate(plan):
        arm = arms.setdefault((k,), Arm(FINETUNE, k))
        if len(arm.probabilities) <= draw:
            arm.probabilities.append(np.full((len(table), len(table.class_names)), np.nan))
        train = training_rows(split, k, draw, table.y, table.patients, config.seed)
        train_config = ClassifierTrainConfig(
            out=str(run_path(config.out, k, draw, split.fold)),
            steps=config.finetune_steps,
            lr=config.finetune_lr,
            batch_size=config.finetune_batch,
            warmup_steps=max(1, config.finetune_steps // 10),
            save_every=max(10, config.finetune_steps // 10),
            stage=config.stage,
            jitter_mm=config.jitter_mm,
            augment=config.augment,
            train_rows=sorted(int(r) for r in train),
            seed=config.seed,
            device=config.device,
        )
        task = ClassifierTask(
            train_config, encoder=pretrained.encoder, regions=regions, y=table.y,
            class_names=table.class_names, roi=pretrained.roi, source=source, images=table.images,
        )  # fmt: skip
        done = index * config.finetune_steps

        def progress(step: int, done: int = done) -> ProgressEvent:
            return ProgressEvent(done + step, total, "fine-tuning")

        probabilities, state = yield from fine_tune_fold(train_config, task, split.test, device, cancel, progress)
        arm.probabilities[draw][split.test] = probabilities
        arm.c_chosen.append(f"{config.finetune_steps} steps, lr {config.finetune_lr:g}")
        counts[state] += 1
        yield ProgressEvent(done + config.finetune_steps, total, "fine-tuning")
    return list(arms.values()), counts
