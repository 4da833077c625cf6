"""DecodeStep: the same function as GPT.forward_step for one token (packed oneDNN and plain
kernels, native C or torch attention, with and without biases, any batch), the same cache
writes; the native kernel against torch; decode_threads."""

from __future__ import annotations

import pytest
import torch

from pipeline.kernels import build
from pipeline.kernels import decode as native_kernels_mod
from pipeline.models.decode import (
    KERNELS,
    SINGLE_THREAD_MACS,
    DecodeStep,
    choose_kernels,
    decode_threads,
    native_kernels,
    one_token_step,
    onednn_usable,
    set_native_kernels,
    step_macs,
)
from pipeline.models.gpt import GPT, GPTConfig

from .conftest import require_kernels

pytestmark = pytest.mark.usefixtures("one_thread_module", "native_installed")


@pytest.fixture(scope="module")
def native_installed():
    """The C kernels installed as the decoder's "native" set, as a sampling entry point does
    (the previous loader is restored after the module)."""
    previous = set_native_kernels(None)
    native_kernels_mod.install()
    yield
    set_native_kernels(previous)


def model_for(**overrides) -> GPT:
    base = dict(vocab_size=32, n_classes=3, block_size=12, n_layer=2, n_head=2, n_embd=32)
    base.update(overrides)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**base)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a dropped one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [3, 5, 9])
def test_decode_step_matches_forward_step(kernels, bias, batch):
    model = model_for(bias=bias)
    if kernels == "onednn" and not onednn_usable(model.tok_emb.weight):
        pytest.skip("oneDNN packed linears unavailable")
    if kernels == "native" and native_kernels() is None:
        require_kernels(native_kernels_mod.load(), "native decoding")  # skips, or fails with why
        assert "avx512f" not in build.cpu_flags(), "no linear kernel on AVX-512"
        pytest.skip("the native linear kernel needs AVX-512")
    decode = DecodeStep(model, batch=4, kernels=kernels)  # packed for 4 rows, run on others
    assert decode.kernels == kernels
    idx = torch.randint(0, 32, (batch, 10))
    idx[:, 0] = model.config.class_token(2)
    with torch.inference_mode():
        ref_cache, cache = model.new_cache(batch), model.new_cache(batch)
        for pos in range(10):
            ref = model.forward_step(idx[:, pos:pos + 1], ref_cache, pos)[:, 0]
            got = decode(idx[:, pos], cache, pos)
            assert got.shape == (batch, 32)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.data, ref_cache.data, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="exceeds"):
            decode(idx[:, 0], cache, 12)


def test_native_kernels_match_torch_and_can_be_disabled(monkeypatch):
    kernels = native_kernels_mod.load()
    if kernels is None:
        pytest.skip("no native kernels (no C compiler?)")
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 3 * 3 * 16, generator=gen)  # 4 rows, 3 heads of 16
    cache = torch.randn(2, 4, 3, 20, 16, generator=gen)
    ref_cache = cache.clone()
    out, ref = torch.empty(4, 48), torch.empty(4, 48)
    with torch.inference_mode():
        for pos in (0, 7, 19):
            kernels.attend(qkv, cache[0], cache[1], pos, 3, out, torch.empty(20))
            native_kernels_mod.reference_attend(qkv, ref_cache[0], ref_cache[1], pos, 3, ref,
                                                torch.empty(20))
            assert torch.equal(cache, ref_cache)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        if kernels.linear is not None:
            for m, k, n in ((8, 256, 768), (16, 64, 100), (5, 1024, 256)):
                x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.05
                b, r = torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
                packed = native_kernels_mod.pack_linear(w)
                for bias, res, gelu in ((b, None, False), (b, None, True), (None, r, False)):
                    torch.testing.assert_close(
                        kernels.linear(x, packed, n, bias, res, gelu),
                        native_kernels_mod.reference_linear(x, w, bias, res, gelu),
                        rtol=1e-5, atol=1e-5)
    native_kernels_mod.load.cache_clear()
    monkeypatch.setenv(build.ENV_DISABLE, "0")
    try:
        assert native_kernels_mod.load() is None
        assert choose_kernels(torch.zeros(1)) != "native"
        with pytest.raises(ValueError, match="not available"):
            DecodeStep(model_for(), 2, kernels="native")
    finally:
        native_kernels_mod.load.cache_clear()


def test_without_installed_kernels_there_is_no_native_set():
    previous = set_native_kernels(None)  # pipeline.models never imports pipeline.kernels itself
    try:
        assert native_kernels() is None
        assert choose_kernels(torch.zeros(1)) != "native"
        with pytest.raises(ValueError, match="install"):
            DecodeStep(model_for(), 2, kernels="native")
    finally:
        set_native_kernels(previous)


def test_default_kernels_follow_the_thread_count():
    weight = torch.zeros(1)
    if native_kernels() is not None:
        assert choose_kernels(weight) == "native"  # this module runs on one thread
    torch.set_num_threads(2)
    try:
        assert choose_kernels(weight) == ("onednn" if onednn_usable(weight) else "aten")
    finally:
        torch.set_num_threads(1)


def test_onednn_only_for_float32_cpu():
    assert not onednn_usable(torch.zeros(2, dtype=torch.float64))
    assert not onednn_usable(torch.zeros(2, dtype=torch.bfloat16))
    model = model_for().to(torch.float64)
    assert DecodeStep(model, 2).kernels == "aten"  # falls back by itself
    with torch.inference_mode():
        out = DecodeStep(model, 2)(torch.tensor([1, 2]), model.new_cache(2), 0)
    assert out.dtype == torch.float64


def test_unmaterialised_parameters_fall_back_to_forward_step():
    model = model_for()
    assert isinstance(one_token_step(model, 2), DecodeStep)
    calls = []
    real = model.forward_step
    model.forward_step = lambda *a, **k: calls.append(1) or real(*a, **k)
    with torch.no_grad():  # a ZeRO-3 partitioned parameter is an empty placeholder
        model.blocks[0].mlp.c_fc.bias.data = torch.empty(0)
    step = one_token_step(model, 2)
    assert not isinstance(step, DecodeStep)
    with torch.inference_mode(), pytest.raises(RuntimeError):
        step(torch.tensor([1, 2]), model.new_cache(2), 0)  # the real forward ran (and failed)
    assert calls == [1]


def test_decode_threads_sets_and_restores():
    assert step_macs(GPTConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=256), 8) == (
        8 * (4 * 12 * 256 * 256 + 256 * 512))
    torch.set_num_threads(2)
    try:
        with decode_threads(SINGLE_THREAD_MACS - 1) as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with decode_threads(SINGLE_THREAD_MACS) as n:
            assert n == 2 and torch.get_num_threads() == 2
        with pytest.raises(KeyError), decode_threads(0):
            raise KeyError("restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
