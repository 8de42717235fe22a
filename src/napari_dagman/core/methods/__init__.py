"""Self-supervised methods: one file per method, one registry (`registry.py`) that the GUI and CLI read."""

from napari_dagman.core.methods.registry import REGISTRY, MethodSpec, get_method, method_names

__all__ = ["REGISTRY", "MethodSpec", "get_method", "method_names"]
