"""Pieces every dock shares, one module per kind: settings, pickers, layers, layout, run folders, the `JobDock`
base, forms built from configs, notifications, the job runner and the child process, plots, the docks' jobs.

Thin on purpose: no science here. Heavy libraries (torch) are imported inside functions so napari starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

# lazy (PEP 562): ``python -m napari_dagman._widgets.common.child`` imports this package first, and the child
# interpreter must not pay for Qt, magicgui and napari it never uses (nor import its own main module twice)
_WHERE: dict[str, str] = {
    "DeviceComboBox": "pickers",
    "JOB_NAMES": "runs",
    "JobDock": "dock",
    "JobRunner": "runner",
    "OUTPUT_KEY": "pickers",
    "Settings": "settings",
    "VerticalScrollArea": "layout",
    "bind_encoder_chooser": "runs",
    "cells_on_voxels": "layers",
    "checked_run": "runs",
    "dock_widget_of": "dock",
    "is_output_layer": "pickers",
    "jump_to": "layers",
    "label_names_from_features": "layers",
    "last_run": "settings",
    "layer_combo": "pickers",
    "log_colormap": "layers",
    "layer_label_names": "layers",
    "layer_picker": "pickers",
    "layer_select": "pickers",
    "notify_error": "notify",
    "notify_info": "notify",
    "notify_warning": "notify",
    "path_text": "pickers",
    "preselect": "pickers",
    "remember_last_run": "settings",
    "run_json": "runs",
    "scroll_body": "layout",
    "set_enabled": "dock",
    "slice_axis": "layers",
    "stop_jobs_with": "runner",
    "upsert_layer": "layers",
    "viewer_camera": "layers",
    "volume_from_layer": "layers",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "JOB_NAMES", "OUTPUT_KEY", "DeviceComboBox", "JobDock", "JobRunner", "Settings", "VerticalScrollArea",
    "bind_encoder_chooser", "cells_on_voxels", "checked_run", "dock_widget_of", "is_output_layer", "jump_to",
    "label_names_from_features", "last_run", "layer_combo", "layer_label_names", "layer_picker", "layer_select",
    "notify_error", "notify_info", "notify_warning", "path_text", "preselect", "remember_last_run", "run_json",
    "scroll_body", "set_enabled", "slice_axis", "stop_jobs_with", "upsert_layer", "viewer_camera",
    "volume_from_layer",
]  # fmt: skip
