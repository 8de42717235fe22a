"""Encoder kinds a run can publish, by name: how to rebuild each from the run's description.

``swin`` is the run's `SwinEncoder` (its `Architecture` is in every weights file). A method that publishes another
kind of network (CASS's CNN) registers a builder here; the builder receives the run's architecture and the
published encoder's own description (``architecture`` in its entry) and returns an untrained module whose state
dict the checkpoint then fills.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from napari_dagman.core.errors import CheckpointError
from napari_dagman.core.models.architecture import Architecture

EncoderBuilder = Callable[[Architecture, dict[str, Any]], nn.Module]
ENCODER_KINDS: dict[str, EncoderBuilder] = {}


def register_encoder_kind(kind: str, builder: EncoderBuilder) -> None:
    ENCODER_KINDS.setdefault(kind, builder)


def build_published_encoder(arch: Architecture, spec: dict[str, Any]) -> nn.Module:
    """An untrained module of the kind ``spec`` describes (``kind`` and, for non-Swin kinds, ``architecture``)."""
    kind = str(spec.get("kind", "swin"))
    if kind not in ENCODER_KINDS:
        # a method registers the kinds it publishes when its module is imported
        from napari_dagman.core.methods.registry import REGISTRY

        for method in REGISTRY.values():
            method.load()
    try:
        builder = ENCODER_KINDS[kind]
    except KeyError:
        raise CheckpointError(f"this version cannot rebuild a published '{kind}' encoder") from None
    return builder(arch, dict(spec.get("architecture") or {}))


def _swin(arch: Architecture, _: dict[str, Any]) -> nn.Module:
    from napari_dagman.core.models.encoder import SwinEncoder

    return SwinEncoder(arch)


register_encoder_kind("swin", _swin)
