"""Qt-free core of napari-dagman: volumes and I/O, the models, the self-supervised methods, the training
engine, attention, fine-tuning and embeddings. Nothing here imports Qt or napari."""

from napari_dagman.core.errors import DagmanError, DagmanInputError

__all__ = ["DagmanError", "DagmanInputError"]
