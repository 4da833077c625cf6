"""Winograd F(4x4, 3x3) convolution on CPU, fp32: 3x3 stride-1 convolutions with 4x fewer
multiplications, forward and backward (optional C kernels, AVX-512 CPUs).

Why: the VQGAN's time on CPU is its 3x3 convolutions (encoder, decoder and the LPIPS VGG; about
80% of a training step at 64 px), and oneDNN's direct convolution already runs them near this
CPU's fp32 peak. Winograd's minimal filtering computes each 4x4 output tile from a 6x6 input tile
with 36 products per input channel instead of 144: an input transform, 36 independent
[tiles, C] x [C, C_out] matrix products (AVX-512 register blocks of 6 x 32) and an output
transform, in C (:data:`_SOURCE`). Two schedules: per chunk of tiles while the chunk is in cache
(layers whose transformed kernel fits in L2), or the whole batch at once with each transformed
kernel read once (wide layers, small maps). NCHW and channels_last activations (the latter read
with vector loads, the faster). Built at first use through
:func:`pipeline.models.native.build_checked` (probe, self-test, on-disk cache) and threaded with
OpenMP (the libgomp torch already loaded).

Gradients use the same pieces: d/dx is the same convolution of dy with the flipped, transposed
kernel (its transform kept with the weight's while a weight is not trained: the frozen VGG);
d/dw multiplies the input transform by the transform of dy (A dy A^T) in the Winograd
domain and maps back with G^T . G; the bias gradient is a sum. No double backward
(``once_differentiable``).

Numerics: fp32 with the transforms' constants (up to 8): results differ from the direct
convolution by ~1e-6..1e-5 relative (the direct one itself is ~1e-7 from float64), the usual
price of Winograd (cuDNN picks it for fp32 too). Not bit-identical to ``F.conv2d``.

Use: :func:`enable_winograd` turns the eligible ``nn.Conv2d`` modules of a model into
:class:`WinogradConv2d` (same parameters and state dict). At run time a call takes the Winograd
path only for float32 CPU tensors outside CPU autocast with both sides at least ``min_size``
pixels; anything else (bf16 engines, GPU, small maps) runs ``nn.Conv2d``'s own forward. Without
a C compiler, without AVX-512, or with ``TAMING_NATIVE_KERNELS=0``, nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .native import build_checked
from .vqgan import ResnetBlock

logger = logging.getLogger(__name__)

# Where Winograd pays on this project's 2-core Zen4 (fp32, batch 8, channels_last, ms direct ->
# Winograd forward / weight gradient direct -> Winograd): 64 ch at 64 px 11.3 -> 4.8 / 13.3 -> 5.9;
# 128 ch at 32 px 10.9 -> 4.0 / 12.1 -> 5.4; 128 ch at 8 px 0.69 -> 0.23 / 0.86 -> 0.27;
# 256 ch at 16 px 10.5 -> 3.8 / 12.0 -> 4.4; 512 ch at 8 px 11.6 -> 5.9 / 14.9 -> 5.5; 512 ch at
# 4 px 4.5 -> 3.6 / 7.1 -> 3.1. Everywhere, given the right mode (chunked or whole, _SOURCE).
DEFAULT_MIN_SIZE = 4
DEFAULT_MAX_CHANNELS = 512

_SOURCE = r"""
/* Winograd F(4x4, 3x3) transforms for 3x3, stride-1, padding-1 convolutions: fp32, NCHW.

   Tiles: th = ceil(H/4) rows by tw = ceil(W/4) columns per image; tile (a, b) produces output
   rows 4a..4a+3, columns 4b..4b+3 and reads input rows 4a-1..4a+4, columns 4b-1..4b+4 (zeros
   outside the image). T = N*th*tw tiles, tile index t = (n*th + a)*tw + b.
   Work goes by chunks of TB consecutive tiles per thread: transform the chunk into [36][TB][C]
   (36 independent [TB, C] matrices), multiply each by its [C, Co] kernel matrix, transform back.
   A chunk's buffers stay in L2, so the transform domain (2.25x the input) never reaches memory.

   Matrices (points 0, +-1, +-2, inf):
     B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
     A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
   Every kernel works on blocks of CB channels held as the innermost array dimension, so the
   compiler vectorises across channels (one AVX-512 register per row element). */

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define CB 16

/* out[i] = (B^T in)[i] for six rows of CB lanes. */
static inline void bt6(float in[6][CB], float out[6][CB]) {
  for (int k = 0; k < CB; ++k) {
    const float d0 = in[0][k], d1 = in[1][k], d2 = in[2][k], d3 = in[3][k], d4 = in[4][k],
                d5 = in[5][k];
    out[0][k] = 4.f * d0 - 5.f * d2 + d4;
    out[1][k] = -4.f * (d1 + d2) + d3 + d4;
    out[2][k] = 4.f * (d1 - d2) - d3 + d4;
    out[3][k] = 2.f * (d3 - d1) - d2 + d4;
    out[4][k] = 2.f * (d1 - d3) - d2 + d4;
    out[5][k] = 4.f * d1 - 5.f * d3 + d5;
  }
}

/* out[i] = (A^T m)[i], i < 4. */
static inline void at6(float m[6][CB], float out[4][CB]) {
  for (int k = 0; k < CB; ++k) {
    const float m0 = m[0][k], m1 = m[1][k], m2 = m[2][k], m3 = m[3][k], m4 = m[4][k],
                m5 = m[5][k];
    const float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
    out[0][k] = m0 + s12 + s34;
    out[1][k] = d12 + 2.f * d34;
    out[2][k] = s12 + 4.f * s34;
    out[3][k] = d12 + 8.f * d34 + m5;
  }
}

/* out[i] = (A y)[i], i < 6, for four rows y (the transpose of at6). */
static inline void a4(float y[4][CB], float out[6][CB]) {
  for (int k = 0; k < CB; ++k) {
    const float y0 = y[0][k], y1 = y[1][k], y2 = y[2][k], y3 = y[3][k];
    out[0][k] = y0;
    out[1][k] = y0 + y1 + y2 + y3;
    out[2][k] = y0 - y1 + y2 - y3;
    out[3][k] = y0 + 2.f * y1 + 4.f * y2 + 8.f * y3;
    out[4][k] = y0 - 2.f * y1 + 4.f * y2 - 8.f * y3;
    out[5][k] = y3;
  }
}

/* An optional prologue on the input as it is loaded (inference): v = v * scale[n][c] + shift[n][c]
   (a GroupNorm folded into per-image, per-channel affine terms), then SiLU if silu. Applied to
   pixels inside the image only: the padding stays zero, as it is for the normalised map. */
typedef struct {
  const float* scale; /* [N][C] */
  const float* shift; /* [N][C] */
  int silu;
} Pre;

#if defined(__AVX512F__)
/* exp(x) for |x| <= 88: Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial, vscalefps. */
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);
}
#endif

static void apply_pre(const Pre* pre, long n, long C, long c0, float* v) {
  const float* sc = pre->scale + n * C + c0;
  const float* sh = pre->shift + n * C + c0;
#if defined(__AVX512F__)
  __m512 a = _mm512_fmadd_ps(_mm512_loadu_ps(v), _mm512_loadu_ps(sc), _mm512_loadu_ps(sh));
  if (pre->silu) /* a / (1 + exp(-a)) */
    a = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f),
                                       exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
  _mm512_storeu_ps(v, a);
#else
  for (int l = 0; l < CB; ++l) {
    const float a = v[l] * sc[l] + sh[l];
    v[l] = pre->silu ? a / (1.f + expf(-a)) : a;
  }
#endif
}

/* Tile loads and stores, one per layout. A tile block is CB channels of one tile with the
   channels innermost: d[i][j][k] is channel c0+k at tile row i, column j (zeros outside the
   image and for lanes k >= kc). NCHW gathers each channel's 6x6 patch (scalar loads); NHWC
   reads CB consecutive channels per pixel (vector loads). */
static void load_nchw(const float* x, long C, long H, long W, long n, long y0, long x0, long c0,
                      long kc, int rows, int cols, float* d, const Pre* pre) {
  (void)pre; /* the prologue is channels_last only (wino_conv checks) */
  const int inside = y0 >= 0 && y0 + rows <= H && x0 >= 0 && x0 + cols <= W;
  if (!inside || kc < CB) memset(d, 0, sizeof(float) * rows * cols * CB);
  for (long k = 0; k < kc; ++k) {
    const float* plane = x + ((n * C + c0 + k) * H) * W;
    for (int i = 0; i < rows; ++i) {
      const long yy = y0 + i;
      if (yy < 0 || yy >= H) continue;
      const float* row = plane + yy * W;
      for (int j = 0; j < cols; ++j) {
        const long xx = x0 + j;
        if (inside || (xx >= 0 && xx < W)) d[(i * cols + j) * CB + k] = row[xx];
      }
    }
  }
}

static void load_nhwc(const float* x, long C, long H, long W, long n, long y0, long x0, long c0,
                      long kc, int rows, int cols, float* d, const Pre* pre) {
  for (int i = 0; i < rows; ++i) {
    const long yy = y0 + i;
    for (int j = 0; j < cols; ++j) {
      const long xx = x0 + j;
      float* dst = d + (i * cols + j) * CB;
      if (yy < 0 || yy >= H || xx < 0 || xx >= W) {
        memset(dst, 0, sizeof(float) * CB);
      } else {
        const float* src = x + ((n * H + yy) * W + xx) * C + c0;
        if (kc == CB) {
          memcpy(dst, src, sizeof(float) * CB);
          if (pre) apply_pre(pre, n, C, c0, dst); /* callers give pre with full blocks only */
        } else {
          memset(dst, 0, sizeof(float) * CB);
          memcpy(dst, src, sizeof(float) * kc);
        }
      }
    }
  }
}

/* Store the 4x4 tile o (same layout as the loads) at rows yb.., columns xb.., clipped. */
static void store_nchw(const float* o, float* y, long C, long H, long W, long n, long yb,
                       long xb, long c0, long kc) {
  const long hi = H - yb < 4 ? H - yb : 4, wj = W - xb < 4 ? W - xb : 4;
  for (long k = 0; k < kc; ++k) {
    float* plane = y + ((n * C + c0 + k) * H) * W;
    for (long i = 0; i < hi; ++i) {
      float* row = plane + (yb + i) * W + xb;
      for (long j = 0; j < wj; ++j) row[j] = o[(i * 4 + j) * CB + k];
    }
  }
}

static void store_nhwc(const float* o, float* y, long C, long H, long W, long n, long yb,
                       long xb, long c0, long kc) {
  const long hi = H - yb < 4 ? H - yb : 4, wj = W - xb < 4 ? W - xb : 4;
  for (long i = 0; i < hi; ++i)
    for (long j = 0; j < wj; ++j)
      memcpy(y + ((n * H + yb + i) * W + xb + j) * C + c0, o + (i * 4 + j) * CB,
             sizeof(float) * kc);
}

/* The 36 transformed vectors of input tile (n, a, b), channels c0..c0+kc-1 (kc <= CB; lanes
   past kc are zero): dst[p*ds + k] = (B^T d B)[p/6][p%6] for channel c0+k. */
static void input_tile(const float* x, int nhwc, long C, long H, long W, long n, long a, long b,
                       long c0, long kc, float* dst, long ds, const Pre* pre) {
  float d[6][6][CB], r[6][6][CB], col[6][CB], out[6][CB];
  (nhwc ? load_nhwc : load_nchw)(x, C, H, W, n, 4 * a - 1, 4 * b - 1, c0, kc, 6, 6, &d[0][0][0],
                                 pre);
  for (int j = 0; j < 6; ++j) { /* columns, then rows */
    for (int i = 0; i < 6; ++i) memcpy(col[i], d[i][j], sizeof col[i]);
    bt6(col, out);
    for (int i = 0; i < 6; ++i) memcpy(r[i][j], out[i], sizeof out[i]);
  }
  for (int i = 0; i < 6; ++i) {
    bt6(r[i], out);
    for (int j = 0; j < 6; ++j) memcpy(dst + (6 * i + j) * ds, out[j], sizeof out[j]);
  }
}

/* The A-transform (A g A^T) of the 4x4 output-gradient tile (n, a, b), channels c0..c0+kc-1:
   dst[p*ds + k]. */
static void grad_tile(const float* dy, int nhwc, long C, long H, long W, long n, long a, long b,
                      long c0, long kc, float* dst, long ds) {
  float g[4][4][CB], r[6][4][CB], col[4][CB], out[6][CB];
  (nhwc ? load_nhwc : load_nchw)(dy, C, H, W, n, 4 * a, 4 * b, c0, kc, 4, 4, &g[0][0][0], NULL);
  for (int j = 0; j < 4; ++j) {
    for (int i = 0; i < 4; ++i) memcpy(col[i], g[i][j], sizeof col[i]);
    a4(col, out);
    for (int i = 0; i < 6; ++i) memcpy(r[i][j], out[i], sizeof out[i]);
  }
  for (int i = 0; i < 6; ++i) {
    a4(r[i], out);
    for (int j = 0; j < 6; ++j) memcpy(dst + (6 * i + j) * ds, out[j], sizeof out[j]);
  }
}

/* y tile (n, a, b), channels c0..c0+kc-1, from src[p*ds + k]: A^T m A + bias. */
static void output_tile(const float* src, long ds, const float* bias, float* y, int nhwc, long C,
                        long H, long W, long n, long a, long b, long c0, long kc) {
  float m[6][6][CB], r[4][6][CB], col[6][CB], out4[4][CB], o[4][4][CB], bv[CB];
  for (long k = 0; k < CB; ++k) bv[k] = (bias && k < kc) ? bias[c0 + k] : 0.f;
  for (int p = 0; p < 36; ++p) memcpy(m[p / 6][p % 6], src + p * ds, sizeof m[0][0]);
  for (int j = 0; j < 6; ++j) {
    for (int i = 0; i < 6; ++i) memcpy(col[i], m[i][j], sizeof col[i]);
    at6(col, out4);
    for (int i = 0; i < 4; ++i) memcpy(r[i][j], out4[i], sizeof out4[i]);
  }
  for (int i = 0; i < 4; ++i) {
    at6(r[i], out4);
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < CB; ++k) o[i][j][k] = out4[j][k] + bv[k];
  }
  (nhwc ? store_nhwc : store_nchw)(&o[0][0][0], y, C, H, W, n, 4 * a, 4 * b, c0, kc);
}

#if defined(__AVX512F__)
/* One register block: Cm[r][16v + l] (+)= sum_k A(r, k) B[k][16v + l] for r < MR, v < NV.
   6 x 32 (12 accumulators, 2 loads and 6 broadcasts per k) ran at ~113 GFLOP/s per Zen4 core,
   against ~75 for 4 x 64: fewer loads per multiply-add. */
#define GEMM_BLOCK(MR, NV)                                                                     \
  static void gemm_##MR##x##NV(const float* A, long ars, long aks, long K, const float* B,     \
                               long ldb, float* Cm, long ldc, int acc) {                       \
    __m512 c[MR][NV];                                                                          \
    for (int r = 0; r < MR; ++r)                                                               \
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();                              \
    for (long k = 0; k < K; ++k) {                                                             \
      __m512 b[NV];                                                                            \
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);               \
      const float* ak = A + k * aks;                                                           \
      for (int r = 0; r < MR; ++r) {                                                           \
        const __m512 av = _mm512_set1_ps(ak[r * ars]);                                         \
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(av, b[v], c[r][v]);             \
      }                                                                                        \
    }                                                                                          \
    for (int r = 0; r < MR; ++r)                                                               \
      for (int v = 0; v < NV; ++v) {                                                           \
        float* cr = Cm + r * ldc + 16 * v;                                                     \
        _mm512_storeu_ps(cr, acc ? _mm512_add_ps(c[r][v], _mm512_loadu_ps(cr)) : c[r][v]);     \
      }                                                                                        \
  }
GEMM_BLOCK(1, 1) GEMM_BLOCK(2, 1) GEMM_BLOCK(3, 1) GEMM_BLOCK(4, 1) GEMM_BLOCK(5, 1)
GEMM_BLOCK(6, 1) GEMM_BLOCK(1, 2) GEMM_BLOCK(2, 2) GEMM_BLOCK(3, 2) GEMM_BLOCK(4, 2)
GEMM_BLOCK(5, 2) GEMM_BLOCK(6, 2)
typedef void (*gemm_block)(const float*, long, long, long, const float*, long, float*, long,
                           int);
static const gemm_block GEMM_BLOCKS[2][6] = {
    {gemm_1x1, gemm_2x1, gemm_3x1, gemm_4x1, gemm_5x1, gemm_6x1},
    {gemm_1x2, gemm_2x2, gemm_3x2, gemm_4x2, gemm_5x2, gemm_6x2}};
#endif

/* Cm[r][j] (+)= sum_k A(r, k) B[k][j] for r < rows, j < ncols (a multiple of 16), k < K, with
   A(r, k) = A[r*ars + k*aks], B[k][j] = B[k*ldb + j], Cm[r][j] = Cm[r*ldc + j]. acc: add to Cm
   instead of overwriting. Column panels of 32 (B's panel stays in L1), register blocks of 6
   rows. */
static void gemm(const float* A, long ars, long aks, long rows, long K, const float* B, long ldb,
                 long ncols, float* Cm, long ldc, int acc) {
#if defined(__AVX512F__)
  for (long j0 = 0; j0 < ncols; j0 += 32) {
    const int nv = ncols - j0 >= 32 ? 2 : 1;
    for (long r0 = 0; r0 < rows; r0 += 6) {
      const long mr = rows - r0 < 6 ? rows - r0 : 6;
      GEMM_BLOCKS[nv - 1][mr - 1](A + r0 * ars, ars, aks, K, B + j0, ldb, Cm + r0 * ldc + j0, ldc,
                                  acc);
    }
  }
#else
  for (long r = 0; r < rows; ++r) {
    float* cr = Cm + r * ldc;
    if (!acc) memset(cr, 0, ncols * sizeof(float));
    for (long k = 0; k < K; ++k) {
      const float av = A[r * ars + k * aks];
      const float* bk = B + k * ldb;
      for (long j = 0; j < ncols; ++j) cr[j] += av * bk[j];
    }
  }
#endif
}

/* Two ways to run the 36 products. "Chunked": per chunk of tiles, all 36 products against the
   whole U (U = 36 x C x Co floats is re-read per chunk, from L2 or L3). "Whole": transform every
   tile first, then each U[p] panel once against all tiles (U read once; the transform domain goes
   through memory). mode: 0 chunked, 1 whole, -1 choose: whole where U exceeds `limit` bytes,
   or where U outgrows L2 and the whole transform domain (36 x T x (C + Co) floats) is small.
   Measured inside a training step (batch 8, 2 threads, where U is cold; ms per call, chunked /
   whole): forward 128->128 at 32 px 8.4/12.4, 256->256 at 16 px 9.7/5.3; weight gradient
   64->64 at 64 px 5.9/10.3, 128->128 at 16 px 1.7/1.0. */
#define FORWARD_WHOLE_ABOVE (4L << 20)
#define WGRAD_WHOLE_ABOVE (640L << 10)
static int whole_mode(int mode, long C, long Co, long T, long limit) {
  const long u = 36 * C * Co * (long)sizeof(float);
  const long domain = 36 * T * (C + Co) * (long)sizeof(float);
  return mode >= 0 ? mode : u > limit || (u > (640L << 10) && domain <= (8L << 20));
}

/* Tiles per chunk: `floats` bounds each transform-domain buffer (36 x TB x channels) so that the
   chunk's buffers and U stay in L2 (1 MB on Zen4) between the steps, and small maps still get
   ~4 chunks per thread. Whole register blocks of 6 rows. Measured at 64 channels, 64 px: the
   forward ran ~25% faster with 12 tiles than with 24; the weight gradient, whose GEMM runs
   over the tiles (K = TB), best at 24..36. */
static long chunk_tiles(long C, long Co, long T, int threads, long floats) {
  const long widest = C > Co ? C : Co;
  long tb = floats / (36 * widest);
  const long share = T / (4L * threads);
  if (share < tb) tb = share;
  tb = tb < 6 ? 6 : (tb > 60 ? 60 : tb);
  return tb - tb % 6;
}

/* Tile t (of th x tw tiles per image) over all channel blocks: t's input transform into dst,
   dy's A-transform into dst, or the output transform of src into y. */
static void tile_in(const float* x, int nhwc, long C, long H, long W, long th, long tw, long t,
                    float* dst, long ds, const Pre* pre) {
  const long n = t / (th * tw), a = (t / tw) % th, b = t % tw;
  for (long c0 = 0; c0 < C; c0 += CB)
    input_tile(x, nhwc, C, H, W, n, a, b, c0, CB, dst + c0, ds, pre);
}

static void tile_grad(const float* dy, int nhwc, long Co, long H, long W, long th, long tw, long t,
                      float* dst, long ds) {
  const long n = t / (th * tw), a = (t / tw) % th, b = t % tw;
  for (long c0 = 0; c0 < Co; c0 += CB)
    grad_tile(dy, nhwc, Co, H, W, n, a, b, c0, CB, dst + c0, ds);
}

static void tile_out(const float* src, long ds, const float* bias, float* y, int nhwc, long Co,
                     long H, long W, long th, long tw, long t) {
  const long n = t / (th * tw), a = (t / tw) % th, b = t % tw;
  for (long c0 = 0; c0 < Co; c0 += CB)
    output_tile(src + c0, ds, bias, y, nhwc, Co, H, W, n, a, b, c0, CB);
}

/* Tiles per group of the whole schedule: the transform domain of one group (36 x G x (C + Co)
   floats) stays within group_bytes, so memory stays bounded for large images (at 256 px, batch
   8, 128 channels the whole batch would need 1.2 GB); U is read once per group. */
static long group_tiles(long C, long Co, long T, long group_bytes) {
  long g = group_bytes / (36 * (C + Co) * (long)sizeof(float));
  g = g < 6 ? 6 : g;
  return g < T ? g : T;
}

/* The whole schedule, group by group: transform the group's tiles, then each (p, 32-column
   panel) product over all of them. dy == NULL: the convolution (U, bias -> out = y, then the
   output transform); else the weight gradient (out = dU, one slice, summed over the groups). */
static void run_whole(const float* x, const float* dy, int nhwc, long N, long C, long H, long W,
                      const float* U, long Co, const float* bias, float* out, int threads,
                      long group_bytes, const Pre* pre) {
  const long th = (H + 3) / 4, tw = (W + 3) / 4, T = N * th * tw;
  const long G = group_tiles(C, Co, T, group_bytes), panels = (Co + 31) / 32;
  float* V = aligned_alloc(64, sizeof(float) * 36 * G * C);  /* input transforms */
  float* R = aligned_alloc(64, sizeof(float) * 36 * G * Co); /* products, or dy's transforms */
  for (long g0 = 0; g0 < T; g0 += G) {
    const long nt = T - g0 < G ? T - g0 : G;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (long i = 0; i < nt; ++i) {
        tile_in(x, nhwc, C, H, W, th, tw, g0 + i, V + i * C, G * C, pre);
        if (dy) tile_grad(dy, nhwc, Co, H, W, th, tw, g0 + i, R + i * Co, G * Co);
      }
#pragma omp for schedule(static)
      for (long q = 0; q < 36 * panels; ++q) {
        const long p = q / panels, j0 = (q % panels) * 32, nc = Co - j0 < 32 ? Co - j0 : 32;
        if (dy) /* dU[p] (+)= V[p]^T R[p] */
          gemm(V + p * G * C, 1, C, C, nt, R + p * G * Co + j0, Co, nc, out + p * C * Co + j0,
               Co, g0 > 0);
        else /* R[p] = V[p] U[p] */
          gemm(V + p * G * C, C, 1, nt, C, U + p * C * Co + j0, Co, nc, R + p * G * Co + j0, Co,
               0);
      }
      if (!dy) {
#pragma omp for schedule(static)
        for (long i = 0; i < nt; ++i)
          tile_out(R + i * Co, G * Co, bias, out, nhwc, Co, H, W, th, tw, g0 + i);
      }
    }
  }
  free(V);
  free(R);
}

/* y = conv3x3(x, w) + bias, stride 1, padding 1. x: [N, C, H, W]; U: [36][C][Co] (the
   transformed kernel, contiguous); y: [N, Co, H, W]. C and Co multiples of 16. Fused per chunk
   of tiles: input transform, 36 GEMMs, output transform, all in per-thread buffers. */
void wino_conv(const float* x, int nhwc, long N, long C, long H, long W, const float* U,
               long Co, const float* bias, float* y, int threads, int mode, long group_bytes,
               const float* pre_scale, const float* pre_shift, int pre_silu) {
  const long th = (H + 3) / 4, tw = (W + 3) / 4, T = N * th * tw;
  const Pre pre_terms = {pre_scale, pre_shift, pre_silu};
  const Pre* pre = pre_scale && nhwc && C % CB == 0 ? &pre_terms : NULL;
  if (pre_scale && !pre) return; /* refused: the caller checks layout and channels first */
  if (whole_mode(mode, C, Co, T, FORWARD_WHOLE_ABOVE)) {
    run_whole(x, NULL, nhwc, N, C, H, W, U, Co, bias, y, threads, group_bytes, pre);
    return;
  }
  const long TB = chunk_tiles(C, Co, T, threads, 32768), chunks = (T + TB - 1) / TB;
#pragma omp parallel num_threads(threads)
  {
    float* V = aligned_alloc(64, sizeof(float) * 36 * TB * C);
    float* M = aligned_alloc(64, sizeof(float) * 36 * TB * Co);
#pragma omp for schedule(static)
    for (long ch = 0; ch < chunks; ++ch) {
      const long t0 = ch * TB, nt = T - t0 < TB ? T - t0 : TB;
      for (long i = 0; i < nt; ++i)
        tile_in(x, nhwc, C, H, W, th, tw, t0 + i, V + i * C, TB * C, pre);
      for (int p = 0; p < 36; ++p)
        gemm(V + p * TB * C, C, 1, nt, C, U + p * C * Co, Co, Co, M + p * TB * Co, Co, 0);
      for (long i = 0; i < nt; ++i)
        tile_out(M + i * Co, TB * Co, bias, y, nhwc, Co, H, W, th, tw, t0 + i);
    }
    free(V);
    free(M);
  }
}

/* dU[p] = sum over tiles of V[p]^T dM[p]: the weight gradient in the Winograd domain, for
   x: [N, C, H, W] and dy: [N, Co, H, W]. dU: [wino_wgrad_slices(..)][36][C][Co]: chunked, one
   slice per thread (summed by the caller); whole, one. C and Co multiples of 16. */
void wino_wgrad(const float* x, const float* dy, int nhwc, long N, long C, long H, long W,
                long Co, float* dU, int threads, int mode, long group_bytes) {
  const long th = (H + 3) / 4, tw = (W + 3) / 4, T = N * th * tw;
  if (whole_mode(mode, C, Co, T, WGRAD_WHOLE_ABOVE)) { /* one slice: dU[p] = V[p]^T G[p] */
    run_whole(x, dy, nhwc, N, C, H, W, NULL, Co, NULL, dU, threads, group_bytes, NULL);
    return;
  }
  const long TB = chunk_tiles(C, Co, T, threads, 98304), chunks = (T + TB - 1) / TB;
  memset(dU, 0, sizeof(float) * threads * 36 * C * Co);
#pragma omp parallel num_threads(threads)
  {
    float* V = aligned_alloc(64, sizeof(float) * 36 * TB * C);
    float* G = aligned_alloc(64, sizeof(float) * 36 * TB * Co);
    float* mine = dU + (long)omp_get_thread_num() * 36 * C * Co;
#pragma omp for schedule(static)
    for (long ch = 0; ch < chunks; ++ch) {
      const long t0 = ch * TB, nt = T - t0 < TB ? T - t0 : TB;
      for (long i = 0; i < nt; ++i) {
        tile_in(x, nhwc, C, H, W, th, tw, t0 + i, V + i * C, TB * C, NULL);
        tile_grad(dy, nhwc, Co, H, W, th, tw, t0 + i, G + i * Co, TB * Co);
      }
      for (int p = 0; p < 36; ++p) /* rows: input channels; K: the chunk's tiles */
        gemm(V + p * TB * C, 1, C, C, nt, G + p * TB * Co, Co, Co, mine + p * C * Co, Co, 1);
    }
    free(V);
    free(G);
  }
}

/* 1 when the GEMM above is the AVX-512 one: without it Winograd loses to oneDNN. */
/* The kernel transform U = G w G^T for every (C_out, C) pair of w: [Co][C][3][3].
   back = 0: U[p][c][co] for the convolution itself; back = 1: U[p][co][c] of the flipped kernel,
   the convolution that gives d/dx (its input channels are the Co of w). One pass, written in the
   GEMM's layout (a [36, 9] x [9, C*Co] torch matmul runs at ~10 GFLOP/s here). */
static const float GW[6][3] = {{1.f / 4, 0, 0}, {-1.f / 6, -1.f / 6, -1.f / 6},
                               {-1.f / 6, 1.f / 6, -1.f / 6}, {1.f / 24, 1.f / 12, 1.f / 6},
                               {1.f / 24, -1.f / 12, 1.f / 6}, {0, 0, 1}};

/* u[p][l] = (G g_l G^T)[p] for CB kernels g_l at once (lanes innermost: vectorised). */
static void kernel_tile(float g[9][CB], float u[36][CB]) {
  float t[6][3][CB];
  for (int r = 0; r < 6; ++r)
    for (int b = 0; b < 3; ++b)
      for (int l = 0; l < CB; ++l)
        t[r][b][l] = GW[r][0] * g[b][l] + GW[r][1] * g[3 + b][l] + GW[r][2] * g[6 + b][l];
  for (int r = 0; r < 6; ++r)
    for (int q = 0; q < 6; ++q)
      for (int l = 0; l < CB; ++l)
        u[6 * r + q][l] = t[r][0][l] * GW[q][0] + t[r][1][l] * GW[q][1] + t[r][2][l] * GW[q][2];
}

void wino_weight(const float* w, long Co, long C, int back, float* U, int threads) {
  /* Blocks of CB consecutive output columns of U: co for the forward form, c for the back one
     (both multiples of CB). */
  const long outer = back ? Co : C, inner = back ? C : Co;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long o = 0; o < outer; ++o)
    for (long i0 = 0; i0 < inner; i0 += CB) {
      float g[9][CB], u[36][CB];
      for (int l = 0; l < CB; ++l) {
        const long co = back ? o : i0 + l, c = back ? i0 + l : o;
        const float* k = w + (co * C + c) * 9;
        for (int e = 0; e < 9; ++e) g[e][l] = k[back ? 8 - e : e];
      }
      kernel_tile(g, u);
      for (int p = 0; p < 36; ++p) memcpy(U + p * C * Co + o * inner + i0, u[p], sizeof u[p]);
    }
}

/* The adjoint: dw[co][c][a][b] = sum_{r,q} G[r][a] G[q][b] dU[6r+q][c][co]. */
void wino_weight_grad(const float* dU, long C, long Co, float* dw, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long c = 0; c < C; ++c)
    for (long co0 = 0; co0 < Co; co0 += CB) {
      float du[36][CB], t[6][3][CB], k[9][CB];
      for (int p = 0; p < 36; ++p) memcpy(du[p], dU + p * C * Co + c * Co + co0, sizeof du[p]);
      for (int r = 0; r < 6; ++r)
        for (int b = 0; b < 3; ++b)
          for (int l = 0; l < CB; ++l) {
            float acc = 0.f;
            for (int q = 0; q < 6; ++q) acc += du[6 * r + q][l] * GW[q][b];
            t[r][b][l] = acc;
          }
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b)
          for (int l = 0; l < CB; ++l) {
            float acc = 0.f;
            for (int r = 0; r < 6; ++r) acc += GW[r][a] * t[r][b][l];
            k[3 * a + b][l] = acc;
          }
      for (int l = 0; l < CB; ++l)
        for (int e = 0; e < 9; ++e) dw[((co0 + l) * C + c) * 9 + e] = k[e][l];
    }
}

/* Per-image, per-channel sums of a channels_last map x: [N][HW][C] -> s1[n][c] = sum x,
   s2[n][c] = sum x^2, in double (GroupNorm statistics in one read). */
void nhwc_channel_sums(const float* x, long N, long HW, long C, double* s1, double* s2,
                       int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long n = 0; n < N; ++n) {
    double* a = s1 + n * C;
    double* b = s2 + n * C;
    for (long c = 0; c < C; ++c) a[c] = b[c] = 0.0;
    for (long i = 0; i < HW; ++i) {
      const float* row = x + (n * HW + i) * C;
      for (long c = 0; c < C; ++c) {
        const double v = row[c];
        a[c] += v;
        b[c] += v * v;
      }
    }
  }
}

/* How many [36][C][Co] slices wino_wgrad writes (summed by the caller). */
long wino_wgrad_slices(long N, long C, long H, long W, long Co, int threads, int mode) {
  const long T = N * ((H + 3) / 4) * ((W + 3) / 4);
  return whole_mode(mode, C, Co, T, WGRAD_WHOLE_ABOVE) ? 1 : threads;
}

int wino_has_avx512(void) {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

#ifdef NATIVE_PROBE
int main(void) {
  static float x[2 * 16 * 9 * 7], U[36 * 16 * 16], y[2 * 16 * 9 * 7], dU[2 * 36 * 16 * 16];
  for (int i = 0; i < 2 * 16 * 9 * 7; ++i) x[i] = (float)(i % 13) - 6.f;
  for (int i = 0; i < 36 * 16 * 16; ++i) U[i] = (float)(i % 7) - 3.f;
  for (int nhwc = 0; nhwc < 2; ++nhwc) {
    for (int mode = 0; mode < 2; ++mode) {
      wino_conv(x, nhwc, 2, 16, 9, 7, U, 16, 0, y, 2, mode, 1 << 20, x, x, nhwc);
      wino_wgrad(x, y, nhwc, 2, 16, 9, 7, 16, dU, 2, mode, 1 << 20);
    }
  }
  return 0;
}
#endif
"""

# One flag set: without -march=native there is no AVX-512 GEMM, and _wrap declines the library.
_FLAG_SETS = [["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm"]]

# G (6x3) of F(4x4, 3x3): U = G w G^T maps a 3x3 kernel into the 6x6 Winograd domain.
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                  dtype=torch.float64)
# kron(G, G): [36, 9], row 6i+l, column 3j+k = G[i, j] G[l, k]; U_flat = KG @ w_flat.
_KG = torch.kron(_G, _G).float()

_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int


def weight_transform(weight: Tensor) -> Tensor:
    """[C_out, C, 3, 3] -> U: [36, C, C_out] contiguous, U[p] = (G w G^T)[p]. The definition in
    torch (any dtype); the layers use :meth:`Kernels.weight`, its C twin."""
    co, c = weight.shape[:2]
    u = _KG.to(weight.dtype) @ weight.permute(2, 3, 1, 0).reshape(9, c * co)
    return u.view(36, c, co)


def weight_grad_from_domain(du: Tensor) -> Tensor:
    """dU: [36, C, C_out] -> dw: [C_out, C, 3, 3] (the adjoint of :func:`weight_transform`). The
    definition in torch; the layers use :meth:`Kernels.weight_from_domain`."""
    _, c, co = du.shape
    dw = _KG.t().to(du.dtype) @ du.reshape(36, c * co)  # [9, C*C_out]
    return dw.view(3, 3, c, co).permute(3, 2, 0, 1).contiguous()


def channels_last(x: Tensor) -> bool:
    """True where the kernels should read and write ``x`` as NHWC: it is channels_last and not
    also plain contiguous (a tensor can be both, e.g. with one channel)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _format(nhwc: bool) -> torch.memory_format:
    return torch.channels_last if nhwc else torch.contiguous_format


@dataclass(frozen=True)
class Kernels:
    """The C kernels (module docstring); tensors float32, channel counts multiples of 16. The
    activations are NCHW contiguous or channels_last (NHWC in memory, read with vector loads:
    the faster of the two); outputs come back in the input's format."""

    lib: ctypes.CDLL
    # -1: the kernels choose chunked or whole per layer (see _SOURCE); 0 / 1 force one (tests)
    mode: int = -1
    # bound on the whole schedule's transform-domain buffers (tiles go in groups that fit)
    group_bytes: int = 32 << 20

    def conv(self, x: Tensor, u: Tensor, bias: Tensor | None,
             pre: tuple[Tensor, Tensor, bool] | None = None) -> Tensor:
        """x: [N, C, H, W], u: [36, C, C_out] from :func:`weight_transform` -> y: [N, C_out, H, W]
        = conv3x3(x, w) + bias, padding 1, in x's memory format.

        ``pre = (scale, shift, silu)`` (scale, shift: [N, C] float32; channels_last x only):
        convolve ``silu(x * scale + shift)`` (SiLU if ``silu``) instead of x, the prologue
        applied as tiles load, so the normalised map is never written (see
        :meth:`group_norm_terms`)."""
        nhwc = channels_last(x)
        x = x.contiguous(memory_format=_format(nhwc))
        n, c, h, w = x.shape
        if pre is not None and not (nhwc and c % 16 == 0):
            raise ValueError("pre: needs a channels_last input with channels a multiple of 16")
        y = torch.empty(n, u.shape[2], h, w, memory_format=_format(nhwc))
        bias = None if bias is None else bias.contiguous()
        scale, shift = (None, None) if pre is None else (t.float().contiguous() for t in pre[:2])
        self.lib.wino_conv(x.data_ptr(), int(nhwc), n, c, h, w, u.data_ptr(), u.shape[2],
                           None if bias is None else bias.data_ptr(), y.data_ptr(),
                           torch.get_num_threads(), self.mode, self.group_bytes,
                           None if scale is None else scale.data_ptr(),
                           None if shift is None else shift.data_ptr(),
                           int(pre is not None and pre[2]))
        return y

    def group_norm_terms(self, x: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
        """``norm(x) == x * scale + shift`` with per-image, per-channel scale, shift: [N, C]
        (float32), for a channels_last float32 x: one read of x (statistics in float64)."""
        x = x.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        s1 = torch.empty(n, c, dtype=torch.float64)
        s2 = torch.empty(n, c, dtype=torch.float64)
        self.lib.nhwc_channel_sums(x.data_ptr(), n, h * w, c, s1.data_ptr(), s2.data_ptr(),
                                   torch.get_num_threads())
        g = norm.num_groups
        count = h * w * (c // g)
        mean = s1.view(n, g, -1).sum(-1) / count  # [N, G]
        var = (s2.view(n, g, -1).sum(-1) / count - mean * mean).clamp_min(0)
        rstd = (var + norm.eps).rsqrt()
        scale = rstd.repeat_interleave(c // g, dim=1)  # [N, C]
        shift = -mean.repeat_interleave(c // g, dim=1) * scale
        if norm.affine:
            scale = scale * norm.weight.detach().double()
            shift = shift * norm.weight.detach().double() + norm.bias.detach().double()
        return scale.float(), shift.float()

    def weight(self, w: Tensor, back: bool = False) -> Tensor:
        """:func:`weight_transform` of w [C_out, C, 3, 3] -> [36, C, C_out]; ``back``: that of the
        flipped, transposed kernel (the input gradient's convolution) -> [36, C_out, C]."""
        w = w.detach().contiguous()
        co, c = w.shape[:2]
        u = torch.empty(36, co, c) if back else torch.empty(36, c, co)
        self.lib.wino_weight(w.data_ptr(), co, c, int(back), u.data_ptr(),
                             torch.get_num_threads())
        return u

    def weight_from_domain(self, du: Tensor) -> Tensor:
        """:func:`weight_grad_from_domain`: dU [36, C, C_out] -> dw [C_out, C, 3, 3]."""
        du = du.contiguous()
        _, c, co = du.shape
        dw = torch.empty(co, c, 3, 3)
        self.lib.wino_weight_grad(du.data_ptr(), c, co, dw.data_ptr(), torch.get_num_threads())
        return dw

    def weight_grad(self, x: Tensor, dy: Tensor) -> Tensor:
        """x: [N, C, H, W], dy: [N, C_out, H, W] (any formats) -> dU: [36, C, C_out], the weight
        gradient in the Winograd domain (:meth:`weight_from_domain` maps it back)."""
        nhwc = channels_last(x)
        x, dy = (t.contiguous(memory_format=_format(nhwc)) for t in (x, dy))
        n, c, h, w = x.shape
        threads, co = torch.get_num_threads(), dy.shape[1]
        slices = self.lib.wino_wgrad_slices(n, c, h, w, co, threads, self.mode)
        du = torch.empty(slices, 36, c, co)
        self.lib.wino_wgrad(x.data_ptr(), dy.data_ptr(), int(nhwc), n, c, h, w, co,
                            du.data_ptr(), threads, self.mode, self.group_bytes)
        return du.sum(0) if len(du) > 1 else du[0]


class WeightDomain:
    """A 3x3 weight's Winograd-domain forms, each computed on first use and then kept: ``u`` for
    the convolution, ``back`` (the flipped, transposed kernel's) for its input gradient."""

    def __init__(self, k: Kernels, weight: Tensor):
        self.kernels, self.weight = k, weight.detach()
        self._u: Tensor | None = None
        self._back: Tensor | None = None

    @property
    def u(self) -> Tensor:
        if self._u is None:
            self._u = self.kernels.weight(self.weight)
        return self._u

    @property
    def back(self) -> Tensor:
        if self._back is None:
            self._back = self.kernels.weight(self.weight, back=True)
        return self._back


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                dom: WeightDomain) -> Tensor:
        """dom: ``weight``'s :class:`WeightDomain` (passed in so that callers may cache it)."""
        x = x.contiguous(memory_format=_format(channels_last(x)))
        ctx.save_for_backward(x, weight)
        ctx.dom, ctx.has_bias = dom, bias is not None
        return dom.kernels.conv(x, dom.u, None if bias is None else bias.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, _ = ctx.saved_tensors  # the weight is saved for autograd's in-place version check
        dom: WeightDomain = ctx.dom
        k = dom.kernels
        dy = dy.contiguous(memory_format=_format(channels_last(x)))
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # the same convolution with the flipped, transposed kernel
            dx = k.conv(dy, dom.back, None)
        if ctx.needs_input_grad[1]:
            dw = k.weight_from_domain(k.weight_grad(x, dy))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                    kernels: Kernels | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel by Winograd F(4x4, 3x3).

    x: [N, C, H, W] float32 on CPU; weight [C_out, C, 3, 3]. Differentiable in all three.
    Raises RuntimeError where the kernels are unavailable (see :func:`load`)."""
    k = kernels or load()
    if k is None:
        raise RuntimeError("Winograd kernels unavailable (no C compiler, or disabled)")
    if weight.shape[2:] != (3, 3) or x.dim() != 4:
        raise ValueError(f"need a 3x3 kernel and a 4-d input, got {tuple(weight.shape)}, "
                         f"{tuple(x.shape)}")
    return _WinogradConv.apply(x, weight, bias, WeightDomain(k, weight))


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1) whose eligible calls run by Winograd.

    Made by :func:`enable_winograd` (class swap: parameters, buffers, hooks and state-dict keys
    are untouched). A call goes to Winograd for float32 CPU tensors outside CPU autocast whose
    height and width are at least ``winograd_min_size``; any other call is ``nn.Conv2d``'s."""

    winograd_min_size: int = DEFAULT_MIN_SIZE

    def forward(self, x: Tensor) -> Tensor:
        k = load()
        if k is None or not self._winograd_call(x):
            return super().forward(x)
        return _WinogradConv.apply(x, self.weight, self.bias, self._weight_domain(k))

    def _weight_domain(self, k: Kernels) -> WeightDomain:
        """The weight's :class:`WeightDomain`; for a weight that is not being trained (inference,
        the frozen LPIPS) kept until the weight changes in place. A trained weight changes every
        step: no cache, so nothing can go stale when an engine swaps parameter storage."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            self.__dict__.pop("_winograd_domain", None)
            return WeightDomain(k, w)
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_winograd_domain")
        if cached is None or cached[0] != key:
            cached = (key, WeightDomain(k, w))
            self.__dict__["_winograd_domain"] = cached
        return cached[1]

    def _winograd_call(self, x: Tensor) -> bool:
        return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
                and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and min(x.shape[2], x.shape[3]) >= self.winograd_min_size)


class FusedResnetBlock(ResnetBlock):
    """A VQGAN :class:`~pipeline.models.vqgan.ResnetBlock` whose inference calls on
    channels_last float32 CPU maps fold each GroupNorm + SiLU into the next Winograd
    convolution's tile loads (:meth:`Kernels.conv` ``pre``): the normalised map is never written
    or read back. Same function to ~1e-6 relative. Made by :func:`enable_winograd` (class swap,
    same state dict); calls that need a gradient, or that the Winograd layers would not take,
    run ResnetBlock's own forward."""

    def forward(self, x: Tensor) -> Tensor:
        k = load()
        if k is None or not self._fusable(x):
            return super().forward(x)
        h = k.conv(x, self.conv1._weight_domain(k).u, self.conv1.bias,
                   (*k.group_norm_terms(x, self.norm1), True))
        h = k.conv(h, self.conv2._weight_domain(k).u, self.conv2.bias,
                   (*k.group_norm_terms(h, self.norm2), True))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return h.add_(x)

    def _fusable(self, x: Tensor) -> bool:
        convs = (self.conv1, self.conv2)
        return (not (torch.is_grad_enabled() and (x.requires_grad or any(
                    p.requires_grad for p in self.parameters())))
                and not (self.training and self.dropout.p > 0)
                and all(isinstance(c, WinogradConv2d) for c in convs)  # channels fit
                and channels_last(x) and self.conv1._winograd_call(x)
                and self.conv2._winograd_call(x))  # same height and width


def eligible(conv: nn.Module, max_channels: int = DEFAULT_MAX_CHANNELS) -> bool:
    """A plain 3x3, stride-1, padding-1, ungrouped, zero-padded 2-d convolution whose channel
    counts are multiples of 16 (the kernels' vector width) and at most ``max_channels``."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"
            and all(c % 16 == 0 and c <= max_channels
                    for c in (conv.in_channels, conv.out_channels)))


def enable_winograd(model: nn.Module, min_size: int = DEFAULT_MIN_SIZE,
                    max_channels: int = DEFAULT_MAX_CHANNELS) -> int:
    """Turn every eligible ``nn.Conv2d`` in ``model`` into a :class:`WinogradConv2d`, and every
    VQGAN ``ResnetBlock`` into a :class:`FusedResnetBlock`; returns how many convolutions
    changed. 0 (model untouched) where the kernels cannot be built here."""
    if load() is None:
        return 0
    count = 0
    for m in model.modules():
        if eligible(m, max_channels):
            m.__class__ = WinogradConv2d
            m.winograd_min_size = min_size
            count += 1
        elif type(m) is ResnetBlock:
            m.__class__ = FusedResnetBlock
    return count


def disable_winograd(model: nn.Module) -> int:
    """Undo :func:`enable_winograd`; returns how many modules went back to ``nn.Conv2d``."""
    count = 0
    for m in model.modules():
        if type(m) is FusedResnetBlock:
            m.__class__ = ResnetBlock
        if type(m) is WinogradConv2d:
            m.__class__ = nn.Conv2d
            m.__dict__.pop("winograd_min_size", None)
            m.__dict__.pop("_winograd_domain", None)
            count += 1
    return count


def _wrap(lib: ctypes.CDLL) -> Kernels | None:
    if not lib.wino_has_avx512():
        # The portable GEMM loop is far slower than oneDNN's direct convolution.
        logger.info("no AVX-512: convolutions stay on oneDNN's direct kernels")
        return None
    lib.wino_conv.argtypes = [_PTR, _INT, _LONG, _LONG, _LONG, _LONG, _PTR, _LONG, _PTR, _PTR,
                              _INT, _INT, _LONG, _PTR, _PTR, _INT]
    lib.wino_conv.restype = None
    lib.wino_wgrad.argtypes = [_PTR, _PTR, _INT, _LONG, _LONG, _LONG, _LONG, _LONG, _PTR, _INT,
                               _INT, _LONG]
    lib.wino_wgrad_slices.argtypes = [_LONG, _LONG, _LONG, _LONG, _LONG, _INT, _INT]
    lib.wino_weight.argtypes = [_PTR, _LONG, _LONG, _INT, _PTR, _INT]
    lib.wino_weight.restype = None
    lib.wino_weight_grad.argtypes = [_PTR, _LONG, _LONG, _PTR, _INT]
    lib.wino_weight_grad.restype = None
    lib.nhwc_channel_sums.argtypes = [_PTR, _LONG, _LONG, _LONG, _PTR, _PTR, _INT]
    lib.nhwc_channel_sums.restype = None
    lib.wino_wgrad_slices.restype = _LONG
    lib.wino_wgrad.restype = None
    return Kernels(lib)


def _self_test(k: Kernels) -> bool:
    """Forward and all three gradients against F.conv2d on odd shapes (borders, channel
    remainders), in float64 for the reference, both layouts and both modes."""
    # whole with small groups: several groups per call on these shapes
    return all(_check(Kernels(k.lib, mode, group_bytes)) for mode, group_bytes in
               ((0, k.group_bytes), (1, k.group_bytes), (1, 36 * 128 * 4 * 8)))


def _check(k: Kernels) -> bool:
    gen = torch.Generator().manual_seed(0)
    for n, c, co, h, w in ((2, 16, 32, 16, 16), (1, 32, 16, 13, 10), (2, 48, 80, 7, 9)):
        x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
        wt = torch.randn(co, c, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(co, generator=gen, dtype=torch.float64, requires_grad=True)
        ref = F.conv2d(x, wt, b, padding=1)
        dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, (x, wt, b), dy)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.detach().float().contiguous(memory_format=fmt).requires_grad_()
            wf, bf = (t.detach().float().requires_grad_() for t in (wt, b))
            y = _WinogradConv.apply(xf, wf, bf, WeightDomain(k, wf))
            grads = torch.autograd.grad(y, (xf, wf, bf), dy.float())
            for got, want in zip((y, *grads), (ref, *ref_grads), strict=True):
                scale = want.abs().max().item()
                if (got.double() - want).abs().max().item() > 1e-4 * scale:
                    return False
        # the GroupNorm + SiLU prologue (channels_last, inference)
        norm = nn.GroupNorm(c // 8, c, eps=1e-6).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
            norm.bias.normal_(generator=gen)
            want = F.conv2d(F.silu(norm(x)), wt, b, padding=1)
            xl = x.detach().float().contiguous(memory_format=torch.channels_last)
            got = k.conv(xl, k.weight(wt.float()), b.float(),
                         (*k.group_norm_terms(xl, norm.float()), True))
        if (got.double() - want).abs().max().item() > 1e-4 * want.abs().max().item():
            return False
    return True


@functools.cache
def load() -> Kernels | None:
    """The compiled :class:`Kernels`, or None where unavailable (no compiler, build or self-test
    failure, ``TAMING_NATIVE_KERNELS=0``). Built once per process (~1 s)."""
    return build_checked("Winograd convolution", _SOURCE, _FLAG_SETS, _wrap, _self_test)
