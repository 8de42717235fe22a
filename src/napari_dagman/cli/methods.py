"""``napari-dagman methods``: list the registered self-supervised methods and their defaults."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "methods", help="list the self-supervised methods", description="List the registered methods."
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.methods.registry import REGISTRY

    for spec in REGISTRY.values():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        print(f"{spec.name:10s} {spec.title}\n{'':10s} {spec.summary}\n{'':10s} defaults: {defaults}\n")
    return 0
