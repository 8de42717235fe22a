"""``napari-dagman pretrain``: self-supervised pretraining (also under ``torchrun --nproc_per_node N``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from napari_dagman.cli.common import run_training, say
from napari_dagman.core.config import PretrainConfig

EXAMPLES = """examples:
  napari-dagman pretrain ct1.nii.gz ct2.nii.gz dicom_folder/ --out runs/dagman --preset small --steps 2000
  napari-dagman pretrain data/ --out runs/smit --method smit --roi 96 --device cuda:0
  napari-dagman pretrain --out runs/dagman --resume                 # continue where it stopped
  torchrun --nproc_per_node 4 -m napari_dagman.cli pretrain data/ --out runs/big --preset base
"""


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a Swin encoder with a self-supervised method",
        description="Pretrain a Swin encoder on CT volumes (files, or folders of NIfTI/NRRD/MHA or DICOM "
        "series) and write a run folder: config.json, model.safetensors, best.safetensors, "
        "resume.safetensors, metrics.jsonl, run.json. Each method has options of its own: "
        "`pretrain --method X --help` lists X's.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", help="image files, DICOM series folders or folders of volume files")
    p.add_argument("--out", required=True, help="run folder to write (must be new unless --resume)")
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    PretrainConfig.add_arguments(p, skip=("options",))
    if argv and argv[0] == "pretrain":  # only then: a method's options import the method (and torch)
        method = requested_method(list(argv[1:]))
        if method is not None:
            add_method_options(p, method)
    p.set_defaults(func=run)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def requested_method(argv: list[str]) -> str | None:
    """The method a pretrain command line asks for: ``--method``, else its ``--config`` file's, else the run's
    (``--resume``), else the default. None when that name is not registered (argparse then says so)."""
    import json

    from napari_dagman.core.methods.registry import method_names

    method = _flag_value(argv, "--method")
    if method is None:
        source = _flag_value(argv, "--config")
        out = _flag_value(argv, "--out")
        if source is None and "--resume" in argv and out:
            source = str(Path(out) / "config.json")
        if source and Path(source).is_file():
            try:
                method = json.loads(Path(source).read_text()).get("method")
            except (ValueError, AttributeError, OSError, RecursionError):
                method = None  # the config is refused with its own message later
    method = method or "dagman"
    return method if method in method_names() else None


def add_method_options(parser: argparse.ArgumentParser, method: str) -> None:
    """The method's own options as flags, with this preset's defaults in their help."""
    from napari_dagman.core.methods.registry import get_method

    spec = get_method(method)
    spec.options_class().add_arguments(parser, title=f"{method} options", defaults=spec.default_options())


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.config.compose import compose_pretrain_config
    from napari_dagman.core.io import expand_inputs
    from napari_dagman.core.methods.registry import get_method
    from napari_dagman.core.training import run_pretraining

    given = {k: v for k, v in vars(args).items() if k in PretrainConfig.field_names()}
    where = ["--out", args.out, *(["--config", args.config_file] if args.config_file else [])]
    method = given.get("method") or requested_method([*where, *(["--resume"] if args.resume else [])])
    method_fields = get_method(method or "dagman").options_class().field_names()
    given.update({k: v for k, v in vars(args).items() if k in method_fields})
    if args.images:
        given["images"] = [str(p) for p in args.images]
    given["out"] = args.out
    config = compose_pretrain_config(
        given, config_file=args.config_file, resume=args.out if args.resume else None
    )
    if args.images:  # after the config file is read: a broken one is said first
        images, notes = expand_inputs(config.images)
        for note in notes:
            say(f"note: {note}", err=True)
        config = config.replace(images=images)
    _, status = run_training(run_pretraining, config, resume=args.resume, name="pretrain", quiet=args.quiet)
    return status
