"""napari-dagman: self-supervised pretraining of Swin transformers on CT, and viewers for what they learn."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("napari-dagman")
except Exception:  # pragma: no cover - not installed (source tree on sys.path)
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
