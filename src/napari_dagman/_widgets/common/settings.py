"""Values remembered between napari sessions, and the run folder the pretraining dock trained last."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QSettings

if TYPE_CHECKING:
    pass


# --- settings ---------------------------------------------------------------------------------------------------
class Settings:
    """Values remembered between napari sessions (last device, output folder...).

    Stored with QSettings; ``NAPARI_DAGMAN_SETTINGS`` (an .ini path) redirects them, which tests use so they
    never touch a user's settings.
    """

    def __init__(self, group: str) -> None:
        path = os.environ.get("NAPARI_DAGMAN_SETTINGS")
        self._qs = (
            QSettings(path, QSettings.Format.IniFormat)
            if path
            else QSettings("napari-dagman", "napari-dagman")
        )
        self._group = group

    def get(self, key: str, default: Any = None) -> Any:
        value = self._qs.value(f"{self._group}/{key}", default)
        return default if value is None else value

    def set(self, key: str, value: Any) -> None:
        self._qs.setValue(f"{self._group}/{key}", value)
        self._qs.sync()


#: Where the pretraining dock remembers the run folder it trained (or resumed) last.
LAST_RUN_GROUP, LAST_RUN_KEY = "runs", "last_run"


def last_run() -> str:
    """The run folder last trained (or resumed) in the pretraining dock ("" when none): the attention explorer
    and the fine-tuning dock start from it."""
    return str(Settings(LAST_RUN_GROUP).get(LAST_RUN_KEY, "") or "")


def remember_last_run(run_dir: str) -> None:
    Settings(LAST_RUN_GROUP).set(LAST_RUN_KEY, run_dir)
