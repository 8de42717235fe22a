"""Encoder kinds a run can publish, by name: how to rebuild each from the run's description.

``swin`` is the run's `SwinEncoder` (its `Architecture` is in every weights file); ``resnet`` is CASS's CNN
(`core.models.cnn`, its `CNNArchitecture` in the published encoder's entry). A builder receives the run's
architecture and the published encoder's own description (``architecture`` in its entry) and returns an
untrained module whose state dict the checkpoint then fills. Builders are found by module path, so this room
imports nothing it does not need; a method outside the package registers its own with `register_encoder_kind`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from napari_dagman.core.errors import CheckpointError
from napari_dagman.core.models.architecture import Architecture

EncoderBuilder = Callable[[Architecture, dict[str, Any]], nn.Module]
#: kind -> "module:function" of its builder (imported when a checkpoint of that kind is loaded)
BUILT_IN: dict[str, str] = {
    "swin": "napari_dagman.core.models.encoder:build_swin_encoder",
    "resnet": "napari_dagman.core.models.cnn:build_cnn_encoder",
}
ENCODER_KINDS: dict[str, EncoderBuilder] = {}


def register_encoder_kind(kind: str, builder: EncoderBuilder) -> None:
    """Teach the loader a new kind of published encoder (a method defined outside the package)."""
    ENCODER_KINDS.setdefault(kind, builder)


def build_published_encoder(arch: Architecture, spec: dict[str, Any]) -> nn.Module:
    """An untrained module of the kind ``spec`` describes (``kind`` and, for non-Swin kinds, ``architecture``)."""
    kind = str(spec.get("kind", "swin"))
    builder = ENCODER_KINDS.get(kind)
    if builder is None and kind in BUILT_IN:
        module, name = BUILT_IN[kind].split(":")
        builder = getattr(importlib.import_module(module), name)
    if builder is None:
        raise CheckpointError(f"this version cannot rebuild a published '{kind}' encoder")
    return builder(arch, dict(spec.get("architecture") or {}))
