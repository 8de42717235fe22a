"""Speed and memory of a pretraining step per method: the chosen settings against the fp32 eager path, the
hardware and MONAI's SwinUNETR SSL step, all measured in the same run.

Every measurement runs in a fresh process (so that each row's peak memory is its own). For every registered
method (same encoder preset, ROI and batch) it measures

* the **fp32 eager** step: fp32, no compilation, MONAI's own Swin forward (the reference path);
* the step with the **chosen settings**: the run defaults (``--precision auto``: bf16 autocast where the device
  computes bf16 natively; the fast Swin stages; compiled with ``--compile on``; ``--compile both`` measures
  compiled and eager rows);

and for MONAI's SwinUNETR self-supervised step (rotation + contrastive + inpainting heads on the same MONAI
SwinTransformer, built from MONAI parts as in Project-MONAI/research-contributions SwinUNETR/Pretrain) the same
two settings (precision and compilation; MONAI's own forward). Per row: seconds per optimiser step (median
after warm-up steps), model FLOPs of one step (forward + backward, ``torch.utils.flop_counter``, counted on the
fp32 eager step), achieved FLOP/s as a fraction of the fp32 and bf16 dense-matmul peaks measured in this run,
the speed-up over the fp32 eager step, the ratio to the SwinUNETR SSL step at the same settings, the time of
the first step less a later one (compilation), and peak memory (CPU: peak RSS of the process; CUDA: peak
allocated). ``--levers`` adds a table of one method with each lever alone; ``--memory`` measures the peak RSS of
real pretraining runs (`run_pretraining`, the phantom CT, a few steps) for the small and base presets.

    python benchmarks/pretrain_step.py --json benchmarks/results/pretrain_step_cpu_tiny64.json
    python benchmarks/pretrain_step.py --preset base --roi 96 --levers --memory --json out.json
    bash benchmarks/pretrain_step_cuda.sh        # CUDA: base/96^3, batch 2, bf16, compiled and not
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULT = "RESULT "


# --- the hardware ------------------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    """Dense matmul FLOP/s: the best of ``repeats`` n x n x n products (n = 2048 on CPU, 8192 on a GPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch; CPU: peak resident set of this process (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# --- the MONAI reference ---------------------------------------------------------------------------------------------
class SwinUNETRSSL(nn.Module):
    """The SwinUNETR self-supervised heads (Tang et al., CVPR 2022) on a MONAI SwinTransformer.

    Rotation classification (4 classes) and a contrastive projection from the pooled deepest features, and a
    transposed-convolution decoder that inpaints the input from the deepest stage.
    """

    def __init__(self, embed_dim: int, depths, num_heads, window: int, dims: int = 3) -> None:
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.swin = SwinTransformer(
            in_chans=1,
            embed_dim=embed_dim,
            window_size=(window,) * dims,
            patch_size=(2,) * dims,
            depths=depths,
            num_heads=num_heads,
            spatial_dims=dims,
        )
        width = embed_dim * 16
        self.rotation = nn.Linear(width, 4)
        self.contrastive = nn.Linear(width, 512)
        conv = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        chans = [width, width // 2, width // 4, width // 8, width // 16, width // 16]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [conv(c_in, c_out, kernel_size=2, stride=2), nn.GELU()]
        layers.append((nn.Conv3d if dims == 3 else nn.Conv2d)(chans[-1], 1, kernel_size=1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):
        deep = self.swin(x.contiguous())[4]
        pooled = deep.flatten(2).mean(-1)
        return self.rotation(pooled), self.contrastive(pooled), self.decoder(deep)


def ssl_step_fn(spec: dict[str, Any], device: torch.device):
    """One SwinUNETR SSL step on two augmented views (rotations, cut-out inpainting, NT-Xent) at ``spec``'s
    precision and compilation."""
    from monai.losses import ContrastiveLoss

    from napari_dagman.core.models.architecture import architecture_for
    from napari_dagman.core.training.precision import autocast_for

    arch = architecture_for(spec["preset"], 3)
    torch.manual_seed(0)
    model = SwinUNETRSSL(arch.embed_dim, arch.depths, arch.num_heads, arch.window_size).to(device)
    if spec["compile"]:
        model.compile()
    batch, roi = spec["batch"], spec["roi"]
    contrastive = ContrastiveLoss(temperature=0.5)
    ce, l1 = nn.CrossEntropyLoss(), nn.L1Loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.rand(batch, 1, roi, roi, roi, generator=g)
        rots = torch.randint(0, 4, (2 * batch,), generator=g)
        views = torch.cat([x, x]).clone()
        views = torch.stack([torch.rot90(v, int(k), dims=(2, 3)) for v, k in zip(views, rots, strict=True)])
        target = views.clone()
        s = roi // 4  # inpainting: drop one random cube per view (patch_rand_drop, simplified)
        for v in views:
            z, y, xx = (int(i) for i in torch.randint(0, roi - s, (3,), generator=g))
            v[:, z : z + s, y : y + s, xx : xx + s] = torch.rand(1, s, s, s, generator=g)
        views, target, rots = views.to(device), target.to(device), rots.to(device)
        with autocast_for(device, spec["precision"]):
            rot_logits, proj, recon = model(views)
            loss = ce(rot_logits, rots) + contrastive(proj[:batch].float(), proj[batch:].float())
            loss = loss + l1(recon.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# --- our methods ---------------------------------------------------------------------------------------------------
def method_step_fn(spec: dict[str, Any], device: torch.device):
    """One optimiser step of the real pretraining task (views drawn from a synthetic CT), as the loop runs it:
    the loop's `optimizer_step` in ``spec``'s precision, networks compiled as the loop compiles them."""
    import numpy as np

    from napari_dagman.core.checkpoint import RunFolder
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.methods.registry import get_method
    from napari_dagman.core.training import DistContext, PretrainTask, optimizer_step
    from napari_dagman.core.training.loop import make_optimizer
    from napari_dagman.core.training.precision import compile_modules
    from napari_dagman.core.volume import Volume

    roi = spec["roi"]
    values = {
        "method": spec["method"],
        "preset": spec["preset"],
        "roi": roi,
        "batch_size": spec["batch"],
        "steps": 100,
        "fused_attention": spec["fused"],
        "spacing": None,
        "probe_every": 0,
    }
    # attention-guided masks from the first step: the step timed is the usual one
    if "mask_warmup_steps" in get_method(spec["method"]).options_class().field_names():
        values["mask_warmup_steps"] = 0
    config = PretrainConfig.from_dict(values)
    # a body-like volume larger than the crop region (views are drawn from it as in training)
    rng = np.random.default_rng(0)
    side = int(roi * 2.5)  # MiM reads a region twice the ROI
    ct = Volume(rng.uniform(-150, 200, (side, side, side)).astype(np.float32), (2.0, 2.0, 2.0))
    task = PretrainTask(config, [ct])
    task.prepare(RunFolder("unused"), resume=False)
    task.build(device, DistContext())
    if spec["compile"]:
        compile_modules([*task.trained_modules().values(), *task.ema_modules().values()])
    optimizer = make_optimizer(list(task.trained_modules().values()), task.config, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    counter = {"step": 0}

    def step() -> None:
        k = counter["step"]
        optimizer_step(
            task,
            optimizer,
            params,
            k,
            torch.Generator().manual_seed(k),
            device,
            grad_clip=task.config.grad_clip,
            precision=spec["precision"],
        )
        task.after_optimizer_step(k, device)
        counter["step"] += 1

    return step


def measure(step, device: torch.device, warmup: int, repeats: int, count_flops: bool) -> dict[str, Any]:
    """Median seconds per step after ``warmup`` steps, the first step's extra time, and (optionally) FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    out = {"seconds": seconds, "first_step_extra_seconds": max(0.0, first - seconds), "times": times}
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        out["flops"] = float(counter.get_total_flops())
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: a method or the SSL reference at one setting."""
    from napari_dagman.core.devices import resolve_device

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec.get("keep_freed"):  # the opt-in allocator setting (NAPARI_DAGMAN_ALLOCATOR=keep-freed)
        from napari_dagman.core.training.precision import keep_freed_memory

        os.environ["NAPARI_DAGMAN_ALLOCATOR"] = "keep-freed"
        keep_freed_memory(device)
    step_fn = ssl_step_fn if spec["method"] == "swinunetr-ssl" else method_step_fn
    step = step_fn(spec, device)
    out = measure(step, device, spec["warmup"], spec["repeats"], spec["count_flops"])
    out["peak_memory_mb"] = peak_memory_mb(device)
    return out


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of a real pretraining run (`run_pretraining` on the phantom CT, defaults but ``spec``'s)."""
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.phantom import make_phantom
    from napari_dagman.core.training import consume, run_pretraining

    device = resolve_device(spec["device"])
    if spec.get("keep_freed"):
        os.environ["NAPARI_DAGMAN_ALLOCATOR"] = "keep-freed"  # `run_training` applies it
    ct, _ = make_phantom()
    with tempfile.TemporaryDirectory() as tmp:
        config = PretrainConfig.from_dict(
            {
                "preset": spec["preset"],
                "roi": spec["roi"],
                "batch_size": spec["batch"],
                "steps": spec["steps"],
                "precision": spec["precision"],
                "device": spec["device"],
                "out": str(Path(tmp) / "run"),
            }
        )
        t0 = time.perf_counter()
        finished = consume(run_pretraining(config, [ct]))
        info = json.loads((Path(finished.run_dir) / "run.json").read_text())
    return {
        "peak_memory_mb": peak_memory_mb(device),
        "seconds": time.perf_counter() - t0,
        "precision": info.get("precision"),
        "compiled": info.get("compiled"),
        "allocator": info.get("allocator"),
    }


def in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `worker` (or `memory_worker`) for ``spec`` in a new interpreter and return its result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


# --- the tables --------------------------------------------------------------------------------------------------
def settings_rows(args: argparse.Namespace, precision: str) -> list[dict[str, Any]]:
    """The settings measured besides fp32 eager: the chosen precision, eager and/or compiled."""
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return [{"precision": precision, "compile": c, "fused": True, "keep_freed": False} for c in compiled]


def base_spec(args: argparse.Namespace) -> dict[str, Any]:
    """What every measurement of this run shares (device, sizes, timing repeats, threads)."""
    return {
        "device": args.device,
        "preset": args.preset,
        "roi": args.roi,
        "batch": args.batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
    }


def run_rows(args: argparse.Namespace, methods: list[str], precision: str, say) -> list[dict[str, Any]]:
    """Every method and the SSL reference at fp32 eager and at the chosen settings."""
    base = base_spec(args)
    eager = {"precision": "fp32", "compile": False, "fused": False, "keep_freed": False}
    rows = []
    for name in [*methods, "swinunetr-ssl"]:
        ref = in_fresh_process({**base, **eager, "method": name, "count_flops": True})
        say(f"  {name:16s} fp32 eager {ref['seconds']:8.3f} s/step")
        for setting in settings_rows(args, precision):
            got = in_fresh_process({**base, **setting, "method": name, "count_flops": False})
            rows.append(
                {
                    "method": name,
                    "precision": setting["precision"],
                    "compiled": setting["compile"],
                    "fast_stages": setting["fused"] and name != "swinunetr-ssl",
                    "seconds": got["seconds"],
                    "seconds_fp32_eager": ref["seconds"],
                    "speedup_vs_fp32_eager": ref["seconds"] / got["seconds"],
                    "flops": ref["flops"],
                    "compile_seconds": got["first_step_extra_seconds"] if setting["compile"] else 0.0,
                    "peak_rss_mb" if args.device == "cpu" else "peak_memory_mb": got["peak_memory_mb"],
                    "peak_memory_fp32_eager_mb": ref["peak_memory_mb"],
                }
            )
            say(f"  {name:16s} {setting['precision']} {'compiled' if setting['compile'] else 'eager':8s} "
                f"{got['seconds']:8.3f} s/step")
    return rows


def add_ratios(rows: list[dict[str, Any]], peak: float, peak_bf16: float) -> None:
    """Fractions of peak and the ratios to the SSL step at the same settings, in place."""
    reference = {(r["precision"], r["compiled"]): r for r in rows if r["method"] == "swinunetr-ssl"}
    for row in rows:
        rate = row["flops"] / row["seconds"]
        ssl = reference[(row["precision"], row["compiled"])]
        ssl_fraction = ssl["flops"] / ssl["seconds"] / peak
        row.update(
            flops_per_second=rate,
            fraction_of_peak_fp32=rate / peak,
            fraction_of_peak_bf16=rate / peak_bf16,
            ratio_to_swinunetr_ssl=row["seconds"] / ssl["seconds"],
            efficiency_vs_swinunetr_ssl=(rate / peak) / ssl_fraction,
            efficiency_vs_swinunetr_ssl_fp32_eager=(rate / peak)
            / (ssl["flops"] / ssl["seconds_fp32_eager"] / peak),
        )


def print_rows(rows: list[dict[str, Any]]) -> None:
    memory_key = "peak_rss_mb" if "peak_rss_mb" in rows[0] else "peak_memory_mb"
    print(
        f"\n{'method':16s} {'setting':14s} {'s/step':>8s} {'fp32 eager':>10s} {'speed-up':>8s} {'GFLOP':>8s} "
        f"{'of fp32 pk':>10s} {'of bf16 pk':>10s} {'vs SSL':>7s} {'eff/SSL':>7s} {'compile s':>9s} {'peak MB':>8s}"
    )
    for r in rows:
        setting = f"{r['precision']} {'compiled' if r['compiled'] else 'eager'}"
        print(
            f"{r['method']:16s} {setting:14s} {r['seconds']:8.3f} {r['seconds_fp32_eager']:10.3f} "
            f"{r['speedup_vs_fp32_eager']:7.2f}x {r['flops'] / 1e9:8.2f} {100 * r['fraction_of_peak_fp32']:9.1f}% "
            f"{100 * r['fraction_of_peak_bf16']:9.1f}% {r['ratio_to_swinunetr_ssl']:7.2f} "
            f"{r['efficiency_vs_swinunetr_ssl']:7.2f} {r['compile_seconds']:9.1f} {r[memory_key]:8.0f}"
        )


def lever_rows(args: argparse.Namespace, method: str, bf16: str, say) -> list[dict[str, Any]]:
    """One method with each lever on its own and together (fresh process each)."""
    base = {
        **base_spec(args),
        "method": method,
        "count_flops": False,
    }
    off = {"compile": False, "keep_freed": False}
    levers = [
        ("fp32, MONAI stages (reference)", {**off, "precision": "fp32", "fused": False}),
        ("fp32, fast stages", {**off, "precision": "fp32", "fused": True}),
        (f"{bf16}, MONAI stages", {**off, "precision": bf16, "fused": False}),
        ("fp32, MONAI stages, freed memory kept", {**off, "precision": "fp32", "fused": False, "keep_freed": True}),
        (f"{bf16}, fast stages", {**off, "precision": bf16, "fused": True}),
        (f"{bf16}, fast stages, freed memory kept", {**off, "precision": bf16, "fused": True, "keep_freed": True}),
    ]
    if args.compile != "off":
        levers += [
            ("fp32, fast stages, compiled", {**off, "precision": "fp32", "compile": True, "fused": True}),
            (f"{bf16}, fast stages, compiled", {**off, "precision": bf16, "compile": True, "fused": True}),
        ]
    rows = []
    for label, setting in levers:
        got = in_fresh_process({**base, **setting})
        rows.append({"lever": label, **setting, **{k: got[k] for k in ("seconds", "first_step_extra_seconds")}})
        say(f"  lever {label:40s} {got['seconds']:8.3f} s/step")
    for row in rows:
        row["speedup_vs_reference"] = rows[0]["seconds"] / row["seconds"]
    return rows


def memory_rows(args: argparse.Namespace, precision: str, say) -> list[dict[str, Any]]:
    """Peak memory of real pretraining runs: small (the default preset) and base, ROI 96, batch 1."""
    rows = []
    settings = [(preset, prec, False) for preset in ("small", "base") for prec in dict.fromkeys([precision, "fp32"])]
    if args.device == "cpu":  # what the opt-in allocator setting costs in memory
        settings.insert(1, ("small", precision, True))
    for preset, prec, keep_freed in settings:
        spec = {"memory": True, "device": args.device, "preset": preset, "roi": 96, "batch": 1}
        got = in_fresh_process({**spec, "precision": prec, "steps": args.memory_steps, "keep_freed": keep_freed})
        rows.append({"preset": preset, "roi": 96, "batch": 1, **got})
        say(f"  memory {preset:5s} {prec}{', keep-freed' if keep_freed else ''}: peak {got['peak_memory_mb']:.0f} MB")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="volumes per step (each gives two views)")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing (the first includes compilation)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=None, help="registered methods to measure (default: all)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="the chosen precision")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"), help="compiled rows")
    p.add_argument("--levers", action="store_true", help="also time DAGMaN with each lever alone")
    p.add_argument("--memory", action="store_true", help="also measure real runs' peak memory (small, base)")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # one measurement in this fresh process
        spec = json.loads(args.worker)
        result = memory_worker(spec) if spec.get("memory") else worker(spec)
        print(RESULT + json.dumps(result), flush=True)
        return 0
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.methods.registry import REGISTRY
    from napari_dagman.core.training.precision import resolve_precision

    def say(line: str) -> None:
        print(f"{line}   (load {os.getloadavg()[0]:.1f})", flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    peak, peak_bf16 = matmul_peak(device, torch.float32), matmul_peak(device, torch.bfloat16)
    load_before = os.getloadavg()[0]
    say(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; preset {args.preset}, "
        f"ROI {args.roi}^3, batch {args.batch} (x2 views); chosen: {precision}, compile {args.compile}"
    )
    say(f"dense matmul peak: {peak / 1e9:.1f} GFLOP/s fp32, {peak_bf16 / 1e9:.1f} GFLOP/s bf16")
    methods = args.methods or list(REGISTRY)
    rows = run_rows(args, methods, precision, say)
    add_ratios(rows, peak, peak_bf16)
    print_rows(rows)
    levers = lever_rows(args, "dagman", "bf16" if precision == "bf16" else "fp32", say) if args.levers else []
    memory = memory_rows(args, precision, say) if args.memory else []
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "preset": args.preset,
                    "roi": args.roi,
                    "batch": args.batch,
                    "chosen": {
                        "precision": precision,
                        "compile": args.compile,
                        "fast_stages": True,
                        "allocator": "system",
                    },
                    "matmul_peak_fp32": peak,
                    "matmul_peak_bf16": peak_bf16,
                    "load_average": {"before": load_before, "after": os.getloadavg()[0]},
                    "rows": rows,
                    "levers": levers,
                    "memory": memory,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
