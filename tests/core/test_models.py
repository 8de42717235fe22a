"""Encoder, semantic class attention and heads: shapes, normalisation, mask token, MONAI compatibility."""

from __future__ import annotations

import pytest
import torch

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.models import SwinEncoder, architecture_for
from napari_dagman.core.models.encoder import check_input_size, upsample_mask
from napari_dagman.core.models.pretrain import PretrainNetwork


@pytest.mark.parametrize(("dims", "size"), [(3, 32), (3, 64), (2, 64), (2, 96)])
def test_stage_shapes_and_class_attention_sums_to_one(dims, size):
    torch.manual_seed(0)
    arch = architecture_for("tiny", dims)
    enc = SwinEncoder(arch).eval()
    x = torch.rand(2, 1, *(size,) * dims)
    with torch.no_grad():
        out = enc(x)
    for stage, feat in enumerate(out.stages):
        stride = arch.stage_stride(stage)
        assert feat.shape == (2, arch.stage_channels(stage), *(size // stride,) * dims)
    n = (size // arch.attention_stride) ** dims
    assert out.grid == (size // arch.attention_stride,) * dims
    assert out.tokens.shape == (2, n, arch.stage_channels(3))
    assert out.attention.shape == (2, arch.sca_heads, n)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, arch.sca_heads))
    assert (out.attention >= 0).all()
    assert out.global_token.shape == (2, arch.stage_channels(3))


def test_encoder_names_match_monai_swinunetr():
    from monai.networks.nets import SwinUNETR

    arch = architecture_for("tiny", 3)
    enc = SwinEncoder(arch)
    unetr = SwinUNETR(
        in_channels=1,
        out_channels=3,
        feature_size=arch.embed_dim,
        depths=arch.depths,
        num_heads=arch.num_heads,
        window_size=arch.window_size,
        spatial_dims=3,
    )
    ours = {k.removeprefix("swin."): v.shape for k, v in enc.state_dict().items() if k.startswith("swin.")}
    theirs = {
        k.removeprefix("swinViT."): v.shape for k, v in unetr.state_dict().items() if k.startswith("swinViT.")
    }
    assert ours == theirs


def test_mask_token_replaces_exactly_the_hidden_tokens():
    torch.manual_seed(0)
    arch = architecture_for("tiny", 3)
    enc = SwinEncoder(arch).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    cells = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    cells[0, 0, 1, 0] = True
    token_mask = upsample_mask(cells, 8, 3)  # 16-voxel cells -> 8 tokens of 2 voxels
    with torch.no_grad():
        clean = enc.embed(x)
        masked = enc.embed(x, token_mask)
    hidden = token_mask[0]
    assert torch.equal(masked[0][:, ~hidden], clean[0][:, ~hidden])
    expected = enc.mask_token.view(-1, 1).expand(-1, int(hidden.sum()))
    torch.testing.assert_close(masked[0][:, hidden], expected)


def test_reconstruction_has_the_input_shape():
    arch = architecture_for("tiny", 2)
    net = PretrainNetwork(arch)
    out = net(torch.rand(2, 1, 64, 64))
    assert out.reconstruction.shape == (2, 1, 64, 64)
    assert out.global_logits.shape == (2, arch.out_dim)
    assert out.patch_logits.shape == (2, 16, arch.out_dim)


def test_input_size_check():
    arch = architecture_for("tiny", 3)
    check_input_size(arch, (64, 64, 32))
    with pytest.raises(DagmanInputError, match="multiple of 32"):
        check_input_size(arch, (64, 48, 64))
    with pytest.raises(DagmanInputError, match="unknown preset"):
        architecture_for("huge", 3)


@pytest.mark.parametrize(("dims", "size"), [(3, 64), (2, 96)])
def test_fused_window_attention_matches_monai_forward_and_backward(dims, size):
    from napari_dagman.core.models.encoder import set_fused_window_attention

    torch.manual_seed(0)
    enc = SwinEncoder(architecture_for("tiny", dims)).train()
    x = torch.rand(2, 1, *(size,) * dims, requires_grad=True)
    weights = [torch.randn_like(s) for s in enc(x).stages]

    def run():
        out = enc(x)
        loss = sum((s * w).sum() for s, w in zip(out.stages, weights, strict=True))
        (grad,) = torch.autograd.grad(loss, x)
        return out.stages, grad

    explicit, grad_explicit = run()
    set_fused_window_attention(enc, True)
    fused, grad_fused = run()
    for a, b in zip(explicit, fused, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_explicit, grad_fused, atol=1e-6, rtol=1e-4)
    set_fused_window_attention(enc, False)  # switching back restores MONAI's own forward exactly
    restored, _ = run()
    assert all(torch.equal(a, b) for a, b in zip(explicit, restored, strict=True))
