"""Swin stages with fewer copies: window layouts and shifted-window masks built once per shape, one gather in and
one gather out per block, and an attention kernel chosen by whether gradients are needed.

MONAI's `BasicLayer` pads, rolls, partitions into windows, reverses the partition, rolls back and crops, every
block, every call, and builds the shifted-window mask again on every call (`compute_mask`). Padding, the roll
and the partition together are one fixed permutation of the tokens for a given (grid, window, shift): here it
is computed once per shape (`window_layout`, cached) and applied as a single index gather into windows and a
single gather back. LayerNorm and the MLP act per token, so they run on the raster-ordered tokens unchanged.

The attention itself (`attend`):

* with gradients: an explicit softmax with the relative-position bias and the mask added in place to the
  logits. `scaled_dot_product_attention` cannot give the bias table a gradient through its fused CPU kernel,
  so it falls back to its math path, which also checks every row for all -inf (``isneginf``/``all``/``where``)
  on every call: the explicit form is the same mathematics without those passes;
* without gradients (EMA teacher, inference): the fused (flash) kernel on 4-D inputs.

The parameters are MONAI's own (``qkv``, ``proj``, ``relative_position_bias_table`` ...): checkpoints are
unchanged and switching back to MONAI's forward is exact (`set_fused_window_attention` in `encoder.py`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    SwinTransformer,
    WindowAttention,
    compute_mask,
    get_window_size,
)
from torch import nn


@dataclass
class WindowLayout:
    """Where each window slot of one block reads its token, for one (grid, window, shift) and device.

    ``gather`` (slots,): raster index of the token in each slot (padding slots read token 0 and are zeroed);
    ``scatter`` (tokens,): the slot of each token; ``pad_slots``: slots that are padding (None without);
    ``mask``: the shifted-window mask (windows, n, n), 0 or -100 as MONAI builds it, or None.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    pad_slots: torch.Tensor | None
    mask: torch.Tensor | None
    window_tokens: int
    _masks: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask in ``dtype`` (converted once per dtype, not per call)."""
        if self.mask is None:
            return None
        if dtype not in self._masks:
            with torch.inference_mode(False):  # cached: must serve training after inference (see window_layout)
                self._masks[dtype] = self.mask.to(dtype)
        return self._masks[dtype]


@functools.lru_cache(maxsize=128)
def window_layout(
    spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: str
) -> WindowLayout:
    """The token permutation of MONAI's pad + roll + window partition, and its mask (built once per shape).

    ``window`` and ``shift`` are those MONAI uses for this grid (`get_window_size` already applied). Built
    outside inference mode even when first asked for inside it: the cached tensors then also serve training (an
    inference tensor cannot be saved for backward; attention maps or a prediction followed by fine-tuning in
    one process failed on that).
    """
    with torch.inference_mode(False):
        return _build_window_layout(spatial, window, shift, device)


def _build_window_layout(
    spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: str
) -> WindowLayout:
    padded = tuple(math.ceil(s / w) * w for s, w in zip(spatial, window, strict=True))
    index = torch.full(padded, -1, dtype=torch.long)
    index[tuple(slice(0, s) for s in spatial)] = torch.arange(math.prod(spatial)).view(spatial)
    if any(shift):
        index = torch.roll(index, shifts=tuple(-s for s in shift), dims=tuple(range(len(spatial))))
    # window partition: (n1, w1, n2, w2, ...) -> (n1, n2, ..., w1, w2, ...)
    split = [d for p, w in zip(padded, window, strict=True) for d in (p // w, w)]
    dims = len(spatial)
    order = [2 * i for i in range(dims)] + [2 * i + 1 for i in range(dims)]
    slots = index.view(split).permute(order).reshape(-1)
    real = slots >= 0
    scatter = torch.empty(math.prod(spatial), dtype=torch.long)
    scatter[slots[real]] = torch.nonzero(real).squeeze(1)
    pad_slots = torch.nonzero(~real).squeeze(1) if not bool(real.all()) else None
    mask = compute_mask(list(padded), window, shift, torch.device("cpu")) if any(shift) else None
    to = torch.device(device)
    return WindowLayout(
        gather=slots.clamp_min(0).to(to),
        scatter=scatter.to(to),
        pad_slots=None if pad_slots is None else pad_slots.to(to),
        mask=None if mask is None else mask.to(to),
        window_tokens=math.prod(window),
    )


class _PermuteTokens(torch.autograd.Function):
    """``x.index_select(1, index)`` whose backward is one more gather (the inverse permutation), not a scatter-add.

    Valid because every token has exactly one slot; ``zero_out`` slots (padding) are zeroed in the output,
    ``zero_grad`` slots get no gradient.
    """

    @staticmethod
    def forward(ctx, x, index, inverse, zero_out, zero_grad):  # type: ignore[override]
        ctx.save_for_backward(inverse)
        ctx.zero_grad = zero_grad
        out = x.index_select(1, index)
        if zero_out is not None:
            out.index_fill_(1, zero_out, 0.0)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        out = grad.index_select(1, inverse)
        if ctx.zero_grad is not None:
            out.index_fill_(1, ctx.zero_grad, 0.0)
        return out, None, None, None, None


def to_windows(tokens: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(B, tokens, C) in raster order -> (B, slots, C) window after window, padding slots zero."""
    return _PermuteTokens.apply(tokens, layout.gather, layout.scatter, layout.pad_slots, None)


def from_windows(windows: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """The inverse of `to_windows` (padding slots dropped)."""
    return _PermuteTokens.apply(windows, layout.scatter, layout.gather, None, layout.pad_slots)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Window attention: q, k, v (B, windows, heads, n, d), bias (heads, n, n), mask (windows, n, n) or None.

    Returns (B, windows, heads, n, d). With gradients: the explicit softmax (MONAI's order of operations); the
    bias and the mask are added in place to the logits, so neither is broadcast into a new tensor. Without:
    the fused kernel.
    """
    b, w, h, n, d = q.shape
    bias = bias.to(q.dtype)
    if torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad):
        logits = torch.matmul(q * scale, k.transpose(-2, -1))
        logits.add_(bias)
        if mask is not None:
            logits.add_(mask.unsqueeze(1))
        attn = logits.softmax(dim=-1)
        if dropout > 0:
            attn = F.dropout(attn, dropout)
        return torch.matmul(attn, v)
    # the kernel takes 4-D inputs; the (bias + mask) of every window is broadcast over the batch, never copied:
    # windows go with the heads when there is a mask (one per window), with the batch when there is none
    if mask is None:
        batch, attn_mask = b * w, bias.expand(b * w, h, n, n)
    else:
        batch, attn_mask = b, (bias + mask.unsqueeze(1)).view(1, w * h, n, n).expand(b, w * h, n, n)
    out = F.scaled_dot_product_attention(
        q.reshape(batch, -1, n, d),
        k.reshape(batch, -1, n, d),
        v.reshape(batch, -1, n, d),
        attn_mask=attn_mask,
        dropout_p=0.0,
        scale=scale,
    )
    return out.view(b, w, h, n, d)


def relative_position_bias(attn: WindowAttention, n: int) -> torch.Tensor:
    """(heads, n, n) bias of a window of ``n`` tokens (MONAI's indexing, without its per-call copy of the index)."""
    index = attn.relative_position_index[:n, :n].reshape(-1)
    # contiguous (a small copy): broadcasting a permuted view over every window's logits is several times slower
    return attn.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1).contiguous()


def window_self_attention(attn: WindowAttention, windows: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """MONAI's `WindowAttention` on (B, slots, C) window-ordered tokens; returns the same shape."""
    b, slots, c = windows.shape
    n, heads = layout.window_tokens, attn.num_heads
    qkv = attn.qkv(windows).view(b, slots // n, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.unbind(0)
    out = attend(
        q,
        k,
        v,
        relative_position_bias(attn, n),
        layout.mask_as(q.dtype),
        attn.scale,
        attn.attn_drop.p if attn.training else 0.0,
    )
    out = out.permute(0, 1, 3, 2, 4).reshape(b, slots, c)
    return attn.proj_drop(attn.proj(out))


def fused_window_attention(self: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A drop-in ``WindowAttention.forward`` on MONAI's (B * windows, n, C) layout, through `attend`."""
    bw, n, c = x.shape
    windows = mask.shape[0] if mask is not None else 1
    heads = self.num_heads
    qkv = self.qkv(x).view(bw // windows, windows, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.unbind(0)
    if mask is not None:
        mask = mask.to(q.dtype)
    dropout = self.attn_drop.p if self.training else 0.0
    out = attend(q, k, v, relative_position_bias(self, n), mask, self.scale, dropout)
    return self.proj_drop(self.proj(out.permute(0, 1, 3, 2, 4).reshape(bw, n, c)))


def swin_stage(self: BasicLayer, x: torch.Tensor) -> torch.Tensor:
    """A drop-in ``BasicLayer.forward``: (B, C, *grid) -> (B, C', *grid') with the same parameters and results.

    The output is a channels-first view of a channels-last tensor (``channels_last_3d`` memory format): the
    next stage, the stage norm and 1x1 convolutions read it without a copy.
    """
    b, c, *grid = x.shape
    grid_t = tuple(grid)
    window = get_window_size(grid_t, self.window_size)
    device = str(x.device)
    tokens = x.movedim(1, -1).reshape(b, -1, c)  # no copy when x is already channels-last
    for blk in self.blocks:
        # the block's own shift (0 for even blocks, and along sides no larger than the window)
        _, shift = get_window_size(grid_t, blk.window_size, blk.shift_size)
        layout = window_layout(grid_t, window, tuple(shift), device)
        shortcut = tokens
        windows = to_windows(blk.norm1(tokens), layout)
        out = from_windows(window_self_attention(blk.attn, windows, layout), layout)
        tokens = shortcut + blk.drop_path(out)
        tokens = tokens + blk.forward_part2(tokens)
    out = tokens.view(b, *grid, -1)
    if self.downsample is not None:
        out = self.downsample(out)
    return out.movedim(-1, 1)


def _layer_norm(x: torch.Tensor, shape, weight, bias, eps: float) -> torch.Tensor:
    """`F.layer_norm`, computed in fp32 when a CPU autocast hands it bf16/fp16 tokens (the result is cast back).

    PyTorch's CPU LayerNorm on bf16 tensors with few channels (12-48 here) is 2-3x slower, forward and backward,
    than casting to fp32, normalising and casting back; CUDA autocast already runs LayerNorm in fp32.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return F.layer_norm(x.float(), shape, weight, bias, eps).to(x.dtype)
    return F.layer_norm(x, shape, weight, bias, eps)


def layer_norm(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A drop-in ``LayerNorm.forward`` through `_layer_norm` (the same result as the module's in fp32)."""
    return _layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def stage_norm(self: SwinTransformer, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """A drop-in ``SwinTransformer.proj_out``: the parameter-free LayerNorm over the channels of a stage output."""
    if not normalize:
        return x
    return _layer_norm(x.movedim(1, -1), (x.shape[1],), None, None, 1e-5).movedim(-1, 1)


def uses_fast_path(module: nn.Module) -> bool:
    """True when ``module`` (a MONAI `BasicLayer`, `WindowAttention` or a `LayerNorm`) runs through this module."""
    return "forward" in module.__dict__
