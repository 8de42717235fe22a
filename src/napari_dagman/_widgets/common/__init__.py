"""Pieces every dock shares, one module per kind: settings, pickers, layers, layout, run folders, the `JobDock`
base, forms built from configs, notifications, the job runner and the child process, plots, the docks' jobs.

Thin on purpose: no science here. Heavy libraries (torch) are imported inside functions so napari starts fast.
"""

from napari_dagman._widgets.common.dock import JobDock, dock_widget_of, set_enabled
from napari_dagman._widgets.common.layers import (
    cells_on_voxels,
    jump_to,
    label_names_from_features,
    layer_label_names,
    slice_axis,
    upsert_layer,
    viewer_camera,
    volume_from_layer,
    warn_if_label_map,
)
from napari_dagman._widgets.common.layout import VerticalScrollArea, scroll_body
from napari_dagman._widgets.common.notify import notify_error, notify_info, notify_warning
from napari_dagman._widgets.common.pickers import (
    OUTPUT_KEY,
    DeviceComboBox,
    is_output_layer,
    layer_combo,
    layer_picker,
    layer_select,
    path_text,
    preselect,
)
from napari_dagman._widgets.common.runner import JobRunner, stop_jobs_with
from napari_dagman._widgets.common.runs import JOB_NAMES, bind_encoder_chooser, checked_run, run_json
from napari_dagman._widgets.common.settings import Settings, last_run, remember_last_run

__all__ = [
    "JOB_NAMES", "OUTPUT_KEY", "DeviceComboBox", "JobDock", "JobRunner", "Settings", "VerticalScrollArea",
    "bind_encoder_chooser", "cells_on_voxels", "checked_run", "dock_widget_of", "is_output_layer", "jump_to",
    "label_names_from_features", "last_run", "layer_combo", "layer_label_names", "layer_picker", "layer_select",
    "notify_error", "notify_info", "notify_warning", "path_text", "preselect", "remember_last_run", "run_json",
    "scroll_body", "set_enabled", "slice_axis", "stop_jobs_with", "upsert_layer", "viewer_camera",
    "volume_from_layer", "warn_if_label_map",
]  # fmt: skip
