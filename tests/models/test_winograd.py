"""Winograd F(4x4, 3x3) convolutions: the C kernels against F.conv2d, the module swap, fallbacks."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kernels import build
from pipeline.kernels.winograd import (
    Kernels,
    WinogradConv2d,
    disable_winograd,
    eligible,
    enable_winograd,
    fusable,
    fused_forward,
    load,
    weight_grad_from_domain,
    weight_transform,
    winograd_conv2d,
)
from pipeline.models import VQGAN, VQGANConfig

from .conftest import require_kernels


@pytest.fixture(scope="module")
def kernels():
    # A machine with a compiler and AVX-512 must build them: a failure there fails, not skips.
    return require_kernels(load(), "Winograd convolution")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("n,c,co,h,w,bias", [
    (2, 16, 32, 16, 16, True),   # whole tiles
    (1, 32, 16, 13, 10, False),  # partial tiles at the bottom and right borders
    (3, 48, 80, 7, 9, True),     # channel counts past one 64-column GEMM block
    (2, 64, 64, 33, 4, True),    # one tile column
    (1, 96, 112, 64, 24, True),  # several chunks per thread; GEMM blocks of 6 rows + remainder
])
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["chunked", "whole", "whole_in_groups"])
def test_forward_and_gradients_match_conv2d(kernels, n, c, co, h, w, bias, fmt, mode):
    gen = torch.Generator().manual_seed(n * h + w)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(co, c, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(co, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv2d(x, wt, b, padding=1)
    dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    inputs = (x, wt) + ((b,) if bias else ())
    ref_grads = torch.autograd.grad(ref, inputs, dy)

    layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    xf = x.detach().float().contiguous(memory_format=layout).requires_grad_()
    wf = wt.detach().float().requires_grad_()
    bf = b.detach().float().requires_grad_() if bias else None
    # whole_in_groups: buffers for ~7 tiles, so every shape here takes several groups
    k = Kernels(kernels.lib, mode=int(mode != "chunked"),
                group_bytes=36 * 4 * (c + co) * 7 if mode == "whole_in_groups" else 32 << 20)
    y = winograd_conv2d(xf, wf, bf, k)
    # the output, and the input gradient, keep the input's memory format (what F.conv2d does)
    assert y.is_contiguous(memory_format=layout)
    grads = torch.autograd.grad(y, (xf, wf) + ((bf,) if bias else ()), dy.float())
    assert grads[0].is_contiguous(memory_format=layout)
    # fp32 Winograd: ~1e-6 relative to the float64 result (direct fp32 is ~1e-7)
    assert _rel_err(y, ref) < 5e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert _rel_err(got, want) < 5e-5


def test_kernel_weight_transforms_match_the_torch_definitions(kernels):
    w = torch.randn(48, 32, 3, 3)
    assert torch.allclose(kernels.weight(w), weight_transform(w), atol=1e-5)
    back = weight_transform(w.transpose(0, 1).flip(2, 3))  # the input gradient's kernel
    assert torch.allclose(kernels.weight(w, back=True), back, atol=1e-5)
    du = torch.randn(36, 32, 48)
    assert torch.allclose(kernels.weight_from_domain(du), weight_grad_from_domain(du), atol=1e-4)


def test_weight_transform_and_its_adjoint():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    g = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                     dtype=torch.float64)
    u = weight_transform(w.float())  # [36, C, C_out]
    want = torch.einsum("ij,ocjk,lk->ilco", g, w, g).reshape(36, 3, 5)
    assert torch.allclose(u.double(), want, atol=1e-6)
    # <U(w), dU> == <w, U^T(dU)>: the weight gradient is the transform's adjoint
    du = torch.randn(36, 3, 5, dtype=torch.float64)
    lhs = float((want * du).sum())
    rhs = float((w * weight_grad_from_domain(du.float()).double()).sum())
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_enable_swaps_only_eligible_convs_and_keeps_the_state_dict(kernels):
    torch.manual_seed(0)
    cfg = VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                      attn_resolutions=[], z_channels=32, embed_dim=16, n_embed=64)
    model = VQGAN(cfg)
    reference = VQGAN(cfg)
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    n_eligible = sum(eligible(m) for m in model.modules())
    assert enable_winograd(model) == n_eligible > 0
    assert list(model.state_dict()) == keys
    # conv_in (3 channels), conv_out (3), strided downsampling and 1x1 convs stay direct
    assert type(model.encoder.conv_in) is nn.Conv2d
    assert type(model.decoder.conv_out) is nn.Conv2d
    assert isinstance(model.encoder.down[0].block[0].conv1, WinogradConv2d)

    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out, ref = model(x), reference(x)
    assert torch.allclose(out.recon, ref.recon, atol=1e-4)
    out.recon.square().mean().backward()
    ref.recon.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name

    assert disable_winograd(model) == n_eligible
    assert not any(isinstance(m, WinogradConv2d) for m in model.modules())


def test_inference_cache_follows_in_place_weight_changes(kernels):
    conv = nn.Conv2d(16, 16, 3, padding=1)
    enable_winograd(conv)
    x = torch.randn(2, 16, 16, 16)
    with torch.inference_mode():
        first = conv(x)
        assert torch.allclose(first, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4)
        assert torch.equal(conv(x), first)  # the cached transform
    with torch.no_grad():
        conv.weight.mul_(2)
    with torch.inference_mode():
        second = conv(x)
    assert torch.allclose(second, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4)
    assert not torch.allclose(second, first, atol=1e-2)


def test_frozen_weight_keeps_its_transforms_and_backpropagates_to_the_input(kernels):
    # the frozen LPIPS VGG: no weight gradient, both transforms kept across steps
    conv = nn.Conv2d(32, 48, 3, padding=1).requires_grad_(False)
    enable_winograd(conv)
    x = torch.randn(2, 32, 12, 12, dtype=torch.float64)
    for _ in range(2):
        xf = x.float().requires_grad_()
        (dx,) = torch.autograd.grad(conv(xf).square().sum(), xf)
        xd = x.clone().requires_grad_()
        ref = F.conv2d(xd, conv.weight.double(), conv.bias.double(), padding=1)
        (want,) = torch.autograd.grad(ref.square().sum(), xd)
        assert _rel_err(dx, want) < 5e-5
    dom = conv._weight_domain(kernels)
    assert dom is conv._weight_domain(kernels) and dom._u is not None and dom._back is not None
    with torch.no_grad():
        conv.weight.add_(1)
    assert conv._weight_domain(kernels) is not dom  # an in-place change drops both


def test_direct_path_where_winograd_does_not_pay_or_apply(kernels):
    conv = nn.Conv2d(16, 16, 3, padding=1)
    enable_winograd(conv, min_size=16)
    small = torch.randn(2, 16, 8, 8)  # below min_size: exactly nn.Conv2d's result
    assert torch.equal(conv(small), F.conv2d(small, conv.weight, conv.bias, padding=1))
    big = torch.randn(2, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: oneDNN's bf16 convolution
        assert conv(big).dtype == torch.bfloat16
    assert not eligible(nn.Conv2d(16, 16, 3, padding=1, stride=2))
    assert not eligible(nn.Conv2d(3, 16, 3, padding=1))  # channels not a multiple of 16
    assert eligible(nn.Conv2d(512, 512, 3, padding=1))  # the LPIPS VGG's widest
    assert not eligible(nn.Conv2d(1024, 1024, 3, padding=1))  # past max_channels (untested)
    assert not eligible(nn.Conv2d(512, 512, 3, padding=1), max_channels=256)


def test_disabled_by_environment_leaves_models_alone():
    code = ("import torch.nn as nn\n"
            "from pipeline.kernels.winograd import enable_winograd, load\n"
            "m = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1))\n"
            "print(load() is None, enable_winograd(m), type(m[0]).__name__)\n")
    env = {**os.environ, "TAMING_NATIVE_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["True", "0", "Conv2d"]


def test_built_kernels_are_cached_between_processes(tmp_path, monkeypatch):
    cc = build.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv(build.KERNEL_CACHE_ENV, str(tmp_path / "cache"))
    source = ("int twice(int x) { return 2 * x; }\n"
              "#ifdef NATIVE_PROBE\nint main(void) { return twice(0); }\n#endif\n")
    flags = ["-O2", "-shared", "-fPIC"]
    lib = build.build_library(cc, flags, str(tmp_path), "k", source)
    assert lib is not None and lib.twice(21) == 42
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1
    # A second build of the same source and flags loads the cached library: no compiler runs.
    again = build.build_library("/nonexistent/cc", flags, str(tmp_path / "none"), "k", source)
    assert again is None  # the compiler is part of the key: a different one rebuilds (and fails)
    again = build.build_library(cc, flags, str(tmp_path / "none"), "k", source)
    assert again is not None and again.twice(4) == 8


@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_prologue_matches_group_norm_then_conv(kernels, silu):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 64, 19, 13, generator=gen) * 3 + 1).contiguous(
        memory_format=torch.channels_last)  # a mean offset: the float64 statistics matter
    norm = nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.normal_(generator=gen)
    w, b = torch.randn(48, 64, 3, 3, generator=gen), torch.randn(48, generator=gen)
    scale, shift = kernels.group_norm_terms(x, norm)
    with torch.no_grad():
        normed = norm(x)
        assert torch.allclose(x * scale[:, :, None, None] + shift[:, :, None, None], normed,
                              atol=1e-5)
        want = F.conv2d(F.silu(normed) if silu else normed, w, b, padding=1)
        got = kernels.conv(x, kernels.weight(w), b, (scale, shift, silu))
    assert _rel_err(got, want.double()) < 5e-5
    with pytest.raises(ValueError, match="channels_last"):
        kernels.conv(x.contiguous(), kernels.weight(w), b, (scale, shift, silu))


@pytest.mark.parametrize("c_in,c_out", [(32, 32), (32, 64)])
def test_fused_resnet_block_matches_the_plain_block(kernels, c_in, c_out):
    from pipeline.models.vqgan import ResnetBlock

    torch.manual_seed(0)
    block = ResnetBlock(c_in, c_out).eval()
    plain = ResnetBlock(c_in, c_out).eval()
    plain.load_state_dict(block.state_dict())
    enable_winograd(block)
    assert type(block) is ResnetBlock and block.fast_forward is fused_forward
    assert pickle.loads(pickle.dumps(block)).fast_forward is fused_forward  # Ray ships models
    x = torch.randn(2, c_in, 17, 12).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert fusable(block, x) and not fusable(block, x.contiguous())
        fused, want = block(x), plain(x)
        assert _rel_err(fused, want.double()) < 5e-5
        # NCHW: not fused (the block's own forward, still through the Winograd layers)
        assert _rel_err(block(x.contiguous()), want.double()) < 5e-5
    # with autograd: the block's own forward, so gradients flow
    xg = x.clone().requires_grad_()
    assert not fusable(block, xg)
    block(xg).sum().backward()
    assert xg.grad is not None and block.conv1.weight.grad is not None
    disable_winograd(block)
    assert type(block) is ResnetBlock and block.fast_forward is None


def test_resnet_block_fast_forward_slot_falls_back_when_it_declines():
    from pipeline.models.vqgan import ResnetBlock

    torch.manual_seed(0)
    block = ResnetBlock(32, 64).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        want = block(x)
        calls = []
        block.fast_forward = lambda b, t: calls.append(b) or None  # declines: own forward
        assert torch.equal(block(x), want) and calls == [block]
        block.fast_forward = lambda b, t: torch.zeros(1)  # takes the call
        assert torch.equal(block(x), torch.zeros(1))
