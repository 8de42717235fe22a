"""Exceptions that carry a one-line message meant for the user (GUI notification or CLI error)."""


class DagmanError(Exception):
    """Base class: the message is shown to the user as it is, without a traceback."""


class DagmanInputError(DagmanError, ValueError):
    """Bad input: wrong file, wrong shape, NaNs, empty labels, incompatible checkpoint, missing device."""


class CheckpointError(DagmanInputError):
    """A run folder or checkpoint that cannot be used for what was asked."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (a library's own words, without its trace), else the
    exception's type."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__
