"""Pretraining dock: a `PretrainConfig` from forms, `core.training.run_pretraining` in the background, its events drawn.

The form is built from the config's fields (`_forms.ConfigForm`): the general options, and the chosen method's own
options (its options dataclass, preset values first), rebuilt when the method changes. What a method does is read
from its `capabilities`, never from its name. The run happens in a child process by default (see `common.child_process`
for why; a thread is there for debugging). The dock shows the loss terms live, puts the crop, the class attention,
the chosen mask and the cells the noisy teacher did not see on the viewer every N steps (one layer each, updated
in place), and on finish offers the run folder to the attention explorer.

The dock is three parts: the form and the method's options (`PretrainForm`, `pretrain_form.py`), the live previews
(`PretrainPreviews`, `previews.py`) and, here, the run itself (building the job, the status line, the end report).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QUrl
from qtpy.QtGui import QDesktopServices

from napari_dagman._widgets.common import remember_last_run, volume_from_layer
from napari_dagman._widgets.common.forms import ConfigForm
from napari_dagman._widgets.common.plots import LossPlot
from napari_dagman._widgets.training.base import Actions, TrainingDock
from napari_dagman._widgets.training.pretrain_form import (
    EXPOSED,
    GENERAL_FIELDS,
    LABELS,
    PRIMARY_FIELDS,
    SECTION_TITLES,
    PretrainForm,
    describe_capabilities,
)
from napari_dagman._widgets.training.previews import (
    MASK_COLOUR,
    PREVIEW_ATTENTION,
    PREVIEW_CLASS_ATTENTION,
    PREVIEW_CROP,
    PREVIEW_LAYERS,
    PREVIEW_MASK,
    PREVIEW_PICTURE,
    PREVIEW_UNSEEN,
    UNSEEN_COLOUR,
    PretrainPreviews,
)
from napari_dagman.core.config import PretrainConfig
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.methods.registry import get_method

if TYPE_CHECKING:
    import napari
    from napari_dagman.core.events import FinishedEvent, StepEvent
    from napari_dagman.core.volume import Volume

__all__ = [
    "EXPLORER_WIDGET",
    "EXPOSED",
    "GENERAL_FIELDS",
    "LABELS",
    "MASK_COLOUR",
    "PREVIEW_ATTENTION",
    "PREVIEW_CLASS_ATTENTION",
    "PREVIEW_CROP",
    "PREVIEW_LAYERS",
    "PREVIEW_MASK",
    "PREVIEW_PICTURE",
    "PREVIEW_UNSEEN",
    "PRIMARY_FIELDS",
    "SECTION_TITLES",
    "UNSEEN_COLOUR",
    "PretrainWidget",
    "describe_capabilities",
]

EXPLORER_WIDGET = "Attention & mask explorer"


class PretrainWidget(PretrainForm, PretrainPreviews, TrainingDock):
    """Self-supervised pretraining from napari: method, data, hyperparameters, device; live loss and preview.

    The form (`PretrainForm`) and the previews (`PretrainPreviews`) come before `TrainingDock`: they override its
    hooks (`showEvent`, `_on_job_event`).
    """

    run_kind = "pretraining run"
    job = "pretrain"
    command = "napari-dagman pretraining dock"
    remembered_fields = ("method", "preset", "dims", "roi", "spacing")

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, settings_group="pretrain", description="pretraining")
        self._picture_layers: set[str] = set()
        self._step_seconds: list[float] = []
        self._probe_diversity: dict[str, float] = {}
        self._trained_layer_names: set[str] = set()
        self.method_form: ConfigForm | None = None
        self._method_forms: list[Any] = []
        self._build()
        self._restore_form()
        self._on_method()

    @property
    def plot(self) -> LossPlot:
        """The training-loss curve (the name scripts and tests know)."""
        return self.loss_plot

    # --- building the job ----------------------------------------------------------------------------------------
    def build_job(self) -> tuple[PretrainConfig, list[Any], bool]:
        """The config, the layer volumes and the resume flag the Start button would run (raises on bad input)."""
        from napari_dagman._widgets.common.jobs import picklable_volume
        from napari_dagman.core.config.compose import compose_pretrain_config, resume_images

        out, resume = self._run_folder(self.method.value)
        images = self._paths()
        volumes = [picklable_volume(volume_from_layer(layer, "image")) for layer in self.layers.value]
        if not resume and not volumes and not images:
            raise DagmanInputError("no training data: choose image layers, files or a folder")
        # the same composition as the CLI's: a resumed run's own settings, then the form (its method options whole)
        config = compose_pretrain_config(
            {**self.config_values(), "images": images, "out": out}, resume=out if resume else None
        )
        if resume:
            config = config.replace(images=resume_images(config, out, bool(volumes)))
        return config, volumes, resume

    # --- running the job (hooks of TrainingDock) ---------------------------------------------------------------
    def _job(self) -> Callable[..., Generator[Any, None, Any]]:
        from napari_dagman._widgets.common.jobs import pretrain_job

        return pretrain_job

    def _job_options(self, config: PretrainConfig) -> dict[str, Any]:
        # a method registered by user code exists only in this process: the child registers it too
        return {"methods": (get_method(config.method),)}

    def _prepare_run(self, data: list[Volume]) -> None:
        # the engine names a volume by its metadata name: previews of these crops overlay an open layer
        self._trained_layer_names = {
            str(volume.metadata.get("name") or f"volume {i}") for i, volume in enumerate(data)
        }
        self._step_seconds.clear()
        self._probe_diversity.clear()
        self.remove_previews()  # a previous run's previews would mislead

    def _starting_text(self, config: PretrainConfig) -> str:
        where = "a separate process" if self.in_process.value else "a thread"
        return f"starting {config.method} in {where} on {config.device}: {config.out}"

    # --- events from the job (main thread) -------------------------------------------------------------------
    def _step_text(self, event: StepEvent) -> str:
        """Step, loss, speed and ETA (over the last 20 steps), head diversity when the method trains attention."""
        self._step_seconds.append(event.seconds_per_step)
        seconds = float(np.mean(self._step_seconds[-20:]))
        eta = seconds * (event.total_steps - event.step)
        parts = [
            f"step {event.step}/{event.total_steps}",
            f"loss {event.loss:.4g}",
            f"{seconds:.2f} s/step",
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
        ]
        if self.capabilities.trains_class_attention:
            # measured on the run's probe crops every --probe-every steps: keep the latest figures on screen
            for key, value in event.extras.items():
                found = re.fullmatch(r"probe_(\w+)_head_diversity", key)
                if found and np.isfinite(value):
                    self._probe_diversity[found.group(1)] = float(value)
            if self._probe_diversity:
                figures = ", ".join(f"{name} {value:.3f}" for name, value in self._probe_diversity.items())
                parts.append(f"head diversity: {figures}")
        if self._runner.paused:
            parts.append("pausing")
        return " · ".join(parts)

    def _finish_report(self, finished: FinishedEvent) -> tuple[str, Actions]:
        """Run folder and checkpoints; the run becomes the attention explorer's "last run"."""
        remember_last_run(finished.run_dir)
        best, last = finished.paths.get("best", ""), finished.paths.get("last", "")
        if finished.cancelled:
            head = f"Pretraining cancelled at step {finished.steps_done}/{finished.total_steps}; resumable."
        else:
            head = f"Pretraining finished: {finished.steps_done} steps."
        lines = [head, f"Run folder: {finished.run_dir}", f"last: {last}"]
        if best and Path(best).is_file():
            lines.append(f"best: {best}")
        self.explore_button.setEnabled(True)
        self.folder_button.setEnabled(True)
        run_dir = finished.run_dir
        first: tuple[str, Callable[..., Any]] = (
            # a cancelled run is offered to go on; a finished one, to be looked at
            ("Resume", lambda *_: self.resume_run(run_dir))
            if finished.cancelled
            else ("Explore attention", lambda *_: self.open_in_explorer(run_dir))
        )
        return "\n".join(lines), [first, ("Open folder", lambda *_: self.open_run_folder(run_dir))]

    def resume_run(self, run_dir: str) -> None:
        """Choose ``run_dir`` to resume (its settings fill the form); Start then continues it."""
        self.resume_from.value = run_dir

    # --- after the run -------------------------------------------------------------------------------------------
    def open_in_explorer(self, run_dir: str | None = None) -> Any:
        """Dock the attention & mask explorer with this run folder chosen; returns the explorer widget.

        The live previews are hidden at once (they showed one training crop, the explorer shows the run's maps)
        and removed when the explorer's first job has ended. Removed before it, napari crashed in its OpenGL
        drawing on Mesa's software renderer (a segfault in glDrawArrays, reproduced 5 of 5 times) when the
        explorer then computed; hidden, then removed after, it did not (0 of 4).
        """
        explorer = self._open_with_run(EXPLORER_WIDGET, "attention explorer", run_dir)
        if explorer is not None:
            self.hide_previews()
            explorer.after_next_job(self.remove_previews)
        return explorer

    def open_run_folder(self, run_dir: str | None = None) -> None:
        run_dir = self._finished_run(run_dir)
        if run_dir is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(run_dir))
