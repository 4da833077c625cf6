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

Built lazily with the system C compiler (``$CC``, else ``cc``/``gcc``; ~1 s) and kept in
:func:`kernel_cache_dir` under a hash of compiler, flags, source and CPU, so other processes on
the machine load instead of compiling. Flags: ``-march=native`` (hence the CPU in the cache key)
and glibc's libmvec for vectorised ``expf``/``erff``, falling back to plainer ones. A probe
executable runs the kernels first, so that an instruction the CPU lacks kills the probe, not the
caller. The linear kernel needs AVX-512 (``Kernels.linear`` is None without it). Any failure (no
compiler, build, probe or load error, a self-test against the torch ops off by more than 1e-5)
leaves :func:`load` returning None and callers on the torch path. ``TAMING_NATIVE_KERNELS=0``
disables them.

Numerics: fp32 throughout, the same formulas as the torch ops (max-subtracted softmax, exact erf
GELU), sums in other orders: results agree with PyTorch's to ~1e-6 relative.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

ENV_DISABLE = "TAMING_NATIVE_KERNELS"
KERNEL_CACHE_ENV = "TAMING_KERNEL_CACHE"
BLOCK = 32  # output columns per packed weight block (two AVX-512 vectors)

_SOURCE = r"""
#include <float.h>

#ifdef USE_LIBMVEC
/* glibc's libmvec has SIMD variants of expf and erff: declaring them lets the loops vectorise
   without -ffast-math. */
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern float erff(float);
#else
extern float expf(float);
extern float erff(float);
#endif

/* qkv: B rows of [q | k | v] (each H*D, head-major), row stride qkv_row. kc, vc: key and value
   caches [B, H, max_len, D] with strides cb, ch, cl (D contiguous). Writes the new key and value
   at position pos, then out[b, h*D:(h+1)*D] = softmax(scale * K[b,h,0..pos] q) V[b,h,0..pos]
   (out: [B, H*D] contiguous). s: scratch of pos+1 floats. */
void decode_attend(const float* qkv, long qkv_row, float* kc, float* vc, long cb, long ch,
                   long cl, long B, long H, long D, long pos, float scale, float* out,
                   float* s) {
  const long C = H * D;
  for (long b = 0; b < B; ++b) {
    const float* row = qkv + b * qkv_row;
    for (long h = 0; h < H; ++h) {
      const float* q = row + h * D;
      const float* kn = row + C + h * D;
      const float* vn = row + 2 * C + h * D;
      float* kk = kc + b * cb + h * ch;
      float* vv = vc + b * cb + h * ch;
      for (long d = 0; d < D; ++d) {
        kk[pos * cl + d] = kn[d];
        vv[pos * cl + d] = vn[d];
      }
      float m = -FLT_MAX;
      for (long l = 0; l <= pos; ++l) {
        const float* kr = kk + l * cl;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (long d = 0; d < D; ++d) acc += q[d] * kr[d];
        acc *= scale;
        s[l] = acc;
        m = acc > m ? acc : m;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (long l = 0; l <= pos; ++l) {
        const float e = expf(s[l] - m);
        s[l] = e;
        sum += e;
      }
      float* o = out + b * C + h * D;
      for (long d = 0; d < D; ++d) o[d] = 0.f;
      for (long l = 0; l <= pos; ++l) {
        const float* vr = vv + l * cl;
        const float p = s[l];
#pragma omp simd
        for (long d = 0; d < D; ++d) o[d] += p * vr[d];
      }
      const float inv = 1.f / sum;
      for (long d = 0; d < D; ++d) o[d] *= inv;
    }
  }
}

#ifdef __AVX512F__
#include <immintrin.h>

int native_has_linear(void) { return 1; }

/* mb (1..8) rows of y[:, n0:n0+32] = act(x W^T + bias) + res; w: the packed block [K][32]. */
static inline __attribute__((always_inline)) void rows_block(
    const float* x, long K, const float* w, const float* bias, const float* res, float* y,
    long N, long n0, int act, const int mb) {
  __m512 a[8][2];
  for (int m = 0; m < mb; ++m) {
    a[m][0] = _mm512_setzero_ps();
    a[m][1] = _mm512_setzero_ps();
  }
  for (long k = 0; k < K; ++k) {
    _mm_prefetch((const char*)(w + (k + 8) * 32), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w + k * 32), w1 = _mm512_loadu_ps(w + k * 32 + 16);
    for (int m = 0; m < mb; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      a[m][0] = _mm512_fmadd_ps(xv, w0, a[m][0]);
      a[m][1] = _mm512_fmadd_ps(xv, w1, a[m][1]);
    }
  }
  const long n = N - n0 < 32 ? N - n0 : 32;
  const __mmask16 k0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
  const __mmask16 k1 = n >= 32 ? (__mmask16)0xFFFF
                       : n <= 16 ? (__mmask16)0 : (__mmask16)((1u << (n - 16)) - 1u);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + n0 + 16) : _mm512_setzero_ps();
  for (int m = 0; m < mb; ++m) {
    float* out = y + m * N + n0;
    _mm512_mask_storeu_ps(out, k0, _mm512_add_ps(a[m][0], b0));
    _mm512_mask_storeu_ps(out + 16, k1, _mm512_add_ps(a[m][1], b1));
    if (act == 1) {
#pragma omp simd
      for (long j = 0; j < n; ++j)
        out[j] = out[j] * 0.5f * (1.f + erff(out[j] * 0.70710678118654752f));
    }
    if (res) {
      const float* r = res + m * N + n0;
#pragma omp simd
      for (long j = 0; j < n; ++j) out[j] += r[j];
    }
  }
}

/* y[M,N] = act(x[M,K] W^T + bias) + res. wp: W packed [ceil(N/32)][K][32], columns past N
   zero. x, y, res: contiguous rows. act: 0 none, 1 GELU (erf). bias, res: may be NULL. */
void linear_rows(const float* x, long M, long K, const float* wp, long N, const float* bias,
                 const float* res, float* y, int act) {
  const long blocks = (N + 31) / 32;
  for (long m0 = 0; m0 < M; m0 += 8) {
    const long mb = M - m0 < 8 ? M - m0 : 8;
    const float* xm = x + m0 * K;
    const float* rm = res ? res + m0 * N : 0;
    float* ym = y + m0 * N;
    for (long nb = 0; nb < blocks; ++nb) {
      const float* w = wp + nb * K * 32;
      const long n0 = nb * 32;
      switch (mb) {
        case 8: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 8); break;
        case 7: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 7); break;
        case 6: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 6); break;
        case 5: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 5); break;
        case 4: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 4); break;
        case 3: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 3); break;
        case 2: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 2); break;
        default: rows_block(xm, K, w, bias, rm, ym, N, n0, act, 1); break;
      }
    }
  }
}
#else
int native_has_linear(void) { return 0; }
#endif

#ifdef NATIVE_PROBE
/* A probe executable: runs every kernel once on small data, so that an instruction the CPU
   lacks (SIGILL) kills this process rather than the caller's. */
int main(void) {
  /* attention: 8 rows, 1 head of 64, positions 0..3; linear: 8 x 64 -> 40 (2 blocks) */
  static float a[8 * 3 * 64], kc[8 * 4 * 64], vc[8 * 4 * 64], w[2 * 64 * 32], o[8 * 64], s[4];
  for (int i = 0; i < 8 * 3 * 64; ++i) a[i] = (float)(i % 7) * 0.1f;
  for (int i = 0; i < 2 * 64 * 32; ++i) w[i] = (float)(i % 5) * 0.01f;
  decode_attend(a, 3 * 64, kc, vc, 4 * 64, 4 * 64, 64, 8, 1, 64, 3, 0.125f, o, s);
#ifdef __AVX512F__
  linear_rows(a, 8, 64, w, 40, w, o, o, 1);
#endif
  return 0;
}
#endif
"""

_COMMON = ["-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd"]
# Most specific first; the first that builds, loads and passes the self-test wins.
_FLAG_SETS = [
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-DUSE_LIBMVEC", *_COMMON,
     "-lmvec", "-lm"],
    ["-O3", "-march=native", *_COMMON, "-lm"],
    ["-O2", *_COMMON, "-lm"],
]

_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int

# (qkv [B,3C], k [B,H,max_len,D], v (same strides as k), pos, n_head, out [B,C], scratch)
AttendFn = Callable[[Tensor, Tensor, Tensor, int, int, Tensor, Tensor], None]
# (x [M,K] contiguous, packed weight, n_out, bias | None, residual [M,N] | None, gelu) -> y
LinearFn = Callable[[Tensor, Tensor, int, Tensor | None, Tensor | None, bool], Tensor]


@dataclass(frozen=True)
class Kernels:
    """The loaded kernels. ``attend``: see the C source's ``decode_attend`` contract;
    ``linear``: y = act(x W^T + b) + residual with W from :func:`pack_linear` (None where the
    build has no AVX-512)."""

    attend: AttendFn
    linear: LinearFn | None


def pack_linear(weight: Tensor) -> Tensor:
    """[N, K] weight -> [ceil(N/32), K, 32] blocks of 32 output columns (zeros past N), the
    layout ``Kernels.linear`` streams: contiguous per block, one pass per row block of 8."""
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    wt = torch.zeros(k, blocks * BLOCK, dtype=torch.float32)
    wt[:, :n] = weight.detach().t()
    return wt.view(k, blocks, BLOCK).permute(1, 0, 2).contiguous()


def compiler() -> str | None:
    """The C compiler to build kernels with: ``$CC``, else ``cc``, else ``gcc``; None if none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (``avx512f``, ...); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Why each kernel library (by its ``what``) did not build in this process, for logs and tests.
_failures: dict[str, list[str]] = {}


def build_failures(what: str) -> list[str]:
    """The reasons, one per flag set tried, that ``what``'s kernels did not build here: compile
    errors (``compile: ...``), probes that died (``probe: ...``; an instruction the CPU lacks, or a
    temporary directory mounted noexec), libraries that would not load (``load: ...``) and
    self-tests that failed (``self-test: ...``). Empty when they built or were never tried."""
    return list(_failures.get(what, []))


def _cpu_signature() -> str:
    """What a ``-march=native`` binary depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def kernel_cache_dir() -> str:
    """Where built kernels are kept between processes: ``$TAMING_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/taming-pipeline/kernels`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(KERNEL_CACHE_ENV) or os.path.join(base, "taming-pipeline", "kernels")


def build_library(cc: str, flags: list[str], directory: str, name: str,
                  source: str = _SOURCE, reasons: list[str] | None = None) -> ctypes.CDLL | None:
    """Compile ``source`` into ``directory/name.so`` and load it, or None on any failure.

    A probe executable built from the same source with ``-DNATIVE_PROBE`` (the source's ``main``
    runs every kernel once) runs first, so that an instruction this CPU lacks kills the probe,
    not the caller. A library that passed its probe is kept in :func:`kernel_cache_dir` under a
    hash of compiler, flags, source and CPU, so later processes (every Ray worker, every
    restart) load it in milliseconds instead of compiling; callers still self-test it. On a
    failure, why is appended to ``reasons`` (see :func:`build_failures`)."""
    key = hashlib.sha256("\0".join([cc, *flags, source, _cpu_signature()]).encode()).hexdigest()
    cached = os.path.join(kernel_cache_dir(), f"{key[:32]}.so")
    if os.path.exists(cached):
        try:
            return ctypes.CDLL(cached)
        except OSError as e:
            logger.debug("cached kernel library %s unusable: %s", cached, e)
    src = os.path.join(directory, f"{name}.c")
    lib = os.path.join(directory, f"{name}.so")
    probe = os.path.join(directory, f"{name}_probe")
    exe_flags = [f for f in flags if f not in ("-shared", "-fPIC")]
    step = "compile"
    try:
        with open(src, "w", encoding="utf-8") as f:
            f.write(source)
        subprocess.run([cc, src, "-o", lib, *flags], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([cc, "-DNATIVE_PROBE", src, "-o", probe, *exe_flags], check=True,
                       capture_output=True, timeout=120)
        step = "probe"
        subprocess.run([probe], check=True, capture_output=True, timeout=30)
        step = "load"
        loaded = ctypes.CDLL(lib)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or b""
        detail = detail.decode(errors="replace")[-600:] if isinstance(detail, bytes) else ""
        reason = f"{step}: {e}{': ' + detail.strip() if detail.strip() else ''}"
        logger.debug("native kernel build failed (%s): %s", " ".join(flags), reason)
        if reasons is not None:
            reasons.append(f"[{' '.join(flags)}] {reason}")
        return None
    _keep(lib, cached)
    return loaded


def _keep(lib: str, cached: str) -> None:
    """Copy a built library into the cache atomically (best effort: a read-only home is fine)."""
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        shutil.copyfile(lib, tmp)
        os.replace(tmp, cached)
    except OSError as e:
        logger.debug("kernel library not cached: %s", e)


def _wrap_attend(lib: ctypes.CDLL) -> AttendFn:
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


K = TypeVar("K")


def build_checked(what: str, source: str, flag_sets: list[list[str]],
                  wrap: Callable[[ctypes.CDLL], K | None],
                  self_test: Callable[[K], bool]) -> K | None:
    """Build ``source`` with the first of ``flag_sets`` that compiles, passes its probe and
    whose ``wrap``-ped kernels pass ``self_test``; None if none does, if there is no C
    compiler, with ``TAMING_NATIVE_KERNELS=0``, or if ``wrap`` declines the built library
    (returns None: e.g. this CPU lacks what makes the kernels worth it). ``what`` names the
    kernels in the logs."""
    if os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    cc = compiler()
    if cc is None:
        logger.info("no C compiler: %s kernels not built, PyTorch's are used", what)
        return None
    reasons = _failures.setdefault(what, [])
    reasons.clear()
    try:
        with tempfile.TemporaryDirectory(prefix="taming-native-") as directory:
            for i, flags in enumerate(flag_sets):
                # the mapped library outlives its file
                lib = build_library(cc, flags, directory, f"kernels_{i}", source, reasons)
                if lib is None:
                    continue
                kernels = wrap(lib)
                if kernels is None:
                    return None
                if self_test(kernels):
                    reasons.clear()
                    return kernels
                reasons.append(f"[{' '.join(flags)}] self-test: results differ from torch's")
                logger.warning("%s kernels (%s) failed their self-test", what, " ".join(flags))
    except OSError as e:  # no writable temporary directory
        reasons.append(f"tempdir: {e}")
    if reasons:
        logger.warning("%s kernels not built, PyTorch's are used: %s", what, reasons[-1])
    return None


def _wrap(lib: ctypes.CDLL) -> Kernels:
    return Kernels(_wrap_attend(lib), _wrap_linear(lib))


def _self_test_no_grad(kernels: Kernels) -> bool:
    with torch.inference_mode():
        return _self_test(kernels)


@functools.cache
def load() -> Kernels | None:
    """The compiled :class:`Kernels`, or None where they are not available. Built once per
    process (module docstring)."""
    return build_checked("native decoding", _SOURCE, _FLAG_SETS, _wrap, _self_test_no_grad)
