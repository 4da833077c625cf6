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
