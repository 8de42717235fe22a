"""``napari-dagman methods``: list the registered self-supervised methods and their defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "methods", help="list the self-supervised methods", description="List the registered methods."
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.methods.registry import REGISTRY
    from napari_dagman.core.training import describe_method

    for name in REGISTRY:
        d = describe_method(name)
        caps = d["capabilities"]
        what = [
            "trains the class attention" if caps["trains_class_attention"] else "class attention not trained",
            "EMA teacher" if caps["has_teacher"] else "no teacher",
            "reconstructs" if caps["reconstructs"] else "no reconstruction",
        ]
        options = ", ".join(f"{k}={v}" for k, v in d["options"].items() if v is not None)
        print(f"{name:10s} {d['title']}")
        print(f"{'':10s} {d['summary']}")
        if d["paper"]:
            print(f"{'':10s} paper: {d['paper']}")
        print(f"{'':10s} {'; '.join(what)}; publishes the '{d['preferred_encoder']}' encoder by default")
        print(f"{'':10s} options: {options}  (pretrain --method {name} --help)\n")
    return 0
