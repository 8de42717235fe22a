"""Run folders as the docks read them: `core.runs`, without torch, so picking a folder stays instant; choosers of
a run's own encoder names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from napari_dagman._widgets.common.pickers import path_text
from napari_dagman.core.errors import DagmanInputError

if TYPE_CHECKING:
    pass

# --- run folders ------------------------------------------------------------------------------------------------
#: How the docks name the kinds of run (a run folder's config.json "job").
JOB_NAMES = {"pretrain": "pretraining", "finetune": "fine-tuning"}


def run_json(path: str) -> dict[str, Any]:
    """A run folder's config.json, {} when there is none or it is unreadable (`core.runs`: no torch import, so
    choosing a folder, or opening a dock with the last run, stays instant)."""
    from napari_dagman.core.errors import CheckpointError
    from napari_dagman.core.runs import RunFolder

    if not path:
        return {}
    try:
        return RunFolder(path).config_dict()
    except CheckpointError:
        return {}


def bind_encoder_chooser(
    combo: Any, run: Any, *, swin_only: bool = False, attention_only: bool = False, pretrain_only: bool = True
) -> Callable[[], None]:
    """Keep ``combo``'s choices the encoders the run chosen in ``run`` (a FileEdit) publishes, by their own names
    ("auto (<preferred>)" first): a method's ``target``, CASS's ``transformer`` and ``cnn`` appear as they are.
    ``swin_only``/``attention_only`` leave out encoders a job cannot use. Returns the refresh function (called
    once now, and on every change of ``run``)."""
    from napari_dagman.core.errors import CheckpointError
    from napari_dagman.core.runs import published

    def run_choices(*_: Any) -> list[tuple[str, str]]:
        try:
            choices = published(path_text(run)).choices(swin_only=swin_only, attention_only=attention_only)
        except CheckpointError:
            choices = []
        return choices or [("auto", "auto")]

    def refresh(*_: Any) -> None:
        previous = combo.value
        # a callable, not a list: napari calls reset_choices() on every layer change, which would otherwise put
        # back the list the combo was built with
        combo.choices = run_choices
        values = [value for _, value in run_choices()]
        combo.value = previous if previous in values else values[0]

    run.changed.connect(refresh)
    refresh()
    return refresh


def checked_run(path: str, job: str | None = None) -> dict[str, Any]:
    """The config of a run folder a dock was given, or a one-line refusal at Start (not a run folder, or a run
    of another kind), before a job is started that would fail on it later."""
    from napari_dagman.core.runs import RunFolder

    config = RunFolder(path).config_dict()
    kind = str(config.get("job", "pretrain"))
    if job is not None and kind != job:
        raise DagmanInputError(f"{path} is a {kind} run, not a {JOB_NAMES.get(job, job)} run")
    return config
