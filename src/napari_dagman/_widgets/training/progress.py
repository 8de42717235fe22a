"""The progress of a training run as the dock shows it (a part of `TrainingDock`): the events every training job
yields (steps, log lines, checkpoints, start stages, the final `FinishedEvent`), the stages of a run's start with
a clock, the training-loss curve (with a resumed run's history, read from its metrics.jsonl), the end report."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from napari_dagman._widgets.common import notify_info, notify_warning

if TYPE_CHECKING:
    from napari_dagman.core.events import ProgressEvent, StepEvent


class TrainingProgress:
    """Job events, start stages and loss curves of `TrainingDock` (its attributes are the dock's).

    It overrides `JobDock`'s `_on_event`, `_on_done` and `_on_error`, so it comes before `JobDock` in the bases.
    """

    # --- events from the job (main thread) -----------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        from napari_dagman.core.events import CheckpointEvent, LogEvent, ProgressEvent, StepEvent

        if isinstance(event, StepEvent):
            self._on_step(event)
        elif isinstance(event, CheckpointEvent):
            self._checkpoints[event.kind] = event.path
        elif isinstance(event, LogEvent):
            message = self.user_text(event.message)
            self.messages.append(message)
            if event.level == "warning":
                notify_warning(message)
            elif self.first_step_s is None:
                self._stage_count = ""
                self._start_line = message  # what is being started, above the stage and its clock
                # a training job says what it starts once its data and model are ready: the first step is next
                if not self.stages or self.stages[-1][0] != "first step":
                    self.stages.append(("first step", time.monotonic() - self._started_at))
                self._show_stage()
            elif self._cancel_requested_at is None:
                self.status.setText(message)
        elif isinstance(event, ProgressEvent) and self.first_step_s is None:
            self._on_stage(event)
        else:
            self._on_job_event(event)

    # --- the start of a run: stages and a clock -------------------------------------------------------------------
    def _on_stage(self, event: ProgressEvent) -> None:
        from napari_dagman.core.events import PREPARING

        # a stage counted over several events (the volumes of a cohort, one by one) is one stage, with its count
        if not self.stages or self.stages[-1][0] != event.stage:
            self.stages.append((event.stage, time.monotonic() - self._started_at))
        self._stage_count = f" ({event.done} of {event.total})" if event.stage == PREPARING else ""
        self._show_stage()

    def _show_stage(self) -> None:
        """The status line until the first step: what starts, the stage it is at, and the seconds so far."""
        if not self.running or self.first_step_s is not None:
            self._clock.stop()
            return
        if self._cancel_requested_at is not None:
            return
        stage = self.stages[-1][0] + self._stage_count if self.stages else "starting"
        elapsed = time.monotonic() - self._started_at
        self.status.setText(f"{self._start_line}\n{stage}... ({elapsed:.0f} s)")

    def startup_text(self) -> str:
        """How long the start took, stage by stage ("first step after 41 s (importing torch and MONAI 9 s, ...)")."""
        if self.first_step_s is None:
            return ""
        marks = [*self.stages, ("", self.first_step_s)]
        parts = [
            f"{name} {end - begin:.0f} s" for (name, begin), (_, end) in zip(marks, marks[1:], strict=False)
        ]
        return f"first step after {self.first_step_s:.0f} s ({', '.join(parts)})"

    # --- steps and the curves -------------------------------------------------------------------------------------
    def _on_step(self, event: StepEvent) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.monotonic() - self._started_at
            self._run_first_step = event.step
            self._clock.stop()
            self.messages.append(self.startup_text())
            self.status.setToolTip(self.startup_text())
        if self._history is not None:
            run_dir, resumed = self._history
            self._history = None
            if resumed:
                self._draw_history(run_dir, event)
        self.loss_plot.add_point("loss", event.step, event.loss)
        for name, value in event.terms.items():
            self.loss_plot.add_point(name, event.step, value)
        text = self._step_text(event)
        if event.step - self._run_first_step < 3:  # the start's figures, while they are news
            text += f"\n{self.startup_text()}"
        if self._cancel_requested_at is None:
            self.status.setText(text)

    def _draw_history(self, run_dir: str, first: StepEvent) -> None:
        """The steps a resumed run made before, from its metrics.jsonl: the curves show the run's whole history."""
        from napari_dagman.core.checkpoint import RunFolder

        for record in RunFolder(run_dir).read_metrics():
            step = int(record.get("step", 0))
            if step >= first.step:
                continue
            if record.get("kind", "train") == "train":
                for name in ("loss", *first.terms):
                    if isinstance(record.get(name), int | float):
                        self.loss_plot.add_point(name, step, float(record[name]))
            else:
                self._on_history_record(record)

    def _on_history_record(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl line of a resumed run's past that is not a training step (e.g. a validation)."""

    def _on_done(self, finished: Any) -> None:
        from napari_dagman.core.events import FinishedEvent

        if not isinstance(finished, FinishedEvent):
            return
        self.last_finished = finished
        text, actions = self._finish_report(finished)
        self.status.setText(text)
        notify_info(text, actions=actions)

    def _on_error(self, err: BaseException) -> None:
        # the notification is already out (JobRunner); the dock keeps the reason and goes back to idle
        self._clock.stop()
        last = self._checkpoints.get("last")
        self.status.setText(
            f"failed: {self.user_text(str(err))}" + (f"\nlast good checkpoint: {last}" if last else "")
        )
