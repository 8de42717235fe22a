"""``napari-dagman``: the command line over the same config objects and job generators as the GUI.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; ``main`` dispatches and turns
user errors into a one-line message and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from napari_dagman import __version__

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "demo", "pretrain", "finetune", "predict", "classify", "attention", "embed", "export", "methods", "view"
)

EXIT_USER_ERROR = 2


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` lets a subcommand add what depends on it (``pretrain --method X``: X's options)."""
    parser = argparse.ArgumentParser(
        prog="napari-dagman",
        description="Self-supervised pretraining of Swin transformers on CT (DAGMaN and baselines), and what "
        "it learned: attention maps, masks, segmentation, organ clusters.",
    )
    parser.add_argument("--version", action="version", version=f"napari-dagman {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"napari_dagman.cli.{name}").add_parser(sub, argv)
    return parser


def empty_argument(argv: Sequence[str]) -> str | None:
    """The first flag (or positional argument) given an empty string, which argparse takes as a value and the
    job then as "not given" (a default used without a word); None when there is none."""
    for k, token in enumerate(argv):
        if token.startswith("--") and token.endswith("=") and len(token) > 3:
            return token[:-1]
        if token == "":
            before = argv[k - 1] if k else ""
            return before if before.startswith("-") and "=" not in before else f"argument {k + 1}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from napari_dagman.core.errors import DagmanError

    argv = list(sys.argv[1:] if argv is None else argv)
    empty = empty_argument(argv)
    if empty:  # before argparse, which takes "" as a value (or chokes on it in a choice list)
        command = f" {argv[0]}" if argv and argv[0] in SUBCOMMANDS else ""
        print(f"napari-dagman{command}: error: {empty} is empty: give a value or leave it out", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        parser = build_parser(argv)
    except DagmanError as err:
        print(f"napari-dagman: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except DagmanError as err:
        print(f"napari-dagman {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"napari-dagman {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:  # PyTorch, NumPy or ITK out of memory outside a training step
        from napari_dagman.core.memory import out_of_memory, out_of_memory_message

        if not out_of_memory(err):
            raise
        print(f"napari-dagman {args.command}: error: {out_of_memory_message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
