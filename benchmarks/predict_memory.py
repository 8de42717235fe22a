"""Peak memory of ``napari-dagman predict`` and of an exported MONAI Bundle on a 512 x 512 x 336 CT, with 5 and
with 60 classes, for each way the class scores go back onto the input grid (``--inverse``; issue 26).

Data: ``example_ct.nii.gz`` from ``../shared/data`` resampled (linear, SimpleITK) to 512 x 512 x 336 voxels over
the same extent (0.71 x 0.59 x 1.0 mm), written once as ``ct512.nii`` in ``--work``. Models: tiny SwinUNETRs
fine-tuned for one step at 6 mm (ROI 64) on the first 5 and the first 60 organs of
``example_seg_fast_force_split.nii.gz``: their quality is irrelevant here, their class count is what matters.

Each case runs in a fresh child process (``predict`` through the CLI, the bundle through
``python -m monai.bundle run``) started by a small Python process that reads its ``ru_maxrss`` (`MEASURER`).
A bundle with ``--inverse probabilities`` whose estimated need (K+1 input-grid channels plus 3 GB) exceeds
``--max-gb`` is not run: its estimate is printed instead. The labels of ``predict`` and of the bundle with the same
``--inverse`` are compared voxel by voxel.

Also printed: what the choice costs at the borders, for an ideal model: the reference's one-hot classes of
``example_ct`` (60 organs) resampled to the model's spacing and brought back both ways, mean Dice against the
reference.

Run (about 10 minutes on 2 CPU cores)::

    python benchmarks/predict_memory.py

It writes ``--json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = (512, 512, 336)  # x, y, z
CLASS_COUNTS = (5, 60)
MODES = ("probabilities", "labels")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with the shared CT")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "predict_memory"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "predict_memory.json"))
    p.add_argument(
        "--max-gb", type=float, default=None, help="skip cases estimated above this (default: 70%% of free memory)"
    )
    return p.parse_args(argv)


def make_ct(data: Path, path: Path) -> None:
    """``example_ct`` resampled to `SHAPE` over the same extent (the first and last voxel centres kept)."""
    import SimpleITK as sitk

    if path.exists():
        return
    src = sitk.ReadImage(str(data / "example_ct.nii.gz"))
    spacing = np.array(src.GetSpacing()) * np.array(src.GetSize()) / np.array(SHAPE)
    direction = np.array(src.GetDirection()).reshape(3, 3)
    origin = np.array(src.GetOrigin()) + direction @ ((spacing - np.array(src.GetSpacing())) / 2)
    out = sitk.Resample(src, SHAPE, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing.tolist(),
                        src.GetDirection(), -1024, sitk.sitkInt16)  # fmt: skip
    sitk.WriteImage(out, str(path))  # uncompressed: the cases read it many times


def make_run(data: Path, out: Path, classes: int) -> None:
    """A tiny SwinUNETR fine-tuned for one step on the first ``classes`` organs of the shared label map."""
    from napari_dagman.core.config import FinetuneConfig
    from napari_dagman.core.io import read_volume
    from napari_dagman.core.segmentation import run_finetuning
    from napari_dagman.core.training import consume

    if (out / "best.safetensors").exists():
        return
    seg = data / "example_seg_fast_force_split.nii.gz"
    organs = [int(i) for i in np.unique(read_volume(seg).array) if i][:classes]
    config = FinetuneConfig(
        images=[str(data / "example_ct.nii.gz")], segmentations=[str(seg)], out=str(out), organs=organs,
        preset="tiny", roi=64, spacing=6.0, steps=1, batch_size=1, val_split="none", device="cpu", seed=0,
    )  # fmt: skip
    consume(run_finetuning(config))


#: Runs its arguments as a command and prints the command's peak resident memory (kilobytes): measured from this
#: small process, because Linux's ru_maxrss of a child counts the memory of the process it was spawned from
#: (the address space it had until exec), and this script's own grows with the label maps it compares.
MEASURER = """import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
if done.returncode:
    sys.exit(done.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def measure(command: list[str]) -> tuple[float, float]:
    """Peak resident memory (bytes) and seconds of ``command`` in a fresh child process."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURER, *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1]) * 1024.0, time.perf_counter() - started  # Linux: kilobytes


def estimate_bundle_probabilities(classes: int) -> float:
    """Bytes a bundle's all-at-once ``Invertd`` of K+1 probabilities needs: the K+1 input-grid channels on top of
    3 GB (the labels bundle's peak: sampling grid, image, libraries). 5 organs: 5.1 GB estimated, 4.5 measured."""
    return (classes + 1) * float(np.prod(SHAPE)) * 4 + 3 * 2**30


def agreement(a: Path, b: Path) -> float:
    """Fraction of voxels on which two label maps agree."""
    from napari_dagman.core.io import read_volume

    x, y = read_volume(a).array, read_volume(b).array
    return float(np.mean(x == y))


def ideal_model_dice(data: Path, spacing: float) -> dict[str, float]:
    """Mean Dice against the reference of its own one-hot classes resampled to ``spacing`` and brought back by
    each inverse: what the inverse alone costs at the borders (60 organs of example_ct, 3 mm)."""
    import torch
    from monai.data import MetaTensor

    from napari_dagman.core.io import read_volume
    from napari_dagman.core.segmentation import pipeline

    ct = read_volume(data / "example_ct.nii.gz")
    ref = read_volume(data / "example_seg_fast_force_split.nii.gz").array
    ids = [int(i) for i in np.unique(ref) if i]
    lut = np.zeros(int(ref.max()) + 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    classes = lut[ref]
    # no intensity window: the one-hot scores go to the model's grid as an image would (Orientationd, Spacingd)
    data_dict, preprocessing = pipeline.to_model_space(ct, spacing, 3, (0.0, 1.0))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(classes), len(ids) + 1).permute(3, 0, 1, 2).float()
    affine = torch.from_numpy(pipeline.volume_affine(ct))
    probs = preprocessing({"image": MetaTensor(onehot, affine=affine)})["image"].as_tensor()
    logits = torch.log(probs.clamp_min(1e-6))
    result = {}
    for inverse in MODES:
        out = pipeline.classes_on_input_grid(ct, data_dict["image"], logits, inverse)
        dice = [2 * np.sum((out == k) & (classes == k)) / (np.sum(out == k) + np.sum(classes == k))
                for k in range(1, len(ids) + 1)]  # fmt: skip
        result[inverse] = float(np.mean(dice))
    return result


def run_cases(work: Path, ct: Path, max_bytes: float) -> list[dict]:
    """Every (tool, classes, inverse) case, measured; the bundle's probabilities skipped above ``max_bytes``."""
    from napari_dagman.core.export import export_bundle

    rows = []
    for classes in CLASS_COUNTS:
        run = work / f"run{classes}"
        for inverse in MODES:
            bundle = work / f"bundle{classes}_{inverse}"
            if not (bundle / "configs" / "inference.json").exists():
                export_bundle(run, bundle, inverse=inverse)
            outputs = {"predict": work / f"predict{classes}_{inverse}.nii.gz",
                       "bundle": work / f"out{classes}_{inverse}" / "ct512_seg.nii.gz"}  # fmt: skip
            commands = {
                "predict": [sys.executable, "-m", "napari_dagman.cli", "predict", str(ct), "--checkpoint", str(run),
                            "--out", str(outputs["predict"]), "--inverse", inverse, "--quiet"],
                "bundle": [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle), "--image",
                           str(ct), "--output_dir", str(outputs["bundle"].parent)],
            }  # fmt: skip
            for tool, command in commands.items():
                row = {"tool": tool, "classes": classes, "inverse": inverse}
                estimate = estimate_bundle_probabilities(classes)
                if tool == "bundle" and inverse == "probabilities" and estimate > max_bytes:
                    row.update(skipped=True, estimated_gb=round(estimate / 2**30, 1))
                else:
                    outputs[tool].unlink(missing_ok=True)
                    peak, seconds = measure(command)
                    row.update(peak_gb=round(peak / 2**30, 2), seconds=round(seconds, 1))
                rows.append(row)
                print(row, flush=True)
            if all(p.exists() for p in outputs.values()) and rows[-1].get("peak_gb"):
                rows[-1]["agrees_with_predict"] = round(agreement(outputs["predict"], outputs["bundle"]), 6)
    return rows


def report(rows: list[dict], dice: dict[float, dict[str, float]]) -> None:
    """The table, the 60/5 ratios and the ideal model's Dice."""
    print(f"\n{'tool':8s} {'inverse':14s} {'classes':>7s} {'peak RSS':>10s} {'seconds':>8s}  bundle = predict")
    for r in rows:
        peak = f"{r['peak_gb']:.2f} GB" if "peak_gb" in r else f"~{r['estimated_gb']:.0f} GB est."
        agree = f"{100 * r['agrees_with_predict']:.4f} %" if "agrees_with_predict" in r else ""
        print(f"{r['tool']:8s} {r['inverse']:14s} {r['classes']:7d} {peak:>10s} {r.get('seconds', 0):8.1f}  {agree}")
    for tool in ("predict", "bundle"):
        for inverse in MODES:
            pair = {r["classes"]: r for r in rows if r["tool"] == tool and r["inverse"] == inverse}
            if all("peak_gb" in pair[c] for c in CLASS_COUNTS):
                ratio = pair[60]["peak_gb"] / pair[5]["peak_gb"]
                print(f"{tool} --inverse {inverse}: peak RSS 60 / 5 classes = {ratio:.2f}")
    for spacing, row in dice.items():
        words = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
        print(f"ideal model at {spacing:g} mm, back onto 3 mm: mean Dice of 60 organs: {words}")


def main(argv: list[str] | None = None) -> int:
    import psutil

    args = parse_args(argv)
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ct = work / "ct512.nii"
    make_ct(data, ct)
    for classes in CLASS_COUNTS:
        make_run(data, work / f"run{classes}", classes)
    max_bytes = args.max_gb * 2**30 if args.max_gb else 0.7 * psutil.virtual_memory().available
    rows = run_cases(work, ct, max_bytes)
    dice = {s: ideal_model_dice(data, s) for s in (4.5, 6.0)}
    report(rows, dice)
    result = {
        "ct": {"shape_xyz": list(SHAPE), "source": "example_ct.nii.gz resampled"},
        "cpus": os.cpu_count(),
        "rows": rows,
        "ideal_model_mean_dice": {str(s): d for s, d in dice.items()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
