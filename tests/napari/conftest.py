"""Viewer tests: keep the user's QSettings untouched."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_DAGMAN_SETTINGS", str(tmp_path / "napari-dagman-settings.ini"))


@pytest.fixture
def notifications(monkeypatch):
    """Every napari notification message shown during the test (errors, warnings, infos)."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def record(notification):
        seen.append((str(notification.severity), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)
