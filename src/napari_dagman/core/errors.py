"""Exceptions that carry a one-line message meant for the user (GUI notification or CLI error)."""


class DagmanError(Exception):
    """Base class: the message is shown to the user as it is, without a traceback."""


class DagmanInputError(DagmanError, ValueError):
    """Bad input: wrong file, wrong shape, NaNs, empty labels, incompatible checkpoint, missing device."""


class LabelMapAsCTError(DagmanInputError):
    """An image given as the CT holds a label map; ``layer_name`` is the napari layer's, when it came from one (the
    dock then offers to read it as a CT anyway)."""

    layer_name: str | None = None


def env_flag(name: str) -> bool:
    """A yes/no environment variable (1/true/yes, 0/false/no or unset); anything else is refused, named."""
    import os

    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise DagmanInputError(f"{name} must be 1 or 0, got '{raw}'")


class CheckpointError(DagmanInputError):
    """A run folder or checkpoint that cannot be used for what was asked."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (a library's own words, without its trace), else the
    exception's type."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__
