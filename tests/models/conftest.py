"""Shared tiny configs and fixtures for the VQGAN model tests (fast on 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch

from pipeline.kernels import build
from pipeline.models import VQGANConfig


def require_kernels(kernels, what: str):
    """``kernels`` if they built; else skip where this machine cannot have them (no C compiler,
    no AVX-512, a probe that could not run: an instruction the CPU lacks or a noexec temporary
    directory), and fail where it could (compile errors, a failed self-test): those are bugs.
    The message carries :func:`build.build_failures` so a CI log shows why."""
    if kernels is not None:
        return kernels
    if build.compiler() is None:
        pytest.skip("no C compiler")
    if "avx512f" not in build.cpu_flags():
        pytest.skip(f"{what}: this CPU has no AVX-512 (kernels need it)")
    reasons = build.build_failures(what)
    if reasons and all("] probe:" in r or r.startswith("tempdir:") for r in reasons):
        pytest.skip(f"{what}: built code cannot run here: {reasons[-1]}")
    pytest.fail(f"{what} kernels did not build on an AVX-512 CPU with a C compiler: {reasons}")


def tiny_config(**overrides) -> VQGANConfig:
    """32 px, f4 (8x8 code grid), attention at 8x8, 64 codes."""
    base = dict(
        ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=32,
        embed_dim=16, n_embed=64, resolution=32,
    )
    base.update(overrides)
    return VQGANConfig(**base)


# The reference's ImageNet f16 config (configs/imagenet_vqgan.yaml: model.params.ddconfig).
F16_DDCONFIG = dict(
    double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
)


@pytest.fixture
def single_thread():
    """Seeded, one intra-op thread. These tests run tiny tensors, where a second thread only adds
    synchronisation; on a shared, loaded machine two spinning OpenMP threads made them 8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def one_thread_module():
    """Tiny GPTs: one intra-op thread is faster, and immune to a busy second core (module-wide;
    the previous thread count is restored after the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
