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

import contextlib
import json
import os
import platform
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from napari_dagman.core.errors import CheckpointError, DagmanInputError
from napari_dagman.core.io import atomic_write, atomic_write_text, remove_temporaries
from napari_dagman.core.models.architecture import Architecture

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
RESUME_FILE = "resume.safetensors"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
SNAPSHOT_DIR = "checkpoints"
LOCK_FILE = ".lock"
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
            if torch.is_tensor(value) and value.ndim and (
                value.shape != params[idx].shape or value.dtype != params[idx].dtype
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
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in numbers):
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


def checked_architecture(data: Any, source: str) -> Architecture:
    """`Architecture.from_dict` that says in one line what is wrong with a hand-edited description."""
    if not isinstance(data, dict):
        raise CheckpointError(f"the architecture description in {source} is not a JSON object")
    try:
        return Architecture.from_dict(data)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as err:
        if isinstance(err, DagmanInputError):
            raise
        raise CheckpointError(f"the architecture description in {source} is broken ({err})") from None


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


# --- run folder -----------------------------------------------------------------------------------------------
class RunFolder:
    """Paths and readers of a run folder (pretraining or fine-tuning)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        #: set by `begin_run_info`: only a job that started here may record how it ended
        self.began = False

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    def has_checkpoint(self) -> bool:
        return self.file(MODEL_FILE).is_file() or self.file(RESUME_FILE).is_file()

    def config_dict(self) -> dict[str, Any]:
        path = self.file(CONFIG_FILE)
        if not path.is_file():
            if not self.path.exists():
                raise CheckpointError(f"run folder {self.path} does not exist")
            raise CheckpointError(f"{self.path} is not a napari-dagman run folder (no {CONFIG_FILE})")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON ({err})") from None
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
        if not isinstance(data, dict) or "architecture" not in data:
            raise CheckpointError(f"{path} is not a napari-dagman run config (no architecture)")
        return data

    def architecture(self) -> Architecture:
        return checked_architecture(self.config_dict()["architecture"], str(self.file(CONFIG_FILE)))

    def write_config(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.file(CONFIG_FILE), json.dumps(data, indent=2, sort_keys=True) + "\n")

    def weights_path(self, which: str = "last") -> Path:
        name = {"last": MODEL_FILE, "best": BEST_FILE}.get(which)
        path = self.file(name) if name else Path(which)
        if not path.is_file():
            raise CheckpointError(f"no '{which}' weights in {self.path}")
        return path

    # metrics ---------------------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            with open(self.file(METRICS_FILE), "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: one line, like every other write
            raise DagmanInputError(f"cannot write {self.file(METRICS_FILE)}: {err.strerror or err}") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash: everything after it is unreliable
        return out

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines after ``step`` (a resumed run rewrites them)."""
        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.file(METRICS_FILE), "".join(json.dumps(r) + "\n" for r in kept))

    # run.json ----------------------------------------------------------------------------------------------
    def write_run_info(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.file(RUN_FILE), json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")

    def read_run_info(self) -> dict[str, Any]:
        """run.json as a dict; empty when missing or unreadable (a record, never a reason to refuse a run)."""
        try:
            info = json.loads(self.file(RUN_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def recover(self) -> list[str]:
        """Clean up after a job that was killed here; call it holding the lock. Returns what to tell the user.

        A killed job leaves temporary files of unfinished writes (removed) and a run.json that still says
        "running" (marked as interrupted, with the step its last save reached).
        """
        notes = []
        removed = remove_temporaries(self.path) + remove_temporaries(self.file(SNAPSHOT_DIR))
        if removed:
            notes.append(f"removed {len(removed)} unfinished file(s) a stopped job left in {self.path}")
        info = self.read_run_info()
        if info.get("status") == "running":
            saved = saved_step(self.file(RESUME_FILE))
            info["status"] = "interrupted: the job ended without recording how (killed, or the machine stopped)"
            info.setdefault("interruptions", []).append({"noticed": timestamp(), "saved_step": saved})
            with contextlib.suppress(DagmanInputError):
                self.write_run_info(info)
            where = f"its last save is step {saved}" if saved is not None else "it saved no checkpoint"
            notes.append(f"the previous job in {self.path} was interrupted without finishing; {where}")
        return notes

    def begin_run_info(
        self,
        job: str,
        *,
        resume_step: int | None,
        command: str | None,
        data: list[dict[str, Any]],
        device: Any,
        total_steps: int,
        **extra: Any,
    ) -> None:
        """Write run.json as a job starts (``resume_step``: the step a resumed run continues from, else None).

        A resumed run keeps its first start time and appends to ``resumed_at``.
        """
        info = self.read_run_info() if resume_step is not None else {}
        info.update(
            job=job,
            status="running",
            command=command or " ".join(sys.argv),
            started=info.get("started", timestamp()),
            resumed_at=[*info.get("resumed_at", []), resume_step] if resume_step is not None else [],
            data=data,
            environment=environment_info(),
            device=str(device),
            total_steps=total_steps,
            **extra,
        )
        self.write_run_info(info)
        self.began = True

    def finish_run_info(self, status: str, step: int | None, **extra: Any) -> None:
        """Record how a job ended (completed, cancelled, failed) and how far it got.

        A no-op unless this job began the run info: a request refused before it started (resuming a finished
        run, other settings) must not mark the run it refused as failed.
        """
        if not self.began or not self.path.is_dir():
            return
        info = self.read_run_info()
        info.update(status=status, finished=timestamp(), **extra)
        if step is not None:
            info["steps_done"] = step
        # on a full disk this write fails too: the run then stays "running", and the next start marks it
        with contextlib.suppress(DagmanInputError):
            self.write_run_info(info)


def saved_step(path: Path) -> int | None:
    """The step a checkpoint was saved at (from its metadata only), or None when it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return int((fh.metadata() or {})["step"])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


class RunLock:
    """The exclusive right to write a run folder, held while a job runs (a lock file, ``.lock``, in the folder).

    An OS lock (``flock``) on the file, not the file's existence, is the lock: the kernel releases it when the
    holder dies, however it dies, so the lock of a killed job is simply taken over. The holder writes who it is
    (process id, host, start, command) into the file, for the refusal of a second job to name it.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str | None = None) -> None:
        """Take the lock or raise `DagmanInputError` naming the job that holds it."""
        if self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock(fd)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise DagmanInputError(
                    f"{self.path.parent} is in use by another job ({holder}); wait for it to end or choose "
                    "another --out"
                ) from None
            except OSError:  # the file system cannot lock (some network mounts): run without the lock
                os.close(fd)
                return
            # the holder before us may have removed the file between our open and our lock: lock the one there
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": timestamp(),
            "command": command or " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and let go (in this order: a job waiting on the old file then tries again)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _lock(fd: int) -> None:
    """A non-blocking exclusive lock on an open file; BlockingIOError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as err:
            raise BlockingIOError(str(err)) from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_holder(fd: int) -> str:
    """Who holds a lock, in words, from what it wrote into the lock file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 65536) or b"{}")
        where = f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
        return f"{where}: {holder['command']}" if holder.get("command") else where
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"


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


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- loading a pretrained encoder ---------------------------------------------------------------------------------
#: what a run written before encoders were published by name holds (DAGMaN and its relatives, SimMIM)
_LEGACY_ENCODERS = {
    "teacher": {"prefix": "teacher.encoder", "kind": "swin", "class_attention_trained": True},
    "student": {"prefix": "student.encoder", "kind": "swin", "class_attention_trained": True},
}


def published_encoders(metadata: dict[str, str], tensors_keys: Any = ()) -> tuple[dict[str, dict], str]:
    """(name -> description, preferred name) of the encoders a pretraining weights file publishes."""
    raw = metadata.get("encoders")
    if raw:
        try:
            encoders = json.loads(raw)
            preferred = metadata.get("preferred_encoder") or next(iter(encoders))
        except (json.JSONDecodeError, StopIteration, TypeError):
            raise CheckpointError("the checkpoint's list of published encoders is unreadable") from None
        return encoders, str(preferred)
    keys = list(tensors_keys)
    encoders = {
        name: dict(spec) for name, spec in _LEGACY_ENCODERS.items() if any(k.startswith(spec["prefix"] + ".") for k in keys)
    }
    if metadata.get("method") == "simmim" and "student" in encoders:
        encoders["student"]["class_attention_trained"] = False
    return encoders, "teacher" if "teacher" in encoders else "student"


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
            try:
                config = json.loads(sibling.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
                raise CheckpointError(f"{sibling} beside {path.name} is not readable JSON ({err})") from None
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
