"""The fast Swin stages and decoder layout against MONAI's own forward: same results (forward, input and
parameter gradients), on grids that need padding and shifted-window masks, layouts built once per shape."""

from __future__ import annotations

import types

import pytest
import torch
from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging, WindowAttention, compute_mask
from monai.networks.utils import pixelshuffle

from napari_dagman.core.models import window_attention as wa
from napari_dagman.core.models.heads import PixelShuffleDecoder, ReconstructionDecoder


def make_layer(dims: int, window: int, channels: int = 12, depth: int = 2) -> BasicLayer:
    torch.manual_seed(0)
    layer = BasicLayer(
        dim=channels,
        depth=depth,
        num_heads=3,
        window_size=(window,) * dims,
        drop_path=[0.0] * depth,
        qkv_bias=True,
        downsample=PatchMerging,
    )
    with torch.no_grad():  # a non-zero bias table, so that a lost bias cannot pass
        for module in layer.modules():
            if isinstance(module, WindowAttention):
                module.relative_position_bias_table.normal_(0.0, 1.0)
    return layer


def forward_and_grads(layer: BasicLayer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    out = layer(x)
    weights = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape)
    (out * weights).sum().backward()
    grads = [x.grad, *(p.grad.clone() for p in layer.parameters())]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize(
    ("dims", "grid", "window"),
    [
        (3, (8, 8, 8), 4),  # windows fit, shifted masks
        (3, (6, 10, 5), 4),  # padding on every side, then shifted: MONAI pads before it rolls
        (3, (4, 4, 4), 4),  # one window: no shift at all
        (2, (12, 9), 7),  # 2D, padding
    ],
)
def test_fast_stage_matches_monai_forward_and_gradients(dims, grid, window):
    layer = make_layer(dims, window)
    x = torch.randn(2, 12, *grid)
    reference, ref_grads = forward_and_grads(layer, x)
    layer.forward = types.MethodType(wa.swin_stage, layer)
    fast, fast_grads = forward_and_grads(layer, x)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert fast_grads[1:] and all(float(g.abs().sum()) > 0 for g in fast_grads)
    # the next stage reads the output without a copy: a channels-first view of a channels-last tensor
    assert fast.movedim(1, -1).is_contiguous()


def test_fused_kernel_without_gradients_matches_the_explicit_softmax():
    """Inference / EMA teacher (no gradients) uses the fused kernel; training the explicit softmax."""
    layer = make_layer(3, 4).eval()
    layer.forward = types.MethodType(wa.swin_stage, layer)
    x = torch.randn(2, 12, 8, 8, 8)
    with torch.no_grad():
        fused = layer(x)
    explicit = layer(x)  # parameters require grad: the explicit path
    torch.testing.assert_close(fused, explicit.detach(), atol=1e-5, rtol=1e-5)


def test_window_layout_is_built_once_per_shape_and_inverts():
    wa.window_layout.cache_clear()
    a = wa.window_layout((6, 10, 5), (4, 4, 4), (2, 2, 2), "cpu")
    assert wa.window_layout((6, 10, 5), (4, 4, 4), (2, 2, 2), "cpu") is a  # cached, not rebuilt
    assert wa.window_layout.cache_info().hits == 1
    torch.testing.assert_close(a.mask, compute_mask([8, 12, 8], (4, 4, 4), (2, 2, 2), torch.device("cpu")))
    assert a.mask_as(torch.bfloat16) is a.mask_as(torch.bfloat16)  # converted once
    tokens = torch.arange(2 * 300 * 3, dtype=torch.float32).view(2, 300, 3)
    windows = wa.to_windows(tokens, a)
    assert windows.shape == (2, 8 * 12 * 8, 3)
    assert bool((windows[:, a.pad_slots] == 0).all())  # padding slots are zero, as after MONAI's F.pad
    torch.testing.assert_close(wa.from_windows(windows, a), tokens)


@pytest.mark.parametrize("dims", [2, 3])
def test_pixel_shuffle_decoder_matches_monai_convolution_and_shuffle(dims):
    torch.manual_seed(0)
    decoder = PixelShuffleDecoder(16, 4, dims, out_channels=2)
    x = torch.randn(2, 16, *([3] * dims), requires_grad=True)
    reference = pixelshuffle(decoder.conv(x), dims, 4)
    fast = decoder(x)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    (g_ref,) = torch.autograd.grad(reference.square().sum(), decoder.conv.weight)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), decoder.conv.weight)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4)
    hidden = ReconstructionDecoder(16, 8, 4, dims)
    recon, features = hidden(x)
    torch.testing.assert_close(features, hidden.hidden(x), atol=1e-5, rtol=1e-5)
    assert recon.shape == (2, 1, *([12] * dims))


def test_a_layout_first_built_in_inference_mode_still_trains():
    """Attention maps or a prediction (inference mode) and then training in one process (the explorer and a
    fine-tuning dock; the method comparison's workers) share the cached layouts."""
    wa.window_layout.cache_clear()
    layer = make_layer(3, 4)
    layer.forward = types.MethodType(wa.swin_stage, layer)
    x = torch.rand(1, 12, 8, 8, 8)
    with torch.inference_mode():
        layer(x)
    out = layer(x.clone().requires_grad_(True))
    out.sum().backward()  # raised "Inference tensors cannot be saved for backward" before
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


def test_layer_norms_of_the_fast_path_compute_in_fp32_under_cpu_autocast():
    """PyTorch's CPU LayerNorm on bf16 tokens of 12-48 channels is 2-3x slower than fp32: the fast path casts."""
    from napari_dagman.core.models.architecture import architecture_for
    from napari_dagman.core.models.encoder import SwinEncoder, set_fused_window_attention

    encoder = SwinEncoder(architecture_for("tiny", 3))
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    set_fused_window_attention(encoder, True)
    assert norms and all(wa.uses_fast_path(m) for m in norms)  # every block, merging and class-attention norm
    assert "proj_out" in encoder.swin.__dict__  # the stage norms too
    norm = encoder.swin.layers1[0].blocks[0].norm1
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 40, 12, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_(True)
    expected = torch.nn.functional.layer_norm(x32, (12,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, expected.bfloat16(), atol=0, rtol=0)  # fp32 arithmetic, one rounding
    weights = torch.linspace(-1, 1, y.numel()).view(y.shape)
    (grad,) = torch.autograd.grad((y.float() * weights).sum(), x)
    (grad32,) = torch.autograd.grad((expected * weights).sum(), x32)
    # the incoming gradient is rounded to bf16 on its way back: equal up to bf16 rounding of the largest entry
    torch.testing.assert_close(grad.float(), grad32, atol=0.01 * float(grad32.abs().max()), rtol=0.02)
    stages = torch.randn(1, 12, 4, 4, 4)
    torch.testing.assert_close(  # the stage norm in fp32 equals MONAI's exactly
        encoder.swin.proj_out(stages, True), type(encoder.swin).proj_out(encoder.swin, stages, True), atol=0, rtol=0
    )
    set_fused_window_attention(encoder, False)  # MONAI's own modules again
    assert not any(wa.uses_fast_path(m) for m in norms) and "proj_out" not in encoder.swin.__dict__
