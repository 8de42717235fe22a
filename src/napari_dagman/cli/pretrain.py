"""``napari-dagman pretrain``: self-supervised pretraining (also under ``torchrun --nproc_per_node N``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_dagman.cli.common import run_training
from napari_dagman.core.config import PretrainConfig

EXAMPLES = """examples:
  napari-dagman pretrain ct1.nii.gz ct2.nii.gz dicom_folder/ --out runs/dagman --preset small --steps 2000
  napari-dagman pretrain data/ --out runs/smit --method smit --roi 96 --device cuda:0
  napari-dagman pretrain --out runs/dagman --resume                 # continue where it stopped
  torchrun --nproc_per_node 4 -m napari_dagman.cli pretrain data/ --out runs/big --preset base
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a Swin encoder with a self-supervised method",
        description="Pretrain a Swin encoder on CT volumes (files, or folders of NIfTI/NRRD/MHA or DICOM "
        "series) and write a run folder: config.json, model.safetensors, best.safetensors, "
        "resume.safetensors, metrics.jsonl, run.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", help="image files, DICOM series folders or folders of volume files")
    p.add_argument("--out", required=True, help="run folder to write (must be new unless --resume)")
    p.add_argument("--config", dest="config_file", help="JSON config file; flags given here override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    PretrainConfig.add_arguments(p)
    p.set_defaults(func=run)


def expand_inputs(paths: list[str]) -> list[str]:
    """Files stay; a folder of volume files becomes its files; a DICOM folder stays a folder (one series)."""
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.io import folder_has_dicom, is_volume_file

    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not folder_has_dicom(path):
            files = sorted(str(f) for f in path.iterdir() if is_volume_file(f))
            if not files:
                raise DagmanInputError(
                    f"folder {path} holds no CT volumes (NIfTI, NRRD, MHA) and no DICOM series"
                )
            out.extend(files)
        else:
            out.append(str(path))
    return out


def run(args: argparse.Namespace) -> int:
    from napari_dagman.core.checkpoint import CONFIG_FILE
    from napari_dagman.core.engine import run_pretraining

    config_file = args.config_file
    if args.resume and config_file is None and (Path(args.out) / CONFIG_FILE).is_file():
        config_file = str(Path(args.out) / CONFIG_FILE)
    base = PretrainConfig.load(config_file, strict=False).to_dict() if config_file else {}
    base.update({k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__})
    if args.images:
        base["images"] = expand_inputs(args.images)
    base["out"] = args.out
    config = PretrainConfig.from_dict(base)
    _, status = run_training(run_pretraining, config, resume=args.resume, name="pretrain", quiet=args.quiet)
    return status
