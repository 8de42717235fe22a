"""The segmentation network: MONAI's SwinUNETR whose Swin encoder comes from a pretraining run.

The encoder ``swinViT.*`` is loaded from the Swin of an encoder the run publishes (by name: the teacher, the
student, CASS's transformer...) by an explicit, tested one-to-one name map (`encoder_key_map`); the decoder starts fresh. An `InitReport` says what was loaded,
what starts fresh and which pretraining tensors have no place in the segmentation network. The input convention
(preset, dims, ROI, spacing, HU range) is inherited from the pretraining run (`resolve_finetune_config`), and a
fine-tuned network is saved with it (`input_spec`, in the weights metadata) and loaded back for prediction
(`load_segmenter`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import SwinUNETR

from napari_dagman.core.checkpoint import (
    CONFIG_FILE,
    SNAPSHOT_DIR,
    RunFolder,
    architecture_from_metadata,
    check_state_fits,
    checked_architecture,
    checked_run_inputs,
    load_tensors,
    metadata_step,
    strip_prefix,
)
from napari_dagman.core.config import FinetuneConfig
from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.models.architecture import DEEPEST_STRIDE, Architecture, architecture_for
from napari_dagman.core.segmentation.labels import LabelMap
from napari_dagman.core.segmentation.pipeline import use_monai_fused_attention

#: Where the Swin encoder sits in a pretraining checkpoint (after ``student.`` / ``teacher.``) ...
RUN_ENCODER_PREFIX = "encoder.swin."


#: ... and where SwinUNETR keeps it. The names after the prefixes are identical (both are MONAI's SwinTransformer).
UNETR_ENCODER_PREFIX = "swinViT."


#: Smallest crop: SwinUNETR's instance norms need more than one voxel at the deepest stage (stride 32).
MIN_ROI = 64


#: Defaults when there is no pretraining run to inherit the input convention from.
SCRATCH_DEFAULTS: dict[str, Any] = {"preset": "small", "dims": 3, "roi": 96, "spacing": 2.0}


SCRATCH_HU = (-175.0, 250.0)


class SegmentationNet(SwinUNETR):
    """MONAI's SwinUNETR for an `Architecture`; parameter names are SwinUNETR's (``swinViT.*`` = encoder).

    A 2D network (``arch.dims == 2``) also takes (B, C, 1, H, W) slabs, so the same 3D crops, sliding
    windows of depth 1 and inference code serve both.
    """

    def __init__(self, arch: Architecture, num_classes: int, *, drop_path: float = 0.0) -> None:
        super().__init__(
            in_channels=arch.in_channels,
            out_channels=num_classes,
            feature_size=arch.embed_dim,
            depths=arch.depths,
            num_heads=arch.num_heads,
            window_size=arch.window_size,
            patch_size=arch.patch_size,
            spatial_dims=arch.dims,
            qkv_bias=True,
            mlp_ratio=4.0,
            dropout_path_rate=drop_path,
            use_v2=False,
        )
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.dims == 2 and x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"a 2D network takes slabs of depth 1, got {tuple(x.shape)}")
            return super().forward(x[:, :, 0]).unsqueeze(2)
        return super().forward(x)


def encoder_key_map(model_keys: Iterable[str], which: str) -> dict[str, str]:
    """SwinUNETR encoder name -> pretraining checkpoint name, e.g.

    ``swinViT.layers1.0.blocks.0.attn.qkv.weight`` <- ``teacher.encoder.swin.layers1.0.blocks.0.attn.qkv.weight``.
    Only the ``swinViT.`` names are mapped; everything else in SwinUNETR (the convolutional encoder blocks of
    the skips and the decoder) has no pretrained counterpart.
    """
    prefix = f"{which}.{RUN_ENCODER_PREFIX}"
    return {
        key: prefix + key[len(UNETR_ENCODER_PREFIX) :]
        for key in model_keys
        if key.startswith(UNETR_ENCODER_PREFIX)
    }


@dataclass
class InitReport:
    """What a segmentation network's weights started from (printed at the start of a run, kept in config.json)."""

    source: str | None
    which: str | None = None
    method: str | None = None
    pretrain_step: int | None = None
    loaded: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # encoder tensors of the run with no place in SwinUNETR
    params_loaded: int = 0
    params_fresh: int = 0

    @property
    def from_scratch(self) -> bool:
        return self.source is None

    def summary(self) -> str:
        if self.from_scratch:
            return f"from scratch: all {len(self.fresh)} tensors ({self.params_fresh:,} parameters) randomly initialised"
        unused = sorted({k.split(".")[2] for k in self.unused if k.count(".") >= 2})  # which.encoder.NAME...
        return (
            f"encoder: {len(self.loaded)} tensors ({self.params_loaded:,} parameters) loaded bit-exactly from the "
            f"{self.which} of the {self.method} run {self.source} (pretraining step {self.pretrain_step}); "
            f"decoder and skip blocks: {len(self.fresh)} tensors ({self.params_fresh:,} parameters) start fresh"
            + (f"; not used: {', '.join(unused)} ({len(self.unused)} tensors)" if unused else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "which": self.which,
            "method": self.method,
            "pretrain_step": self.pretrain_step,
            "tensors_loaded": len(self.loaded),
            "tensors_fresh": len(self.fresh),
            "params_loaded": self.params_loaded,
            "params_fresh": self.params_fresh,
            "unused": self.unused,
            "summary": self.summary(),
        }


def load_encoder_into(
    net: SegmentationNet, run: str | Path, *, which: str = "auto", weights: str = "last"
) -> InitReport:
    """Copy a Swin encoder a pretraining run publishes into ``net.swinViT``; every encoder weight or an error.

    ``which`` is ``auto`` (the method's preferred encoder: the teacher for DAGMaN and its relatives, as
    DINO/iBOT evaluate the EMA teacher, the network whose attention chose the masks) or a published name.
    """
    from napari_dagman.core.checkpoint import load_pretrained_encoder

    path = Path(run)
    if path.is_dir():
        job = RunFolder(path).config_dict().get("job", "pretrain")
        if job != "pretrain":
            raise CheckpointError(
                f"{path} is a {job} run, not a pretraining run; --init takes the folder of "
                "`napari-dagman pretrain`"
            )
    pretrained = load_pretrained_encoder(path, which, weights=weights)
    if pretrained.kind != "swin":
        others = [n for n in pretrained.available if n != pretrained.which]
        raise CheckpointError(
            f"the run's '{pretrained.which}' encoder is a {pretrained.kind}, not a Swin: SwinUNETR cannot start "
            f"from it; choose another encoder of the run ({', '.join(others) or 'none'})"
        )
    diff = net.arch.differences(pretrained.arch)
    if diff:
        raise CheckpointError(f"the run's encoder differs from the network asked for: {'; '.join(diff)}")
    source_state = {
        f"{pretrained.which}.{RUN_ENCODER_PREFIX}{k}": v
        for k, v in pretrained.encoder.swin.state_dict().items()
    }
    own = net.state_dict()
    mapping = encoder_key_map(own, pretrained.which)
    missing = [k for k, src in mapping.items() if src not in source_state]
    wrong = [
        k for k, src in mapping.items() if src in source_state and source_state[src].shape != own[k].shape
    ]
    unmapped = sorted(set(source_state) - set(mapping.values()))
    if missing or wrong or unmapped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} SwinUNETR encoder tensors have no counterpart (e.g. {missing[0]})")
        if wrong:
            parts.append(f"{len(wrong)} differ in shape (e.g. {wrong[0]})")
        if unmapped:
            parts.append(f"{len(unmapped)} run tensors have no place (e.g. {unmapped[0]})")
        raise CheckpointError(
            f"the {pretrained.method} run's encoder does not map onto SwinUNETR: " + "; ".join(parts)
        )
    with torch.no_grad():
        for key, src in mapping.items():
            own[key].copy_(source_state[src])
    encoder_state = pretrained.encoder.state_dict()
    unused = [f"{pretrained.which}.encoder.{k}" for k in encoder_state if not k.startswith("swin.")]
    fresh = [k for k in own if k not in mapping]
    return InitReport(
        source=str(path),
        which=pretrained.which,
        method=pretrained.method,
        pretrain_step=pretrained.step,
        loaded=dict(mapping),
        fresh=fresh,
        unused=unused,
        params_loaded=sum(own[k].numel() for k in mapping),
        params_fresh=sum(own[k].numel() for k in fresh if own[k].is_floating_point()),
    )


def build_model(
    arch: Architecture,
    label_map: LabelMap,
    *,
    init: str | Path | None = None,
    which: str = "auto",
    weights: str = "last",
    drop_path: float = 0.0,
    seed: int = 0,
) -> tuple[SegmentationNet, InitReport]:
    """A SwinUNETR for ``label_map`` (seeded initialisation), its encoder from ``init`` when given."""
    torch.manual_seed(seed)
    net = SegmentationNet(arch, label_map.num_classes, drop_path=drop_path)
    if init is None:
        state = net.state_dict()
        fresh = list(state)
        report = InitReport(
            source=None,
            fresh=fresh,
            params_fresh=sum(v.numel() for v in state.values() if v.is_floating_point()),
        )
        return net, report
    return net, load_encoder_into(net, init, which=which, weights=weights)


def run_input_defaults(init: str | None) -> dict[str, Any]:
    """preset, dims, roi, spacing, hu_min, hu_max of a pretraining run (or the scratch defaults)."""
    if init is None:
        return {**SCRATCH_DEFAULTS, "hu_min": SCRATCH_HU[0], "hu_max": SCRATCH_HU[1]}
    path = Path(init)
    folder = (
        path if path.is_dir() else (path.parent.parent if path.parent.name == SNAPSHOT_DIR else path.parent)
    )
    run = RunFolder(folder)
    if path.is_dir() or run.file(CONFIG_FILE).is_file():
        config = run.config_dict()
        job = config.get("job", "pretrain")
        if job != "pretrain":
            raise CheckpointError(
                f"{folder} is a {job} run, not a pretraining run; --init takes the folder of "
                "`napari-dagman pretrain`"
            )
        arch = checked_architecture(config["architecture"], str(run.file(CONFIG_FILE)))
        checked_run_inputs(config, str(run.file(CONFIG_FILE)))
    else:  # a lone .safetensors file: its metadata carries the architecture
        _, meta = load_tensors(path)
        arch = architecture_from_metadata(meta, path.name)
        config = {}
    return {
        "preset": arch.preset,
        "dims": arch.dims,
        "roi": max(MIN_ROI, int(config.get("roi", SCRATCH_DEFAULTS["roi"]))),
        "spacing": config.get("spacing", SCRATCH_DEFAULTS["spacing"]),
        "hu_min": float(config.get("hu_min", SCRATCH_HU[0])),
        "hu_max": float(config.get("hu_max", SCRATCH_HU[1])),
    }


def resolve_finetune_config(config: FinetuneConfig) -> tuple[FinetuneConfig, list[str]]:
    """Fill the ``None`` fields from the pretraining run (or the scratch defaults); returns notes for the user.

    A preset or dims that contradicts the run is refused (the encoder would not fit); a different spacing, HU
    range or ROI is allowed with a note, since the encoder then sees inputs unlike its pretraining ones.
    """
    defaults = run_input_defaults(config.init)
    data = config.to_dict()
    notes: list[str] = []
    for key in ("preset", "dims"):
        if config.init is not None and data[key] is not None and data[key] != defaults[key]:
            raise DagmanInputError(
                f"--{key} {data[key]} contradicts the pretraining run's {key} {defaults[key]}; "
                f"leave it out to use the run's"
            )
    for key in ("spacing", "hu_min", "hu_max"):
        if config.init is not None and data[key] is not None and data[key] != defaults[key]:
            notes.append(f"{key} {data[key]} differs from the pretraining run's {defaults[key]}")
    for key, value in defaults.items():
        if data.get(key) is None:
            data[key] = value
    if data["roi"] < MIN_ROI or data["roi"] % DEEPEST_STRIDE:
        raise DagmanInputError(
            f"roi must be a multiple of {DEEPEST_STRIDE} and at least {MIN_ROI} for SwinUNETR, got {data['roi']}"
        )
    if data["warmup_steps"] is None:
        data["warmup_steps"] = int(round(0.05 * data["steps"]))
    data["organs"] = [int(i) for i in data["organs"]]
    return FinetuneConfig.from_dict(data), notes


def model_architecture(config: FinetuneConfig) -> Architecture:
    """The encoder architecture of a resolved config (the run's, or the preset's from scratch)."""
    if config.init is not None:
        path = Path(config.init)
        if path.is_dir():
            return RunFolder(path).architecture()
        _, meta = load_tensors(path)
        return architecture_from_metadata(meta, path.name)
    return architecture_for(str(config.preset), int(config.dims or 3))


def input_spec(config: FinetuneConfig) -> dict[str, Any]:
    return {
        "spacing": config.spacing,
        "hu_min": config.hu_min,
        "hu_max": config.hu_max,
        "roi": config.roi,
        "dims": config.dims,
    }


@dataclass
class Segmenter:
    """A fine-tuned network with what is needed to feed it and to name its output."""

    net: SegmentationNet
    label_map: LabelMap
    spacing: float | None
    hu_range: tuple[float, float]
    roi: int
    source: str
    step: int
    device: torch.device

    @property
    def arch(self) -> Architecture:
        return self.net.arch


def load_segmenter(
    path: str | Path,
    *,
    weights: str = "best",
    device: str | torch.device = "cpu",
    fused_attention: bool = True,
) -> Segmenter:
    """Load a fine-tuning run folder (or one of its ``.safetensors`` files) for prediction.

    ``fused_attention`` computes the window attention with ``scaled_dot_product_attention`` (faster; equal to
    MONAI's explicit softmax up to rounding).

    Raises `CheckpointError` for pretraining runs (fine-tune them first) and files of another kind.
    """
    from napari_dagman.core.devices import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    path = Path(path)
    if path.is_dir():
        config = RunFolder(path).config_dict()
        job = config.get("job", "pretrain")
        if job != "finetune":
            raise CheckpointError(
                f"{path} is a {job} run ({config.get('method', 'unknown method')}), not a fine-tuned "
                f"segmentation model; fine-tune it first: napari-dagman finetune IMAGE LABELS --init {path} --out RUN2"
            )
        file = RunFolder(path).weights_path(weights)
    else:
        file = path
    tensors, meta = load_tensors(file)
    if meta.get("job") != "finetune":
        raise CheckpointError(
            f"{file.name} holds {meta.get('job', 'unknown')} weights, not a segmentation model"
        )
    arch = architecture_from_metadata(meta, file.name)
    step = metadata_step(meta, file.name)
    try:
        label_map = LabelMap.from_dict(json.loads(meta.get("classes", "{}")))
        spec = json.loads(meta.get("input", "{}"))
    except (json.JSONDecodeError, TypeError):
        raise CheckpointError(f"{file.name} has unreadable metadata (classes or input)") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{file.name} has unreadable metadata (input)")
    checked_run_inputs(spec, f"the input settings of {file.name}")
    net = SegmentationNet(arch, label_map.num_classes)
    state = strip_prefix(tensors, "model")
    check_state_fits(net, state, file.name)
    net.load_state_dict(state)
    net.eval().to(device)
    # MONAI's fused kernel, not ours: the one a bundle of this run computes with (core.segmentation.pipeline)
    use_monai_fused_attention(net, fused_attention)
    return Segmenter(
        net=net,
        label_map=label_map,
        spacing=None if spec.get("spacing") is None else float(spec["spacing"]),
        hu_range=(float(spec.get("hu_min", SCRATCH_HU[0])), float(spec.get("hu_max", SCRATCH_HU[1]))),
        roi=int(spec.get("roi", SCRATCH_DEFAULTS["roi"])),
        source=str(file),
        step=step,
        device=device,
    )
