"""Speed of one pretraining step per method, against the hardware and against MONAI's SwinUNETR SSL step.

For every registered method (same encoder preset, ROI and batch) and for a SwinUNETR-style self-supervised
step (rotation + contrastive + inpainting heads on the same MONAI SwinTransformer, built here from MONAI
parts as in Project-MONAI/research-contributions SwinUNETR/Pretrain), it prints

* seconds per optimiser step (median of the timed steps, after warm-up steps),
* model FLOPs of one step (forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``) and
  the achieved FLOP/s as a fraction of a dense float32 matmul peak measured in the same run,
* the ratio of each method's step time to the SwinUNETR SSL step.

    python benchmarks/pretrain_step.py                       # CPU: tiny preset, ROI 64, batch 1
    python benchmarks/pretrain_step.py --device cuda --preset base --roi 96 --batch 2 --amp
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Dense matmul FLOP/s: the best of ``repeats`` n x n x n products."""
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


def ssl_step_fn(model: SwinUNETRSSL, batch: int, roi: int, device: torch.device):
    """One SwinUNETR SSL step on two augmented views: rotations, cut-out inpainting, NT-Xent."""
    from monai.losses import ContrastiveLoss

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
        rot_logits, proj, recon = model(views)
        loss = ce(rot_logits, rots) + contrastive(proj[:batch], proj[batch:]) + l1(recon, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def method_step_fn(
    name: str, preset: str, roi: int, batch: int, device: torch.device, amp: bool, fused: bool
):
    """One optimiser step of the real pretraining task (views drawn from a synthetic CT), as the loop runs it."""
    import numpy as np

    from napari_dagman.core.checkpoint import RunFolder
    from napari_dagman.core.config import PretrainConfig
    from napari_dagman.core.training import DistContext, PretrainTask, optimizer_step, parameter_groups
    from napari_dagman.core.volume import Volume

    config = PretrainConfig.from_dict(
        {
            "method": name,
            "preset": preset,
            "roi": roi,
            "batch_size": batch,
            "steps": 100,
            "mask_warmup_steps": 0,
            "fused_attention": fused,
            "spacing": None,
            "probe_every": 0,
        }
    )
    # a body-like volume larger than the crop region (views are drawn from it as in training)
    rng = np.random.default_rng(0)
    side = int(roi * 1.5)
    ct = Volume(rng.uniform(-150, 200, (side, side, side)).astype(np.float32), (2.0, 2.0, 2.0))
    task = PretrainTask(config, [ct])
    task.prepare(RunFolder("unused"), resume=False)
    task.build(device, DistContext())
    optimizer = torch.optim.AdamW(
        parameter_groups(list(task.trained_modules().values()), task.config.weight_decay), lr=task.config.lr
    )
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
            use_amp=amp and device.type == "cuda",
        )
        task.after_optimizer_step(k, device)
        counter["step"] += 1

    return step, task.arch


def measure(step, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds per step, FLOPs of one step)."""
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return statistics.median(times), float(counter.get_total_flops())


def main() -> None:
    from napari_dagman.core.devices import resolve_device
    from napari_dagman.core.methods.registry import REGISTRY

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="volumes per step (each gives two views)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument(
        "--no-fused", action="store_true", help="no scaled_dot_product_attention in no-grad passes"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    peak = matmul_peak(device, torch.float32)
    peak_bf16 = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; preset {args.preset}, "
        f"ROI {args.roi}^3, batch {args.batch} (x2 views), amp {args.amp and device.type == 'cuda'}"
    )
    print(
        f"dense matmul peak: {peak / 1e9:.1f} GFLOP/s fp32"
        + (f", {peak_bf16 / 1e12:.1f} TFLOP/s bf16" if peak_bf16 else "")
    )

    rows = []
    arch = None
    for name in REGISTRY:
        step, arch = method_step_fn(
            name, args.preset, args.roi, args.batch, device, args.amp, not args.no_fused
        )
        seconds, flops = measure(step, device, args.warmup, args.repeats)
        rows.append({"method": name, "seconds": seconds, "flops": flops})
    ssl = SwinUNETRSSL(arch.embed_dim, arch.depths, arch.num_heads, arch.window_size).to(device)
    seconds, flops = measure(
        ssl_step_fn(ssl, args.batch, args.roi, device), device, args.warmup, args.repeats
    )
    rows.append({"method": "swinunetr-ssl (MONAI)", "seconds": seconds, "flops": flops})
    reference = rows[-1]["seconds"]
    ref_peak = peak_bf16 if (args.amp and peak_bf16) else peak

    print(
        f"\n{'method':24s} {'s/step':>8s} {'GFLOP/step':>11s} {'GFLOP/s':>9s} {'of peak':>8s} {'vs SSL':>7s}"
    )
    for row in rows:
        rate = row["flops"] / row["seconds"]
        row.update(
            flops_per_second=rate,
            fraction_of_peak=rate / ref_peak,
            ratio_to_swinunetr_ssl=row["seconds"] / reference,
        )
        print(
            f"{row['method']:24s} {row['seconds']:8.3f} {row['flops'] / 1e9:11.2f} {rate / 1e9:9.2f} "
            f"{100 * row['fraction_of_peak']:7.1f}% {row['ratio_to_swinunetr_ssl']:7.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "preset": args.preset,
                    "roi": args.roi,
                    "batch": args.batch,
                    "matmul_peak": peak,
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
