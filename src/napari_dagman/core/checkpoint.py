"""Run folders and checkpoints: safetensors + JSON, written atomically, loaded without executing code.

A run folder holds::

    config.json          the resolved job config, with the architecture and the method
    model.safetensors    the latest weights (student.* and teacher.*), architecture in the metadata
    best.safetensors     the weights at the lowest running-mean training loss
    resume.safetensors   everything to continue exactly: weights, method buffers, optimiser state, step
    checkpoints/         weight snapshots every N steps
    metrics.jsonl        one JSON line per logged step
    run.json             versions, seed, data hashes, command, status

Every file is written to a temporary name in the same folder and renamed into place, so a crash or a cancel
never leaves a half-written checkpoint. Loading uses `safetensors` (no pickle), checks that the file is a
napari-dagman checkpoint and that its architecture matches what is asked for. While a job writes a run folder
it holds the folder's lock (`RunLock`), so a second job on the same folder is refused with one line naming the
first; the kernel frees the lock of a killed process, whose leftovers the next job cleans up.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.files import MAX_JSON_BYTES, MAX_JSON_DEPTH, json_depth, parse_json, read_json
from napari_dagman.core.io import atomic_write
from napari_dagman.core.models.architecture import Architecture, checked_architecture
from napari_dagman.core.runs import (  # noqa: F401  (re-exported: the run folder lives in core.runs, torch-free)
    BEST_FILE,
    CONFIG_FILE,
    LEGACY_ENCODERS,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RESUME_FILE,
    RUN_FILE,
    SNAPSHOT_DIR,
    RunFolder,
    RunLock,
    encoders_of,
    saved_step,
    timestamp,
)

FORMAT = "napari-dagman/1"


# --- tensors ------------------------------------------------------------------------------------------------
def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, verified before it takes its final name (see `io.atomic_write`)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}}

    def write(tmp: Path) -> None:
        try:
            save_file(flat, str(tmp), metadata=meta)
        except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors
            found = re.search(r"os error (\d+)", str(err))
            raise CheckpointError(os.strerror(int(found.group(1))) if found else str(err)) from None

    def verify(tmp: Path) -> None:
        # header and size: a short write (disk full) leaves a file whose data ends before the header says
        size = tmp.stat().st_size
        with open(tmp, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n < size else None
        if not isinstance(header, dict):
            raise CheckpointError("the written file has no readable header")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if set(header) - {"__metadata__"} != set(flat) or 8 + n + max(ends, default=0) != size:
            raise CheckpointError("the written file is incomplete (disk full?)")

    atomic_write(path, write, verify=verify)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file and its metadata; refuse files that are not napari-dagman checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    check_safetensors_header(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} is not a readable safetensors checkpoint ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is a safetensors file but not a napari-dagman checkpoint")
    return tensors, metadata


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, read with limits before the library sees it: at most
    `MAX_JSON_BYTES` and `MAX_JSON_DEPTH` deep, the JSON held in its metadata strings too (the loaders parse
    those: architecture, classes, optimiser state). A hostile header is one line, not a crash."""
    what = f"{path.name}'s header"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise CheckpointError(f"{path.name} is not a readable safetensors checkpoint (header length {n})")
            if n > MAX_JSON_BYTES:
                raise CheckpointError(f"{what} is larger than it can be ({n:,} bytes; at most {MAX_JSON_BYTES:,})")
            raw = fh.read(n)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    header = parse_json(raw, what, error=CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a readable safetensors checkpoint (its header is not an object)")
    metadata = header.get("__metadata__") or {}
    for key, value in metadata.items() if isinstance(metadata, dict) else ():
        if isinstance(value, str) and json_depth(value) > MAX_JSON_DEPTH:
            raise CheckpointError(f"{path.name}: its metadata '{key}' nests deeper than {MAX_JSON_DEPTH} levels")
    return header


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}


# --- optimiser state ------------------------------------------------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimiser state into tensors + a JSON string (param groups and scalar state)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta_json: str
) -> None:
    """Restore an optimiser state saved by `optimizer_tensors`, checked against the optimiser's parameters.

    torch accepts state tensors of any shape or type and fails only at the next step; an edited or foreign state
    is refused here instead, before the run starts.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        meta = json.loads(meta_json)
        groups, scalars = meta["param_groups"], meta["scalars"]
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for key, value in scalars.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        _check_groups(groups, optimizer.param_groups)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"the optimiser state is unreadable ({err})") from None
    for idx, entry in state.items():
        if not 0 <= idx < len(params):
            raise CheckpointError(f"the optimiser state names parameter {idx}; the model has {len(params)}")
        for name, value in entry.items():
            if (
                torch.is_tensor(value)
                and value.ndim
                and (value.shape != params[idx].shape or value.dtype != params[idx].dtype)
            ):
                raise CheckpointError(
                    f"the optimiser state '{name}' of parameter {idx} is {value.dtype} {tuple(value.shape)}; the "
                    f"parameter is {params[idx].dtype} {tuple(params[idx].shape)}"
                )
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"optimiser state does not fit this model ({err})") from None


def _check_groups(saved: Any, own: list[dict[str, Any]]) -> None:
    """Saved parameter groups: as many as the optimiser's, with finite numbers where it has numbers."""
    if not isinstance(saved, list) or len(saved) != len(own):
        raise ValueError(f"{len(own)} parameter groups expected")
    for group, reference in zip(saved, own, strict=True):
        for key, value in reference.items():
            if key == "params" or key not in group or isinstance(value, bool):
                continue
            if not isinstance(value, int | float | tuple):
                continue
            numbers = group[key] if isinstance(value, tuple) else [group[key]]
            if not isinstance(numbers, list | tuple):
                raise ValueError(f"'{key}' is {numbers!r}, not {len(value)} numbers")
            if isinstance(value, tuple) and len(numbers) != len(value):
                raise ValueError(f"'{key}' has {len(numbers)} values, not {len(value)}")
            if not all(
                isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in numbers
            ):
                raise ValueError(f"'{key}' is {group[key]!r}, not a finite number")


# --- compatibility ----------------------------------------------------------------------------------------
def check_state_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a state dict whose names or shapes differ from ``module``'s, naming the first differences."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{what} does not fit this architecture: " + "; ".join(parts))


def architecture_from_metadata(metadata: dict[str, str], source: str) -> Architecture:
    try:
        data = json.loads(metadata["architecture"])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise CheckpointError(f"{source} carries no architecture description") from None
    return checked_architecture(data, source)


#: The settings of a run that jobs feeding its encoder read: checked when a run is loaded.
RUN_INPUT_KEYS = ("roi", "spacing", "hu_min", "hu_max", "dims", "mask_cell", "attention_stage")


def checked_run_inputs(config: dict[str, Any], source: str) -> dict[str, Any]:
    """Refuse a run config whose ROI, spacing or HU window a new pretraining config would refuse (a config.json
    edited by hand: ``"roi": "abc"`` or ``0``); returns ``config``."""
    from napari_dagman.core.config import PretrainConfig

    values = {k: config[k] for k in RUN_INPUT_KEYS if k in config}
    try:
        PretrainConfig.from_dict(values)
    except DagmanInputError as err:
        raise CheckpointError(f"{source} is broken: {err}") from None
    return config


def metadata_step(metadata: dict[str, str], source: str) -> int:
    """The step a weights file was saved at, from its metadata (0 when not recorded)."""
    raw = metadata.get("step", "0")
    try:
        step = int(raw)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source} has an unreadable step ({raw!r})") from None
    if step < 0:
        raise CheckpointError(f"{source} has a negative step ({step})")
    return step


def environment_info() -> dict[str, Any]:
    """Versions and host facts for run.json."""
    import monai

    import napari_dagman

    info: dict[str, Any] = {
        "napari_dagman": napari_dagman.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


# --- loading a pretrained encoder ---------------------------------------------------------------------------------
def published_encoders(metadata: dict[str, str], tensors_keys: Any = ()) -> tuple[dict[str, dict], str]:
    """(name -> description, preferred name) of the encoders a pretraining weights file publishes (its metadata;
    a file written before encoders were published by name: the legacy teacher/student present in its keys)."""
    if not metadata.get("encoders"):
        keys = list(tensors_keys)
        legacy = {
            name: spec
            for name, spec in LEGACY_ENCODERS.items()
            if any(k.startswith(spec["prefix"] + ".") for k in keys)
        }
        metadata = {**metadata, "encoders": json.dumps(legacy) if legacy else ""}
        if not legacy:
            return {}, "student"
    encoders, preferred = encoders_of(dict(metadata))
    return {
        name: {
            "prefix": e.prefix,
            "kind": e.kind,
            "class_attention_trained": e.class_attention_trained,
            "architecture": e.architecture,
            "description": e.description,
        }
        for name, e in encoders.items()
    }, preferred


class PretrainedEncoder:
    """A pretrained encoder with what is needed to feed it: the run's spacing, HU range and ROI.

    ``which`` is the name the run published it under; ``kind`` is ``swin`` (a `SwinEncoder`) or another network
    (e.g. CASS's ``cnn``); ``trains_class_attention`` says whether the method trained the class attention (if
    not, its maps are not attention and the explorer says so).
    """

    def __init__(
        self,
        encoder,
        arch: Architecture,
        run_config: dict[str, Any],
        *,
        source: str,
        which: str,
        step: int,
        kind: str = "swin",
        class_attention_trained: bool = True,
        available: tuple[str, ...] = (),
    ):
        self.encoder = encoder
        self.arch = arch
        self.run_config = run_config
        self.source = source
        self.which = which
        self.step = step
        self.kind = kind
        self.class_attention_trained = class_attention_trained
        self.available = available

    @property
    def method(self) -> str:
        return str(self.run_config.get("method", "unknown"))

    @property
    def roi(self) -> int:
        return int(self.run_config.get("roi", 96))

    @property
    def spacing(self) -> float | None:
        value = self.run_config.get("spacing")
        return None if value is None else float(value)

    @property
    def hu_range(self) -> tuple[float, float]:
        return float(self.run_config.get("hu_min", -175.0)), float(self.run_config.get("hu_max", 250.0))

    @property
    def trains_class_attention(self) -> bool:
        """False when the method's loss never reaches the class-attention module (SimMIM, MiM, ...)."""
        return self.class_attention_trained


def load_pretrained_encoder(
    path: str | os.PathLike, which: str = "auto", *, weights: str = "last", device: str | torch.device = "cpu"
) -> PretrainedEncoder:
    """Load an encoder a pretraining run publishes, by name, from its folder (or one of its ``.safetensors``).

    ``which`` is ``auto`` (the method's preferred encoder: the teacher for DAGMaN and its relatives) or a
    published name (``teacher``, ``student``, ``cnn``...). ``weights`` is ``last``, ``best`` or a file path.
    Raises `CheckpointError` for folders that are not pretraining runs, files of another format, names the
    run does not publish, and weights that do not fit.
    """
    from napari_dagman.core.models.published import build_published_encoder

    path = Path(path)
    if path.is_dir():
        run = RunFolder(path)
        config = run.config_dict()
        config_path = run.file(CONFIG_FILE)
        if config.get("job", "pretrain") != "pretrain":
            raise CheckpointError(f"{path} is a {config.get('job')} run, not a pretraining run")
        file = run.weights_path(weights)
    else:
        file = path
        sibling = (
            path.parent / CONFIG_FILE
            if path.parent.name != SNAPSHOT_DIR
            else path.parent.parent / CONFIG_FILE
        )
        config, config_path = {}, sibling
        if sibling.is_file():
            config = read_json(sibling, f"{sibling} beside {path.name}", error=CheckpointError)
            if not isinstance(config, dict):
                raise CheckpointError(f"{sibling} beside {path.name} is not a run config")
    tensors, meta = load_tensors(file)
    step = metadata_step(meta, file.name)
    if meta.get("job", "pretrain") != "pretrain":
        raise CheckpointError(f"{file.name} holds {meta.get('job')} weights, not a pretrained encoder")
    arch = architecture_from_metadata(meta, file.name)
    checked_run_inputs(config, str(config_path))
    if config and "architecture" in config:
        diff = checked_architecture(config["architecture"], str(config_path)).differences(arch)
        if diff:
            raise CheckpointError(f"{file.name} does not match its run's config.json: {'; '.join(diff)}")
    config = config or {"method": meta.get("method")}
    encoders, preferred = published_encoders(meta, tensors)
    name = preferred if which == "auto" else which
    if name not in encoders:
        raise CheckpointError(
            f"{file.name} publishes no encoder '{which}'; it publishes {', '.join(encoders) or 'none'}"
        )
    spec = encoders[name]
    encoder = build_published_encoder(arch, spec)
    state = strip_prefix(tensors, spec["prefix"])
    if not state:
        raise CheckpointError(f"{file.name} has no {name} encoder weights")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{file.name} holds NaN or infinity in its {name} encoder (e.g. {bad[0]})")
    check_state_fits(encoder, state, file.name)
    encoder.load_state_dict(state)
    encoder.eval().to(device)
    return PretrainedEncoder(
        encoder,
        arch,
        config,
        source=str(file),
        which=name,
        step=step,
        kind=str(spec.get("kind", "swin")),
        class_attention_trained=bool(spec.get("class_attention_trained", True)),
        available=tuple(encoders),
    )
