"""Optional native (C) kernels for one-token decoding steps on CPU, float32, one thread.

Why: a decoding step of a small GPT moves its weights and keys/values through memory once per
step and computes little (bench config, batch 8: ~13 MB of weights, up to 16 MB of cache,
53 MFLOP). PyTorch's kernels are built for larger problems: oneDNN's linear costs ~11 us of call
overhead and runs 8-row products at ~30 GFLOP/s; ``scaled_dot_product_attention`` runs two tiny
MKL GEMMs per (row, head). Measured at the bench config (2-core Zen4, idle), per step:

- :func:`Kernels.attend` (cache write + one-query attention, each row's keys and values streamed
  once): ~0.6-0.9 ms less than copy + SDPA;
- :func:`Kernels.linear` (8-row AVX-512 products over weights packed by :func:`pack_linear`, with
  bias, GELU and residual epilogues): 17 linears in ~0.9-1.1 ms instead of ~1.4-1.8 ms.

The C source is ``decode.c`` next to this module; :func:`install` makes these kernels the
``"native"`` set of :class:`~pipeline.models.decode.DecodeStep` (which never imports them).
Built lazily with the system C compiler (~1 s) by :func:`pipeline.kernels.build.build_checked`,
which keeps the library in :func:`~pipeline.kernels.build.kernel_cache_dir` under a hash of
compiler, flags, source and CPU, so other processes on the machine load instead of compiling.
Flags: ``-march=native`` (hence the CPU in the cache key) and glibc's libmvec for vectorised
``expf``/``erff``, falling back to plainer ones. A probe executable runs the kernels first, so
that an instruction the CPU lacks kills the probe, not the caller. The linear kernel needs
AVX-512 (``Kernels.linear`` is None without it). Any failure (no compiler, build, probe or load
error, a self-test against the torch ops off by more than 1e-5) leaves :func:`load` returning
None and callers on the torch path. ``TAMING_NATIVE_KERNELS=0`` disables them.

Numerics: fp32 throughout, the same formulas as the torch ops (max-subtracted softmax, exact erf
GELU), sums in other orders: results agree with PyTorch's to ~1e-6 relative.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.decode import AttendFn, LinearFn, set_native_kernels

from .build import build_checked, read_source

SOURCE = "decode.c"  # the kernels' C source, a file of this package
BLOCK = 32  # output columns per packed weight block (two AVX-512 vectors)

_COMMON = ["-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd"]
# Most specific first; the first that builds, loads and passes the self-test wins.
_FLAG_SETS = [
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-DUSE_LIBMVEC", *_COMMON,
     "-lmvec", "-lm"],
    ["-O3", "-march=native", *_COMMON, "-lm"],
    ["-O2", *_COMMON, "-lm"],
]

_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int


@dataclass(frozen=True)
class Kernels:
    """The loaded kernels. ``attend``: see ``decode_attend``'s contract in ``decode.c``;
    ``linear``: y = act(x W^T + b) + residual with W from :meth:`pack` (None where the build
    has no AVX-512)."""

    attend: AttendFn
    linear: LinearFn | None

    def pack(self, weight: Tensor) -> Tensor:
        """:func:`pack_linear`: an [N, K] weight in the layout :attr:`linear` reads."""
        return pack_linear(weight)


def pack_linear(weight: Tensor) -> Tensor:
    """[N, K] weight -> [ceil(N/32), K, 32] blocks of 32 output columns (zeros past N), the
    layout ``Kernels.linear`` streams: contiguous per block, one pass per row block of 8."""
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    wt = torch.zeros(k, blocks * BLOCK, dtype=torch.float32)
    wt[:, :n] = weight.detach().t()
    return wt.view(k, blocks, BLOCK).permute(1, 0, 2).contiguous()


def _wrap_attend(lib: ctypes.CDLL) -> AttendFn:
    """``decode_attend`` as an :data:`AttendFn` (strides and sizes read from the tensors)."""
    fn = lib.decode_attend
    fn.argtypes = [_PTR, _LONG, _PTR, _PTR, _LONG, _LONG, _LONG, _LONG, _LONG, _LONG, _LONG,
                   ctypes.c_float, _PTR, _PTR]
    fn.restype = None

    def attend(qkv: Tensor, k: Tensor, v: Tensor, pos: int, n_head: int, out: Tensor,
               scratch: Tensor) -> None:
        sb, sh, sl, _ = k.stride()  # k and v: the same strides (views of one cache)
        fn(qkv.data_ptr(), qkv.stride(0), k.data_ptr(), v.data_ptr(), sb, sh, sl,
           qkv.shape[0], n_head, k.shape[-1], pos, 1.0 / math.sqrt(k.shape[-1]),
           out.data_ptr(), scratch.data_ptr())

    return attend


def _wrap_linear(lib: ctypes.CDLL) -> LinearFn | None:
    """``linear_rows`` as a :data:`LinearFn`; None where the library was built without AVX-512."""
    if not lib.native_has_linear():
        return None
    fn = lib.linear_rows
    fn.argtypes = [_PTR, _LONG, _LONG, _PTR, _LONG, _PTR, _PTR, _PTR, _INT]
    fn.restype = None

    def linear(x: Tensor, packed: Tensor, n_out: int, bias: Tensor | None,
               residual: Tensor | None, gelu: bool) -> Tensor:
        x = x.contiguous()  # no-op for the decoder's activations; rows must be dense
        residual = None if residual is None else residual.contiguous()
        m, k = x.shape
        y = torch.empty(m, n_out, dtype=torch.float32)
        fn(x.data_ptr(), m, k, packed.data_ptr(), n_out,
           None if bias is None else bias.data_ptr(),
           None if residual is None else residual.data_ptr(), y.data_ptr(), int(gelu))
        return y

    return linear


def reference_attend(qkv: Tensor, k: Tensor, v: Tensor, pos: int, n_head: int, out: Tensor,
                     scratch: Tensor) -> None:
    """The torch equivalent of ``Kernels.attend`` (what the self-test checks it against)."""
    b, d = qkv.shape[0], k.shape[-1]
    c = n_head * d
    k[:, :, pos].copy_(qkv[:, c:2 * c].view(b, n_head, d))
    v[:, :, pos].copy_(qkv[:, 2 * c:].view(b, n_head, d))
    y = F.scaled_dot_product_attention(qkv[:, :c].view(b, n_head, 1, d), k[:, :, :pos + 1],
                                       v[:, :, :pos + 1])
    out.copy_(y.reshape(b, c))


def reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                     gelu: bool) -> Tensor:
    """The torch equivalent of ``Kernels.linear`` (on the unpacked weight)."""
    y = F.linear(x, weight, bias)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else y + residual


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal to 1e-5, relative and absolute (the self-test's bound)."""
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5))


def _self_test(kernels: Kernels) -> bool:
    """Both kernels against their torch references on random data, odd sizes included."""
    gen = torch.Generator().manual_seed(0)
    for b, h, d, max_len, pos in ((3, 2, 64, 40, 0), (2, 4, 24, 37, 36), (9, 1, 8, 9, 5)):
        qkv = torch.randn(b, 3 * h * d, generator=gen)
        cache = torch.randn(2, b, h, max_len, d, generator=gen)
        ref_cache = cache.clone()
        out, ref = torch.empty(b, h * d), torch.empty(b, h * d)
        scratch = torch.empty(max_len)
        kernels.attend(qkv, cache[0], cache[1], pos, h, out, scratch)
        reference_attend(qkv, ref_cache[0], ref_cache[1], pos, h, ref, scratch)
        if not (torch.equal(cache, ref_cache) and _close(out, ref)):
            return False
    if kernels.linear is None:
        return True
    for m, k, n, bias, res, gelu in ((8, 64, 96, True, False, False), (3, 40, 50, True, True,
                                     False), (11, 16, 7, False, False, True),
                                     (1, 32, 33, True, True, True)):
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen) / math.sqrt(k)
        bv = torch.randn(n, generator=gen) if bias else None
        rv = torch.randn(m, n, generator=gen) if res else None
        got = kernels.linear(x, pack_linear(w), n, bv, rv, gelu)
        if not _close(got, reference_linear(x, w, bv, rv, gelu)):
            return False
    return True


def _wrap(lib: ctypes.CDLL) -> Kernels:
    """The library's kernels as callables on tensors (``linear`` None without AVX-512)."""
    return Kernels(_wrap_attend(lib), _wrap_linear(lib))


def _self_test_no_grad(kernels: Kernels) -> bool:
    """:func:`_self_test` under ``torch.inference_mode`` (how the decoder calls the kernels)."""
    with torch.inference_mode():
        return _self_test(kernels)


@functools.cache
def load() -> Kernels | None:
    """The compiled :class:`Kernels`, or None where they are not available. Built once per
    process (module docstring)."""
    return build_checked("native decoding", read_source(SOURCE), _FLAG_SETS, _wrap,
                         _self_test_no_grad)


def install() -> None:
    """Make these kernels :mod:`pipeline.models.decode`'s ``"native"`` set in this process
    (:func:`~pipeline.models.decode.set_native_kernels` with :func:`load`): from then on a
    :class:`~pipeline.models.decode.DecodeStep` built on one thread uses them where they load.
    Idempotent; builds nothing until the first step is built."""
    set_native_kernels(load)
