"""One pretraining config from what a user gives: a config file, a run to resume, a method switch, explicit values.

The CLI (its flags) and the pretraining dock (its form) both call `compose_pretrain_config`, so a resume, a file and
a change of method mean the same in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_dagman.core.config.pretrain import PretrainConfig
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.methods.registry import get_method
from napari_dagman.core.runs import CONFIG_FILE, RunFolder


def compose_pretrain_config(
    values: dict[str, Any],
    *,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
) -> PretrainConfig:
    """The config of a pretraining job.

    * ``config_file``: a user's file, read strictly (a typo is refused with the closest name);
    * ``resume``: a run folder to continue; without a file its own config.json is the base, read leniently (it may
      come from an older version), so the run keeps its resolved settings (schedules, HU window...);
    * ``values``: what was given explicitly (flags given, a dock's form) and wins. Method options may be given at the
      top level (merged into the base's) or as ``options`` (a whole set, as a dock's form holds: it replaces the
      base's). Another ``method`` than the base's keeps the base's options that the new method has too (a mask
      ratio).
    """
    values = dict(values)
    base: dict[str, Any] = {}
    if config_file:
        base = PretrainConfig.load(config_file, strict=True).to_dict()
    elif resume is not None and (Path(resume) / CONFIG_FILE).is_file():
        base = PretrainConfig.from_dict(RunFolder(resume).config_dict(), strict=False).to_dict()
    method = str(values.get("method") or base.get("method") or "dagman")
    method_fields = get_method(method).options_class().field_names()
    if base.get("method") not in (None, method):
        for key, value in (base.pop(base["method"], None) or {}).items():
            if key in method_fields:
                base[key] = value
    if "options" in values:  # a whole set of the method's options replaces the base's
        base.pop(base.get("method"), None)
        base = {k: v for k, v in base.items() if k not in method_fields}
    base.update(values)
    base["method"] = method
    return PretrainConfig.from_dict(base)


def resume_images(config: PretrainConfig, out: str | Path, have_layers: bool) -> list[str]:
    """The images a resumed run continues on when none were given: its own; refused in one line when it was trained
    on napari layers (which only the user can choose again)."""
    if config.images or have_layers:
        return list(config.images)
    saved = PretrainConfig.from_dict(RunFolder(out).config_dict(), strict=False).images
    if not saved:
        raise DagmanInputError(
            f"{out} was trained on napari layers: choose the same image layers to resume it"
        )
    return list(saved)
