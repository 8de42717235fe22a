"""What a run folder is, without torch: its files, its lock, its config, what it publishes and its probe figures.

The docks read this to fill their choosers the moment a folder is picked (importing torch would freeze napari for
seconds), and the CLI to refuse a wrong folder in one line before any work. Weights I/O and encoder loading, which
need torch, live in `core.checkpoint`.

`published(run)` is the single answer to "what does this run offer downstream": its encoders by the names the
method gave them (``teacher``, ``student``, ``transformer``, ``cnn``, ``target``...), the preferred one and why, the
method's capabilities, and the probe figures each encoder logged. Every chooser (explorer, fine-tuning, clusters,
classification) lists these names, never a fixed "teacher/student".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_dagman.core.errors import CheckpointError, DagmanInputError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
RESUME_FILE = "resume.safetensors"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
SNAPSHOT_DIR = "checkpoints"
LOCK_FILE = ".lock"
#: the largest config.json read (a hostile or corrupt file is refused before it is parsed)
MAX_CONFIG_BYTES = 4 * 2**20


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
        from napari_dagman.core.files import read_json

        data = read_json(path, str(path), error=CheckpointError, max_bytes=MAX_CONFIG_BYTES)
        if not isinstance(data, dict) or "architecture" not in data:
            raise CheckpointError(f"{path} is not a napari-dagman run config (no architecture)")
        return data

    def architecture(self) -> Any:
        from napari_dagman.core.models.architecture import checked_architecture

        return checked_architecture(self.config_dict()["architecture"], str(self.file(CONFIG_FILE)))

    def write_config(self, data: dict[str, Any]) -> None:
        from napari_dagman.core.files import atomic_write_text

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
                except (ValueError, RecursionError):
                    break  # a line cut by a crash: everything after it is unreliable
        return out

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines after ``step`` (a resumed run rewrites them)."""
        from napari_dagman.core.files import atomic_write_text

        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.file(METRICS_FILE), "".join(json.dumps(r) + "\n" for r in kept))

    # run.json ----------------------------------------------------------------------------------------------
    def write_run_info(self, info: dict[str, Any]) -> None:
        from napari_dagman.core.files import atomic_write_text

        atomic_write_text(self.file(RUN_FILE), json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")

    def read_run_info(self) -> dict[str, Any]:
        """run.json as a dict; empty when missing or unreadable (a record, never a reason to refuse a run)."""
        try:
            info = json.loads(self.file(RUN_FILE).read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return info if isinstance(info, dict) else {}

    def recover(self) -> list[str]:
        """Clean up after a job that was killed here; call it holding the lock. Returns what to tell the user.

        A killed job leaves temporary files of unfinished writes (removed) and a run.json that still says
        "running" (marked as interrupted, with the step its last save reached).
        """
        from napari_dagman.core.files import remove_temporaries

        notes = []
        removed = remove_temporaries(self.path) + remove_temporaries(self.file(SNAPSHOT_DIR))
        if removed:
            notes.append(f"removed {len(removed)} unfinished file(s) a stopped job left in {self.path}")
        info = self.read_run_info()
        if info.get("status") == "running":
            saved = saved_step(self.file(RESUME_FILE))
            info["status"] = (
                "interrupted: the job ended without recording how (killed, or the machine stopped)"
            )
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
        from napari_dagman.core.checkpoint import environment_info

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
    """The step a checkpoint was saved at, read from its safetensors header (JSON) without loading a tensor;
    None when it is missing or unreadable."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= MAX_CONFIG_BYTES:
                return None
            header = json.loads(fh.read(size))
        return int(header["__metadata__"]["step"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
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


# --- what a run publishes ----------------------------------------------------------------------------------------
#: what a run written before encoders were published by name holds (DAGMaN and its relatives, SimMIM)
LEGACY_ENCODERS = {
    "teacher": {"prefix": "teacher.encoder", "kind": "swin", "class_attention_trained": True},
    "student": {"prefix": "student.encoder", "kind": "swin", "class_attention_trained": True},
}


@dataclass(frozen=True)
class EncoderInfo:
    """One encoder a run publishes: where its weights are, what it is, whether its class attention was trained."""

    name: str
    prefix: str
    kind: str = "swin"
    class_attention_trained: bool = True
    description: str = ""
    #: how to rebuild a network that is not the run's Swin (a CNN's depth and width)
    architecture: dict[str, Any] | None = None

    @property
    def has_attention(self) -> bool:
        """A Swin whose class attention the method trained: its maps are attention."""
        return self.kind == "swin" and self.class_attention_trained


@dataclass(frozen=True)
class Published:
    """What a run offers downstream (see the module docstring)."""

    path: Path
    job: str
    method: str
    encoders: dict[str, EncoderInfo]
    preferred: str
    preferred_reason: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The encoders' names, the preferred one first."""
        return [self.preferred, *(n for n in self.encoders if n != self.preferred)]

    def choices(self, *, swin_only: bool = False, attention_only: bool = False) -> list[tuple[str, str]]:
        """(label, value) pairs for a chooser: "auto (<preferred>)" first, then each name (with its kind when it is
        not a Swin); ``swin_only`` / ``attention_only`` leave out what a job cannot use."""
        names = [
            n
            for n in self.names
            if (not swin_only or self.encoders[n].kind == "swin")
            and (not attention_only or self.encoders[n].has_attention)
        ]
        out = [(f"auto ({self.preferred})", "auto")] if self.preferred in names else []
        out += [
            (n if self.encoders[n].kind == "swin" else f"{n} ({self.encoders[n].kind})", n) for n in names
        ]
        return out

    def resolve(self, which: str) -> EncoderInfo:
        """The encoder ``which`` names (``auto``: the preferred one), or a one-line refusal naming the others."""
        name = self.preferred if which in ("auto", "", None) else which
        if name not in self.encoders:
            raise CheckpointError(
                f"{self.path.name} ({self.method}) publishes no '{which}' encoder; choose one of "
                f"{', '.join(self.names)}"
            )
        return self.encoders[name]

    @property
    def has_teacher(self) -> bool:
        return bool(self.capabilities.get("has_teacher", False))

    @property
    def cell_masks(self) -> bool:
        return bool(self.capabilities.get("cell_masks", True))


def encoders_of(config: dict[str, Any]) -> tuple[dict[str, EncoderInfo], str]:
    """The encoders a run's config (or a weights file's metadata, parsed) records, and the preferred name."""
    raw = config.get("encoders")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise CheckpointError("the run's list of published encoders is unreadable") from None
    if not raw:
        raw = {k: dict(v) for k, v in LEGACY_ENCODERS.items()}
        if config.get("method") == "simmim":
            raw = {"student": {**raw["student"], "class_attention_trained": False}}
    if not isinstance(raw, dict):
        raise CheckpointError("the run's list of published encoders is unreadable")
    encoders = {
        str(name): EncoderInfo(
            name=str(name),
            prefix=str(spec.get("prefix", name)),
            kind=str(spec.get("kind", "swin")),
            class_attention_trained=bool(spec.get("class_attention_trained", True)),
            description=str(spec.get("description", "")),
            architecture=spec.get("architecture") if isinstance(spec.get("architecture"), dict) else None,
        )
        for name, spec in raw.items()
        if isinstance(spec, dict)
    }
    if not encoders:
        raise CheckpointError("the run publishes no encoder")
    preferred = str(
        config.get("preferred_encoder") or ("teacher" if "teacher" in encoders else next(iter(encoders)))
    )
    return encoders, preferred if preferred in encoders else next(iter(encoders))


def published(path: str | os.PathLike) -> Published:
    """What the pretraining run in ``path`` (a folder, or one of its weights files) publishes; a one-line
    `CheckpointError` for anything that is not a pretraining run."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent.parent if folder.parent.name == SNAPSHOT_DIR else folder.parent
    config = RunFolder(folder).config_dict()
    job = str(config.get("job", "pretrain"))
    if job != "pretrain":
        raise CheckpointError(f"{folder} is a {job} run, not a pretraining run")
    encoders, preferred = encoders_of(config)
    caps = config.get("capabilities") if isinstance(config.get("capabilities"), dict) else {}
    return Published(
        path=folder,
        job=job,
        method=str(config.get("method", "")),
        encoders=encoders,
        preferred=preferred,
        preferred_reason=str(config.get("preferred_reason", "")),
        capabilities=dict(caps),
    )


def probe_figures(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """The last probe figures a run logged, per published encoder name (``probe_<name>_<figure>`` in
    metrics.jsonl), plus ``step``; {} when it logged none. Collapse probes of the run as a whole
    (``probe_token_cosine``, ``probe_output_cosine*``) come under the key ``run``."""
    try:
        info = published(path)
    except CheckpointError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for row in RunFolder(info.path).read_metrics():
        for name in info.encoders:
            prefix = f"probe_{name}_"
            figures = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
            if figures:
                out[name] = {"step": row.get("step"), **figures}
        run = {
            k[len("probe_") :]: v for k, v in row.items() if k.startswith(("probe_token_", "probe_output_"))
        }
        if run:
            out["run"] = {"step": row.get("step"), **run}
    return out
