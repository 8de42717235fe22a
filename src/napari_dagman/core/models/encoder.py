"""Swin encoder (MONAI's `SwinTransformer`) with a learnable mask token and a semantic class-attention module.

The MONAI module is kept whole under ``self.swin`` so its parameter names are exactly those of
``SwinUNETR.swinViT``: a pretrained encoder loads into a segmentation network by a prefix rename.

Swin has no [CLS] token, so it has no global attention map. Following SMART/DAGMaN ("Swin enhanced with
semantic class attention") the encoder adds a CaiT-style class-attention module: a learnable query token
attends over the tokens of one encoder stage (stage 3 by default: 16-voxel tokens at patch size 2, the size of
a mask cell). Its output is the global token; its per-head softmax weights over the tokens are the attention
map that the plugin shows and that the teacher uses to choose which cells to mask.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, SwinTransformer, WindowAttention
from torch import nn

from napari_dagman.core.models.architecture import Architecture


class ClassAttentionBlock(nn.Module):
    """One class-attention block: the class token queries the tokens, then an MLP (CaiT, pre-norm).

    Keys and values are the tokens only, so the attention weights of each head sum to 1 over the tokens and
    read directly as a spatial map.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm_cls = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # CaiT's initialisation (truncated normal 0.02, zero biases), not PyTorch's default Kaiming-uniform
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self, cls: torch.Tensor, tokens: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cls (B, 1, C), tokens (B, N, C) -> new cls (B, 1, C), attention (B, heads, N).

        ``ignore`` (B, N) bool: tokens the class token must not attend to (they get attention 0), e.g. the
        tokens a noisy teacher dropped from its input, which carry only the mask token.
        """
        b, n, c = tokens.shape
        q = self.q(self.norm_cls(cls)).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self.norm_tokens(tokens)).reshape(b, n, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, 1, N)
        if ignore is not None:
            logits = logits.masked_fill(ignore[:, None, None, :], float("-inf"))
        attn = logits.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, 1, c)
        cls = cls + self.proj(out)
        cls = cls + self.mlp(self.norm_mlp(cls))
        return cls, attn.squeeze(2)


class SemanticClassAttention(nn.Module):
    """A learnable class token refined by ``blocks`` class-attention blocks over a stage's tokens."""

    def __init__(self, dim: int, num_heads: int, blocks: int = 2) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, tokens: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, C) -> global token (B, C), attention of the last block (B, heads, N).

        ``ignore`` (B, N) bool marks tokens left out of the attention (every sample must keep at least one).
        """
        if ignore is not None:
            ignore = ignore.to(tokens.device, torch.bool)
            if bool(ignore.all(dim=1).any()):
                raise ValueError("class attention cannot ignore every token of a sample")
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        attn = tokens.new_zeros(0)
        for block in self.blocks:
            cls, attn = block(cls, tokens, ignore)
        return self.norm(cls.squeeze(1)), attn


@dataclass
class EncoderOutput:
    """What one encoder pass returns.

    ``stages`` are the five layer-normalised feature maps (channels first) of MONAI's SwinTransformer;
    ``tokens`` are the attention-stage tokens flattened to (B, N, C); ``attention`` is (B, heads, N) with
    each head summing to 1; ``grid`` is the attention-stage token grid shape.
    """

    stages: list[torch.Tensor]
    tokens: torch.Tensor
    global_token: torch.Tensor
    attention: torch.Tensor
    grid: tuple[int, ...]


class SwinEncoder(nn.Module):
    """MONAI SwinTransformer + mask token + semantic class attention."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        d = arch.dims
        self.swin = SwinTransformer(
            in_chans=arch.in_channels,
            embed_dim=arch.embed_dim,
            window_size=(arch.window_size,) * d,
            patch_size=(arch.patch_size,) * d,
            depths=arch.depths,
            num_heads=arch.num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=arch.drop_path,
            spatial_dims=d,
        )
        self.mask_token = nn.Parameter(torch.zeros(arch.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.class_attention = SemanticClassAttention(
            arch.stage_channels(arch.attention_stage), arch.sca_heads, arch.sca_blocks
        )

    def set_fused_attention(self, enabled: bool) -> None:
        """Window attention through `scaled_dot_product_attention` (see `set_fused_window_attention`)."""
        set_fused_window_attention(self, enabled)

    def embed(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Patch embedding; hidden tokens replaced by the mask token; optional Gaussian feature noise.

        ``token_mask`` is (B, *token_grid) with 1 where a token is hidden. ``noise_std`` > 0 adds Gaussian noise
        with that standard deviation relative to each token's own standard deviation over channels (the
        noisy teacher's feature-noise option).
        """
        x0 = self.swin.patch_embed(x)
        if token_mask is not None:
            if tuple(token_mask.shape[1:]) != tuple(x0.shape[2:]) or token_mask.shape[0] != x0.shape[0]:
                raise ValueError(
                    f"token mask {tuple(token_mask.shape)} does not fit tokens {tuple(x0.shape)}"
                )
            w = token_mask.unsqueeze(1).to(x0.dtype)
            token = self.mask_token.view(1, -1, *([1] * self.arch.dims)).to(x0.dtype)
            x0 = x0 * (1.0 - w) + token * w
        if noise_std > 0:
            scale = x0.detach().std(dim=1, keepdim=True) * noise_std
            noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
            x0 = x0 + noise * scale
        return self.swin.pos_drop(x0)

    def stages(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """The five normalised stage outputs from an embedded input (MONAI's forward, split open)."""
        swin = self.swin
        outs = [swin.proj_out(x0, True)]
        x = x0
        for layers in (swin.layers1, swin.layers2, swin.layers3, swin.layers4):
            # no .contiguous(): the fast stages return channels-last views that the next stage reads as they are
            x = layers[0](x)
            outs.append(swin.proj_out(x, True))
        return outs

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        class_attention: bool = True,
        attention_ignore: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode ``x``; ``token_mask`` hides patch tokens behind the mask token, ``attention_ignore`` (B, N)
        leaves attention-stage tokens out of the class attention."""
        stages = self.stages(self.embed(x, token_mask, noise_std, generator))
        feat = stages[self.arch.attention_stage]
        grid = tuple(feat.shape[2:])
        tokens = feat.movedim(1, -1).reshape(feat.shape[0], -1, feat.shape[1])  # (B, N, C); a view if channels-last
        if class_attention:
            global_token, attention = self.class_attention(tokens, attention_ignore)
        else:  # methods that do not train the class attention skip it (no unused-gradient bookkeeping)
            global_token, attention = tokens.mean(dim=1), tokens.new_zeros(0)
        return EncoderOutput(stages, tokens, global_token, attention, grid)

    def token_grid(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Patch-embedding token grid for an input of spatial size ``spatial``."""
        return tuple(-(-s // self.arch.patch_size) for s in spatial)


def set_fused_window_attention(module: nn.Module, enabled: bool) -> None:
    """Run every MONAI Swin stage, window attention, LayerNorm and stage norm inside ``module`` through
    `window_attention` (or back).

    The fast path (cached window layouts and masks, one gather per direction, the fused kernel without
    gradients) uses the same parameters and mathematics as MONAI's forward and trains too; it is not
    bit-identical to it (rounding), so it is a setting. Switching it off restores MONAI's own forward exactly.
    """
    from napari_dagman.core.models import window_attention as fast

    replaced = {
        WindowAttention: ("forward", fast.fused_window_attention),
        BasicLayer: ("forward", fast.swin_stage),
        nn.LayerNorm: ("forward", fast.layer_norm),
        SwinTransformer: ("proj_out", fast.stage_norm),
    }
    for sub in module.modules():
        for kind, (name, function) in replaced.items():
            if isinstance(sub, kind):
                if enabled:
                    setattr(sub, name, types.MethodType(function, sub))
                elif name in sub.__dict__:
                    delattr(sub, name)


def check_input_size(arch: Architecture, spatial: tuple[int, ...]) -> None:
    """Swin needs every side divisible by the deepest stride (32) to merge patches without padding."""
    from napari_dagman.core.errors import DagmanInputError
    from napari_dagman.core.models.architecture import DEEPEST_STRIDE

    if len(spatial) != arch.dims or any(s % DEEPEST_STRIDE for s in spatial):
        raise DagmanInputError(
            f"input of size {tuple(spatial)} does not fit a {arch.dims}D Swin: each side must be a multiple of "
            f"{DEEPEST_STRIDE}"
        )


def upsample_mask(mask: torch.Tensor, factor: int, dims: int) -> torch.Tensor:
    """Nearest upsampling of a (B, *grid) mask by an integer factor along each spatial axis."""
    out = mask
    for axis in range(1, dims + 1):
        out = out.repeat_interleave(factor, dim=axis)
    return out


def pool_mask(mask: torch.Tensor, factor: int, dims: int) -> torch.Tensor:
    """Fraction of hidden voxels per block of ``factor`` voxels: (B, *grid) -> (B, *grid/factor)."""
    pool = F.avg_pool3d if dims == 3 else F.avg_pool2d
    return pool(mask.unsqueeze(1).float(), factor).squeeze(1)


def cell_token_mask(cell_mask: torch.Tensor, cell: int, patch_size: int, dims: int) -> torch.Tensor:
    """Cell mask (B, *cells) -> patch-embedding token mask (B, *roi/patch) (a cell is ``cell`` voxels a side)."""
    return upsample_mask(cell_mask, cell // patch_size, dims)


def cell_stage_token_mask(cell_mask: torch.Tensor, cell: int, stride: int, dims: int) -> torch.Tensor:
    """Cell mask -> (B, N) mask on the tokens of a stage of ``stride`` voxels (hidden when >= half is)."""
    voxels = upsample_mask(cell_mask, cell, dims)
    return (pool_mask(voxels, stride, dims) >= 0.5).flatten(1)


def build_swin_encoder(arch: Architecture, _: dict | None = None) -> SwinEncoder:
    """The published ``swin`` kind (see `core.models.published`): the run's Swin encoder, untrained."""
    return SwinEncoder(arch)
