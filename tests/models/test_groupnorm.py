"""Fused GroupNorm + SiLU: the C kernels against F.group_norm + F.silu, the swap, fallbacks."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import VQGAN, VQGANConfig
from pipeline.models.groupnorm import GroupNormSiLU, enable_fused_norm, load, norm_silu


@pytest.fixture(scope="module")
def kernels():
    k = load()
    if k is None:
        assert shutil.which("cc") is None and shutil.which("gcc") is None, "kernels did not build"
        pytest.skip("no C compiler")
    return k


@pytest.mark.parametrize("n,c,groups,h,w",
                         [(2, 64, 32, 16, 16), (3, 12, 4, 5, 7), (1, 32, 32, 1, 3)])
def test_forward_and_gradients_match_torch(kernels, n, c, groups, h, w):
    gen = torch.Generator().manual_seed(c + h)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * 3 + 1
    norm = nn.GroupNorm(groups, c, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    fused = nn.GroupNorm(groups, c, eps=1e-6)
    fused.load_state_dict(norm.state_dict())
    assert enable_fused_norm(fused) == 1 and isinstance(fused, GroupNormSiLU)

    x64 = x.clone().requires_grad_()
    ref = F.silu(norm(x64))
    dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(dy)
    xf = x.float().requires_grad_()
    y = norm_silu(fused, xf)
    y.backward(dy.float())
    assert y.grad_fn is not None and "GroupNormSiLU" in type(y.grad_fn).__name__
    for got, want in ((y, ref), (xf.grad, x64.grad), (fused.weight.grad, norm.weight.grad),
                      (fused.bias.grad, norm.bias.grad)):
        got, want = got.detach().double(), want.detach()
        assert float((got - want).abs().max()) < 2e-5 * max(1.0, float(want.abs().max()))


def test_fallbacks_give_the_unfused_result(kernels):
    norm = nn.GroupNorm(4, 8)
    enable_fused_norm(norm)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))  # plain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm_silu(norm, x), F.silu(norm(x)))
    xd = x.double()
    assert torch.equal(norm_silu(norm.double(), xd), F.silu(norm(xd)))  # not float32
    plain = nn.GroupNorm(4, 8)
    assert torch.equal(norm_silu(plain, x), F.silu(plain(x)))  # never swapped


def test_vqgan_with_fused_norms_matches(kernels):
    torch.manual_seed(0)
    cfg = VQGANConfig(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                      attn_resolutions=[8], z_channels=32, embed_dim=16, n_embed=64)
    model, reference = VQGAN(cfg), VQGAN(cfg)
    reference.load_state_dict(model.state_dict())
    assert enable_fused_norm(model) == sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out, ref = model(x), reference(x)
    assert torch.allclose(out.recon, ref.recon, atol=1e-5)
    out.recon.sum().backward()
    ref.recon.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-4), name
    with torch.inference_mode():
        assert torch.equal(model.encode(x).indices, reference.encode(x).indices)
