"""A 20-case Medical Segmentation Decathlon folder end to end (issue 26's target): ``finetune dataset.json`` and
``predict imagesTs/ --reference labelsTs/`` with the organ names of the ``dataset.json`` and one table.

Data: ``example_ct.nii.gz`` of ``../shared/data`` as every case (symlinks, named ``abd_000``...); its label map
``example_seg_fast_force_split.nii.gz`` (TotalSegmentator ids) renumbered the way an nnU-Net set numbers them,
liver=1, spleen=2, kidney_right=3, kidney_left=4, and nothing else; ``dataset.json`` names them so. Under
TotalSegmentator's numbering these ids would read spleen, kidney_right, kidney_left, gallbladder: the names the
tool gave such a set before it stopped guessing.

Runs the command line as a user would (tiny preset, 6 mm, ROI 64, ``--steps``), times both commands, and checks:
the run's classes and the cohort table's organs are the dataset.json's names; the table has one row per test case
and organ. ``--cases`` training cases and as many test cases. Writes ``--json`` and prints the figures.

    python benchmarks/msd_cohort.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MSD_IDS = {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
TOTALSEG = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "msd_cohort"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "msd_cohort.json"))
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    return p.parse_args(argv)


def make_dataset(data: Path, root: Path, cases: int) -> Path:
    from napari_dagman.core.io import read_volume, write_volume

    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    seg = read_volume(data / "example_seg_fast_force_split.nii.gz")
    renumbered = np.zeros(seg.shape, np.uint8)
    for name, msd in MSD_IDS.items():
        renumbered[seg.array == TOTALSEG[name]] = msd
    labels = root / "seg_msd.nii.gz"
    write_volume(seg.with_array(renumbered), labels)
    for i in range(2 * cases):
        part = "Tr" if i < cases else "Ts"
        case = f"abd_{i:03d}"
        for target, source in ((root / f"images{part}" / f"{case}_0000.nii.gz", data / "example_ct.nii.gz"),
                               (root / f"labels{part}" / f"{case}.nii.gz", labels)):  # fmt: skip
            if not target.exists():
                target.symlink_to(source)
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **MSD_IDS},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return root / "dataset.json"


def cli(*argv: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "napari_dagman.cli", *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    import shutil

    import pandas as pd

    args = parse_args(argv)
    root = Path(args.work)
    shutil.rmtree(root / "run", ignore_errors=True)
    shutil.rmtree(root / "predictions", ignore_errors=True)
    dataset = make_dataset(Path(args.data), root / "Dataset001_Abdomen", args.cases)
    names = list(MSD_IDS)
    finetune_s = cli(
        "finetune", str(dataset), "--out", str(root / "run"), "--preset", "tiny", "--roi", "64", "--spacing", "6",
        "--steps", str(args.steps), "--val-every", str(args.steps), "--labels", ",".join(names), "--device", "cpu",
        "--quiet",
    )  # fmt: skip
    classes = json.loads((root / "run" / "config.json").read_text())["classes"]
    predict_s = cli(
        "predict", str(dataset.parent / "imagesTs"), "--checkpoint", str(root / "run"), "--out",
        str(root / "predictions"), "--reference", str(dataset.parent / "labelsTs"), "--device", "cpu", "--quiet",
    )  # fmt: skip
    table = pd.read_csv(root / "predictions" / "cohort.csv")
    result = {
        "cases": {"train": args.cases, "test": args.cases},
        "steps": args.steps,
        "finetune_s": finetune_s,
        "predict_s": predict_s,
        "predict_s_per_case": predict_s / args.cases,
        "run_classes": classes,
        "table_rows": len(table),
        "table_cases": int(table["case"].nunique()),
        "table_organs": sorted(set(table["organ"])),
        "names_right": classes["names"] == names and sorted(set(table["organ"])) == sorted(names),
        "one_table": len(table) == args.cases * len(names),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
