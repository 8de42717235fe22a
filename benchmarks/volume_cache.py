"""Pretraining from a folder of clinical-size CTs through the prepared-volume cache (issue 26's data-path targets).

Data: ``example_ct.nii.gz`` from ``../shared/data`` resampled (linear, SimpleITK) to 512 x 512 x 300 voxels over
its own extent, written once as uncompressed NIfTI in ``--work``, then copied ``--volumes`` times with a few voxels
changed per copy, so every file has its own content (the cache is keyed by content; identical files would share
one entry). 100 copies take 16 GB of disk.

Each measurement runs in a fresh child process that reports its own peak resident memory (``ru_maxrss``):

1. **cold**: the cache is built from every file (`prepare_sources`): seconds per volume, peak RSS;
2. **warm, N volumes**: pretraining (tiny preset, ROI 64, 2 mm, batch 2, ``--steps``) over all the files with the
   warm cache: seconds from the child's start to its first step, steps/s after the first ``--skip`` steps, peak
   RSS;
3. **warm, 1 volume**: the same run over one file, for the steps/s ratio (the loader is never the bottleneck when
   the ratio is near 1);
4. **no cache, N volumes**: what ``--no-cache`` gives (every file read and prepared in memory before the first
   step, all kept in RAM), for comparison.

Targets: peak RSS at most 2.5 GB with 100 volumes, first step within 15 s with a warm cache, steps/s with 100
volumes at least 0.9 x that with one. Run (about 30 minutes on 2 CPU cores, mostly the cold build)::

    python benchmarks/volume_cache.py --volumes 100

It writes ``--json`` and prints a table. ``--keep`` keeps the copies and the cache for another run,
``--reuse-cache`` measures the warm runs again on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = (512, 512, 300)  # x, y, z
TRAIN = {"preset": "tiny", "roi": 64, "spacing": 2.0, "batch_size": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with the shared CT")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "volume_cache"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "volume_cache.json"))
    p.add_argument("--volumes", type=int, default=100)
    p.add_argument("--steps", type=int, default=40, help="training steps per warm run")
    p.add_argument("--skip", type=int, default=5, help="steps left out of steps/s (start-up)")
    p.add_argument("--keep", action="store_true", help="keep the copies and the cache")
    p.add_argument(
        "--reuse-cache", action="store_true", help="keep a cache built by an earlier run (its cold figures from --json)"
    )
    p.add_argument("--child", choices=("build", "train"), help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", default=[], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_cohort(data: Path, work: Path, n: int) -> list[Path]:
    """``n`` distinct 512 x 512 x 300 NIfTI files (see the module's text)."""
    import SimpleITK as sitk

    source = work / "ct512.nii"
    if not source.exists():
        image = sitk.ReadImage(str(data / "example_ct.nii.gz"))
        size = image.GetSize()
        spacing = [sp * (n_in - 1) / (n_out - 1) for sp, n_in, n_out in zip(image.GetSpacing(), size, SHAPE, strict=True)]
        resampled = sitk.Resample(
            image, SHAPE, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection(), -1024,
            sitk.sitkInt16,
        )
        work.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(resampled, str(source))
    raw = source.read_bytes()
    files = []
    for i in range(n):
        path = work / "cohort" / f"case_{i:03d}.nii"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            data_bytes = bytearray(raw)
            data_bytes[-4096:-4096 + 8] = i.to_bytes(8, "little")  # a few voxels of the last slice (air)
            path.write_bytes(bytes(data_bytes))
        files.append(path)
    return files


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kilobytes


def child_build(files: list[str]) -> dict:
    from napari_dagman.core.training.inputs import PrepareSettings, prepare_sources
    from napari_dagman.core.volume_cache import VolumeCache

    settings = PrepareSettings(dims=3, spacing=TRAIN["spacing"], hu_range=(-175.0, 250.0), roi=TRAIN["roi"])
    start = time.perf_counter()
    gen = prepare_sources(files, settings, cache=VolumeCache())
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            found = stop.value
            break
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_volume_s": seconds / len(files), "built": found.built, "peak_rss_gb": peak_rss_gb()}


def child_train(files: list[str], steps: int, skip: int, started: float, out: Path) -> dict:
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.events import StepEvent
    from napari_dagman.core.training import run_pretraining

    config = PretrainConfig(
        images=files, out=str(out), steps=steps, preview_every=0, probe_every=0, checkpoint_every=10_000,
        save_every=10_000, cache=not os.environ.get("NAPARI_DAGMAN_BENCH_NO_CACHE"), **TRAIN,
    )
    times = []
    for event in run_pretraining(config):
        if isinstance(event, StepEvent):
            times.append(time.time())
    rate = (len(times) - 1 - skip) / (times[-1] - times[skip])
    return {"first_step_s": times[0] - started, "steps_per_s": rate, "peak_rss_gb": peak_rss_gb()}


def spawn(args: argparse.Namespace, mode: str, files: list[Path], env: dict) -> dict:
    command = [
        sys.executable, __file__, "--child", mode, "--work", args.work, "--steps", str(args.steps),
        "--skip", str(args.skip), "--started", repr(time.time()), "--files", *map(str, files),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    if args.child:
        if args.child == "build":
            result = child_build(args.files)
        else:
            out = work / "runs" / f"run{len(args.files)}"
            shutil.rmtree(out, ignore_errors=True)
            result = child_train(args.files, args.steps, args.skip, args.started, out)
        print(json.dumps(result))
        return
    files = make_cohort(Path(args.data), work, args.volumes)
    cache = work / "cache"
    env = {**os.environ, "NAPARI_DAGMAN_VOLUME_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    if args.reuse_cache and cache.is_dir() and Path(args.json).is_file():
        cold = json.loads(Path(args.json).read_text())["cold_build"]
    else:
        shutil.rmtree(cache, ignore_errors=True)
        cold = spawn(args, "build", files, env)
    print(f"cold cache build: {cold['per_volume_s']:.2f} s per volume, peak RSS {cold['peak_rss_gb']:.2f} GB", flush=True)
    many = spawn(args, "train", files, env)
    one = spawn(args, "train", files[:1], env)
    # what --no-cache gives: every file read and prepared in memory before the first step, all kept in RAM
    uncached = spawn(args, "train", files, {**env, "NAPARI_DAGMAN_BENCH_NO_CACHE": "1"})
    ratio = many["steps_per_s"] / one["steps_per_s"]
    cache_gb = sum(p.stat().st_size for p in cache.glob("*.npy")) / 2**30
    result = {
        "volumes": len(files),
        "shape_xyz": list(SHAPE),
        "training": {**TRAIN, "steps": args.steps, "steps_skipped": args.skip},
        "cold_build": cold,
        "cache_gb": cache_gb,
        "warm": {f"{len(files)}_volumes": many, "1_volume": one},
        "no_cache": {f"{len(files)}_volumes": uncached},
        "steps_per_s_ratio": ratio,
        "targets": {
            "peak_rss_gb<=2.5": many["peak_rss_gb"] <= 2.5,
            "first_step_s<=15": many["first_step_s"] <= 15.0,
            "steps_ratio>=0.9": ratio >= 0.9,
        },
        "cpu": os.cpu_count(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':24}{'first step (s)':>16}{'steps/s':>10}{'peak RSS (GB)':>15}")
    rows = [(f"warm, {k}", v) for k, v in result["warm"].items()]
    rows += [(f"no cache, {k}", v) for k, v in result["no_cache"].items()]
    for name, row in rows:
        print(f"{name:24}{row['first_step_s']:16.1f}{row['steps_per_s']:10.3f}{row['peak_rss_gb']:15.2f}")
    print(f"steps/s ratio {ratio:.2f}; cache {cache_gb:.2f} GB on disk; targets {result['targets']}")
    if not args.keep:
        shutil.rmtree(work / "cohort", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
