/* One-token decoding kernels (pipeline/kernels/decode.py): fp32, one thread.
   decode_attend: cache write + one-query attention; linear_rows (AVX-512 only): up to 8 rows of
   x W^T over weights packed in blocks of 32 output columns, with bias, GELU and residual
   epilogues. Built with -DNATIVE_PROBE, main() runs every kernel once (the probe). */

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
