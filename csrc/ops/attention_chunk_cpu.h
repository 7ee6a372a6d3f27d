// CPU inner kernels of paged attention (included by paged_attention.cpp only): one chunk of keys
// for the query rows of one (sequence, KV head), with an online softmax. Compiled for AVX-512,
// AVX2+FMA and baseline x86-64 and chosen once at run time; with AVX-512 and head_dim % 16 == 0 a
// register-blocked variant is used (16 keys scored per shuffle-add tree, P V with the accumulators
// in registers), and for items with many query rows the rows-in-lanes variant (16 rows per vector:
// no horizontal sums, softmax 16 rows at a time).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/cpu_math.h"

namespace tandem_rt {
namespace {

constexpr int kChunk = 128;  // keys per online-softmax step
constexpr int kMaxDim8 = 512;  // attend_chunk8_avx2's largest head_dim
constexpr int kPrefetchRows = 16;  // the fp32 / bf16 chunk kernels prefetch K and V rows this many keys ahead
// One chunk of keys for the M query rows of a work item (fp32 rows; the bf16 AVX-512 kernel reads
// kh / vh instead of k / v).
struct ChunkArgs {
  const float* q;          // [M, D] query rows, pre-multiplied by the softmax scale
  const float* const* k;   // [n] pointers to key rows, D floats each
  const float* const* v;   // [n] pointers to value rows, D floats each
  const int* nvalid;       // [M] keys of this chunk row m may attend (causal), in [0, n]
  float* s;                // [M, kChunk] scratch: scores, then probabilities
  float* mrow;             // [M] running max
  float* lrow;             // [M] running denominator
  float* acc;              // [M, D] running unnormalised output
  int M, D, n;
  const uint16_t* const* kh = nullptr;  // [n] pointers to bf16 key rows (attend_chunk16_bf16 only)
  const uint16_t* const* vh = nullptr;  // [n] pointers to bf16 value rows
  const uint16_t* qh = nullptr;         // [M, D] bf16 query rows, unscaled (attend_chunk16_bf16dp only)
  float qscale = 1.f;                   // softmax scale applied to the bf16dp scores
  // rows-in-lanes kernel (attend_chunk_lanes): queries transposed, scores stored key-major
  const float* qt = nullptr;            // [D, Mp] scaled query rows, column m = row m, zero-padded
  int Mp = 0;                           // M rounded up to 16; mrow / lrow / nvalid hold Mp entries
};

// Online softmax update per row over the chunk's scores; probabilities past the row's causal
// limit are 0, the running output is rescaled.
__attribute__((always_inline)) inline void softmax_update(const ChunkArgs& a) {
  const int M = a.M, D = a.D, n = a.n;
  for (int m = 0; m < M; ++m) {
    const int nv = a.nvalid[m];
    float* __restrict row = a.s + m * kChunk;
    if (nv <= 0) {
      for (int j = 0; j < n; ++j) row[j] = 0.f;
      continue;
    }
    // The running max over 16 lanes (GCC leaves an `omp simd reduction(max)` with std::max as a
    // scalar chain). max is exact, and ignores NaN scores as std::max(mx, s) does; only the sign of
    // a zero maximum may depend on the order, and exp(s - mx) and the rescaling are the same for
    // both signs, so the outputs do not.
    float mx = a.mrow[m];
    {
      float lane[16];
      for (int k = 0; k < 16; ++k) lane[k] = mx;
      int j = 0;
      for (; j + 16 <= nv; j += 16)
#pragma omp simd
        for (int k = 0; k < 16; ++k) lane[k] = lane[k] < row[j + k] ? row[j + k] : lane[k];
      for (; j < nv; ++j) mx = mx < row[j] ? row[j] : mx;
      for (int k = 0; k < 16; ++k) mx = mx < lane[k] ? lane[k] : mx;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < nv; ++j) {
      const float p = exp_nonpos(row[j] - mx);
      row[j] = p;
      sum += p;
    }
    for (int j = nv; j < n; ++j) row[j] = 0.f;
    const float old = a.mrow[m];
    const float alpha = old == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(old - mx);
    a.lrow[m] = a.lrow[m] * alpha + sum;
    a.mrow[m] = mx;
    if (alpha != 1.f) {
      float* __restrict acc = a.acc + m * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] *= alpha;
    }
  }
}

__attribute__((always_inline)) inline void attend_chunk_body(const ChunkArgs& a) {
  const int M = a.M, D = a.D, n = a.n;
  // Scores: four query rows per pass share each key row load.
  for (int j = 0; j < n; ++j) {
    const float* __restrict kr = a.k[j];
    int m = 0;
    for (; m + 4 <= M; m += 4) {
      const float* __restrict q0 = a.q + m * D;
      const float* __restrict q1 = q0 + D;
      const float* __restrict q2 = q1 + D;
      const float* __restrict q3 = q2 + D;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int d = 0; d < D; ++d) {
        const float kv = kr[d];
        s0 += q0[d] * kv;
        s1 += q1[d] * kv;
        s2 += q2[d] * kv;
        s3 += q3[d] * kv;
      }
      a.s[m * kChunk + j] = s0;
      a.s[(m + 1) * kChunk + j] = s1;
      a.s[(m + 2) * kChunk + j] = s2;
      a.s[(m + 3) * kChunk + j] = s3;
    }
    for (; m < M; ++m) {
      const float* __restrict q0 = a.q + m * D;
      float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
      for (int d = 0; d < D; ++d) s0 += q0[d] * kr[d];
      a.s[m * kChunk + j] = s0;
    }
  }
  softmax_update(a);
  // acc += P V, one value row at a time.
  for (int j = 0; j < n; ++j) {
    const float* __restrict vr = a.v[j];
    for (int m = 0; m < M; ++m) {
      if (j >= a.nvalid[m]) continue;
      const float p = a.s[m * kChunk + j];
      float* __restrict acc = a.acc + m * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += p * vr[d];
    }
  }
}

// bf16 rows (raw bits) -> fp32 rows: dst [n, D]. The paged source rows are prefetched
// kPrefetchRows rows ahead (they defeat the hardware prefetchers).
__attribute__((always_inline)) inline void bf16_rows_body(const uint16_t* const* src, int n, int D, float* dst) {
  for (int j = 0; j < n; ++j) {
#if defined(__x86_64__)
    if (j + kPrefetchRows < n)
      for (int b = 0; b < D * 2; b += 64) _mm_prefetch(reinterpret_cast<const char*>(src[j + kPrefetchRows]) + b, _MM_HINT_T0);
#endif
    const uint16_t* __restrict s = src[j];
    float* __restrict o = dst + static_cast<int64_t>(j) * D;
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] = std::bit_cast<float>(static_cast<uint32_t>(s[d]) << 16);
  }
}

#define TANDEM_CPU_VARIANT(suffix, attr)                                                                  \
  attr void attend_chunk_##suffix(const ChunkArgs& a) { attend_chunk_body(a); }                          \
  attr void bf16_rows_##suffix(const uint16_t* const* src, int n, int D, float* dst) {                   \
    bf16_rows_body(src, n, D, dst);                                                                      \
  }
#if defined(__x86_64__) && defined(__GNUC__)
TANDEM_CPU_VARIANT(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
TANDEM_CPU_VARIANT(avx2, __attribute__((target("avx2,fma"))))
#endif
TANDEM_CPU_VARIANT(base, )
#undef TANDEM_CPU_VARIANT

#if defined(__x86_64__) && defined(__GNUC__)
// ---- AVX2, head_dim % 8 == 0: keys scored 8 at a time, P V with the accumulators in registers ------
#pragma GCC push_options
#pragma GCC target("avx2,fma")

alignas(32) inline const float kZeroRow8[kMaxDim8] = {};  // the padding key row of attend_chunk8_avx2

#include "common/avx2_vec.h"  // ld8: 8 dims of a key / value row as fp32 (bf16 widened exactly)

// The scores of one query row against 8 key rows: acc_i = sum over the dims in 8 lanes (one FMA chain
// per key, dims in order), then the 8 lane sums ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)),
// key i in lane i. Each score depends only on its query and key rows (not on the other keys or rows),
// and a bf16 key gives the same score as its fp32 copy.
template <typename E>
__attribute__((always_inline)) inline __m256 scores8_avx2(const float* q, const E* const* k, int D) {
  __m256 acc[8];
  const __m256 q0 = _mm256_loadu_ps(q);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_mul_ps(q0, avx2::ld8(k[i]));
  for (int d = 8; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, avx2::ld8(k[i] + d), acc[i]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [.. lanes 0-3 | lanes 4-7 ..]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// attend_chunk_body's contract for head_dim % 8 == 0, head_dim <= kMaxDim8, K / V rows fp32 (a.k,
// a.v) or bf16 (a.kh, a.vh, read as they are: the same results as their fp32 copies): keys scored in
// blocks of 8 (the chunk's last block padded with a zero row, whose scores are never read), then per
// query row acc += P V over its valid keys in key order, 64 dims at a time in registers. The paged
// K / V rows are prefetched kPrefetchRows keys ahead (on the first query row's pass over V).
template <typename E>
__attribute__((always_inline)) inline void attend_chunk8_body(const ChunkArgs& a, const E* const* K,
                                                              const E* const* V) {
  const int M = a.M, D = a.D, n = a.n;
  const E* zero = reinterpret_cast<const E*>(kZeroRow8);
  for (int j = 0; j < n; j += 8) {
    for (int i = j + kPrefetchRows; i < std::min(n, j + kPrefetchRows + 8); ++i)
      for (int b = 0; b < D * static_cast<int>(sizeof(E)); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(K[i]) + b, _MM_HINT_T0);
    const E* k[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) k[i] = j + i < n ? K[j + i] : zero;
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(a.s + m * kChunk + j, scores8_avx2(a.q + m * D, k, D));
  }
  softmax_update(a);
  for (int m = 0; m < M; ++m) {
    const int nv = a.nvalid[m];
    const float* p = a.s + m * kChunk;
    float* acc = a.acc + m * D;
    for (int d0 = 0; d0 < D; d0 += 64) {
      const int nb = std::min(64, D - d0) / 8;  // 8-dim vectors in this block
      __m256 r[8];
      for (int b = 0; b < nb; ++b) r[b] = _mm256_loadu_ps(acc + d0 + 8 * b);
      for (int j = 0; j < nv; ++j) {
        if (m == 0 && d0 == 0 && j + kPrefetchRows < n)
          for (int b = 0; b < D * static_cast<int>(sizeof(E)); b += 64)
            _mm_prefetch(reinterpret_cast<const char*>(V[j + kPrefetchRows]) + b, _MM_HINT_T0);
        const __m256 pj = _mm256_set1_ps(p[j]);
        const E* v = V[j] + d0;
        if (nb == 8) {
#pragma GCC unroll 8
          for (int b = 0; b < 8; ++b) r[b] = _mm256_fmadd_ps(pj, avx2::ld8(v + 8 * b), r[b]);
        } else {
          for (int b = 0; b < nb; ++b) r[b] = _mm256_fmadd_ps(pj, avx2::ld8(v + 8 * b), r[b]);
        }
      }
      for (int b = 0; b < nb; ++b) _mm256_storeu_ps(acc + d0 + 8 * b, r[b]);
    }
  }
}
void attend_chunk8_avx2(const ChunkArgs& a) { attend_chunk8_body<float>(a, a.k, a.v); }
void attend_chunk8_bf16_avx2(const ChunkArgs& a) { attend_chunk8_body<uint16_t>(a, a.kh, a.vh); }
#pragma GCC pop_options
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#include "common/avx512_vec.h"  // v16f, ld16, st16, hsum16 (compiled for this region's target)
using namespace avx512;

// acc[R rows, VB*16 dims] += P[R, n] V[n, VB*16 dims], accumulators in registers. P is a.s, row-major
// [M, kChunk] or, with kKeyMajor, [n, Mp] (the rows-in-lanes kernel's layout).
// kPrefetch: also prefetch the V rows kPrefetchRows keys ahead (on the first pass over a chunk's V).
template <typename E, int R, int VB, bool kKeyMajor = false, bool kPrefetch = false>
__attribute__((always_inline)) inline void pv_block(const ChunkArgs& a, const E* const* vrows, int m0, int d0) {
  v16f acc[R][VB];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < VB; ++v) acc[r][v] = ld16(a.acc + (m0 + r) * a.D + d0 + 16 * v);
  for (int j = 0; j < a.n; ++j) {
    const E* vr = vrows[j] + d0;
    if (kPrefetch && j + kPrefetchRows < a.n) {  // paged rows defeat the hardware prefetchers
      const char* ahead = reinterpret_cast<const char*>(vrows[j + kPrefetchRows] + d0);
      for (int o = 0; o < VB * 16 * static_cast<int>(sizeof(E)); o += 64) __builtin_prefetch(ahead + o);
    }
    v16f vv[VB];
#pragma GCC unroll 4
    for (int v = 0; v < VB; ++v) vv[v] = ld16(vr + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float p = kKeyMajor ? a.s[j * a.Mp + m0 + r] : a.s[(m0 + r) * kChunk + j];
#pragma GCC unroll 4
      for (int v = 0; v < VB; ++v) acc[r][v] += p * vv[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < VB; ++v) st16(a.acc + (m0 + r) * a.D + d0 + 16 * v, acc[r][v]);
}

template <typename E, int R, bool kKeyMajor = false, bool kPrefetch = false>
__attribute__((always_inline)) inline void pv_rows(const ChunkArgs& a, const E* const* vrows, int m0) {
  int d0 = 0;
  for (; d0 + 64 <= a.D; d0 += 64) pv_block<E, R, 4, kKeyMajor, kPrefetch>(a, vrows, m0, d0);
  for (; d0 < a.D; d0 += 16) pv_block<E, R, 1, kKeyMajor, kPrefetch>(a, vrows, m0, d0);
}

// Scores of R = 1, 2 or 3 query rows (from m) for the 8 keys kr (cnt of them stored): each K
// vector load feeds R FMAs into 8 partial vectors per row; shuffle-add trees (hsum16) turn 16
// partial vectors into 16 sums. Every row's partials sit in 8 consecutive vectors, and the tree sums
// every vector the same way, so a row's score does not depend on R or on its place in the pass.
template <typename E, int R>
__attribute__((always_inline)) inline void scores_rows(const ChunkArgs& a, const E* const* kr, int j0, int cnt, int m) {
  constexpr int P = (8 * R + 15) / 16 * 16;  // partial vectors, padded to whole trees
  const int D = a.D;
  v16f part[P];
#pragma GCC unroll 32
  for (int t = 0; t < P; ++t) part[t] = v16f{};
  for (int v = 0; v < D; v += 16) {
    v16f qv[R];
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) qv[r] = ld16(a.q + (m + r) * D + v);
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const v16f kv = ld16(kr[t] + v);
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r) part[8 * r + t] += qv[r] * kv;
    }
  }
#pragma GCC unroll 2
  for (int b = 0; b < P / 16; ++b) {
    v16f tree[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) tree[t] = part[16 * b + t];
    float sums[16];
    st16(sums, hsum16(tree));
#pragma GCC unroll 2
    for (int h = 0; h < 2 && 2 * b + h < R; ++h)
      for (int t = 0; t < cnt; ++t) a.s[(m + 2 * b + h) * kChunk + j0 + t] = sums[8 * h + t];
  }
}

// Scores s[m][j] = q_m . k_j for E = float rows or uint16_t (bf16) rows converted on load, 8 keys
// at a time: query rows in pairs, an odd count ending with a triple (a GQA group of 3: one pass
// over K instead of two) or, for one row, a single; keys past n are scored, not stored. K rows
// are prefetched kPrefetchRows keys ahead.
template <typename E>
__attribute__((always_inline)) inline void scores_v16(const ChunkArgs& a, const E* const* krows) {
  const int M = a.M, D = a.D, n = a.n;
  const int pairs_end = M % 2 == 0 ? M : (M >= 3 ? M - 3 : 0);
  for (int j0 = 0; j0 < n; j0 += 8) {
    const E* kr[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) kr[t] = krows[std::min(j0 + t, n - 1)];
    const int cnt = std::min(8, n - j0);
    for (int t = j0 + kPrefetchRows; t < std::min(n, j0 + kPrefetchRows + 8); ++t) {  // 8 keys, kPrefetchRows ahead
      const char* ahead = reinterpret_cast<const char*>(krows[t]);
      for (int o = 0; o < D * static_cast<int>(sizeof(E)); o += 64) __builtin_prefetch(ahead + o);
    }
    int m = 0;
    for (; m < pairs_end; m += 2) scores_rows<E, 2>(a, kr, j0, cnt, m);
    if (M - m == 3)
      scores_rows<E, 3>(a, kr, j0, cnt, m);
    else if (M - m == 1)
      scores_rows<E, 1>(a, kr, j0, cnt, m);
  }
}

// One pass of acc += P V over rows [m0, m0 + rows), rows <= 4.
template <typename E, bool kKeyMajor, bool kPrefetch>
__attribute__((always_inline)) inline void pv_pass(const ChunkArgs& a, const E* const* vrows, int m0, int rows) {
  switch (rows) {
    case 4: return pv_rows<E, 4, kKeyMajor, kPrefetch>(a, vrows, m0);
    case 3: return pv_rows<E, 3, kKeyMajor, kPrefetch>(a, vrows, m0);
    case 2: return pv_rows<E, 2, kKeyMajor, kPrefetch>(a, vrows, m0);
    case 1: return pv_rows<E, 1, kKeyMajor, kPrefetch>(a, vrows, m0);
    default: return;
  }
}

// acc += P V with register-resident accumulators (4 rows x 64 dims per pass). The first pass
// prefetches V rows ahead, except for key-major rows (the chunk's converted copy, in cache).
template <typename E, bool kKeyMajor = false>
__attribute__((always_inline)) inline void pv_v16(const ChunkArgs& a, const E* const* vrows) {
  const int M = a.M;
  pv_pass<E, kKeyMajor, !kKeyMajor>(a, vrows, 0, std::min(M, 4));
  for (int m0 = 4; m0 < M; m0 += 4) pv_pass<E, kKeyMajor, false>(a, vrows, m0, std::min(M - m0, 4));
}

// ---- rows in lanes (many query rows: verify blocks x GQA group) -----------------------------------
// Lane i of a vector is query row m0 + i, so scores need no horizontal sums and the online softmax
// runs 16 rows at once: s[j][m] = sum_d k_j[d] * qt[d][m], 8 keys x 32 rows of accumulators, each
// key element broadcast once per 32 rows.

// exp(x) for x <= 0 in 16 lanes (the polynomial of exp_nonpos).
__attribute__((always_inline)) inline v16f exp_nonpos16(v16f x) {
  const v16f lo = v16f{} - 87.0f;
  x = x < lo ? lo : x;
  const v16f big = v16f{} + 12582912.0f;
  const v16f fn = (x * 1.44269504088896341f + big) - big;
  v16f r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  v16f y = v16f{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(fn, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// s[j0 + t][m0 .. m0 + 16 * RV) for t < 8 keys: RV row vectors of 16 lanes.
template <int RV>
__attribute__((always_inline)) inline void scores_lanes_block(const ChunkArgs& a, const float* const* kr, int j0,
                                                              int cnt, int m0) {
  v16f acc[8][RV];
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t)
#pragma GCC unroll 2
    for (int r = 0; r < RV; ++r) acc[t][r] = v16f{};
  const float* qt = a.qt + m0;
  for (int d = 0; d < a.D; ++d) {
    v16f qv[RV];
#pragma GCC unroll 2
    for (int r = 0; r < RV; ++r) qv[r] = ld16(qt + d * a.Mp + 16 * r);
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const float kb = kr[t][d];
#pragma GCC unroll 2
      for (int r = 0; r < RV; ++r) acc[t][r] += kb * qv[r];
    }
  }
  for (int t = 0; t < cnt; ++t)
#pragma GCC unroll 2
    for (int r = 0; r < RV; ++r) st16(a.s + (j0 + t) * a.Mp + m0 + 16 * r, acc[t][r]);
}

__attribute__((always_inline)) inline void scores_lanes(const ChunkArgs& a) {
  for (int j0 = 0; j0 < a.n; j0 += 8) {
    const float* kr[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) kr[t] = a.k[std::min(j0 + t, a.n - 1)];
    const int cnt = std::min(8, a.n - j0);
    int m0 = 0;
    for (; m0 + 32 <= a.Mp; m0 += 32) scores_lanes_block<2>(a, kr, j0, cnt, m0);
    if (m0 < a.Mp) scores_lanes_block<1>(a, kr, j0, cnt, m0);
  }
}

// Online softmax over the chunk's key-major scores, 16 rows per vector; then acc rows rescaled.
__attribute__((always_inline)) inline void softmax_lanes(const ChunkArgs& a) {
  const v16f ninf = v16f{} - std::numeric_limits<float>::infinity();
  alignas(64) float alpha[16];
  for (int m0 = 0; m0 < a.Mp; m0 += 16) {
    v16i nv;
    std::memcpy(&nv, a.nvalid + m0, sizeof(nv));
    const v16f old = ld16(a.mrow + m0);
    v16f mx = old;
    for (int j = 0; j < a.n; ++j) {
      const v16f sv = ld16(a.s + j * a.Mp + m0);
      mx = (j < nv) & (sv > mx) ? sv : mx;
    }
    v16f sum = v16f{};
    for (int j = 0; j < a.n; ++j) {
      float* sp = a.s + j * a.Mp + m0;
      const v16f p = j < nv ? exp_nonpos16(ld16(sp) - mx) : v16f{};
      st16(sp, p);
      sum += p;
    }
    const v16f al = old == ninf ? v16f{} : exp_nonpos16(old - mx);
    st16(a.lrow + m0, ld16(a.lrow + m0) * al + sum);
    st16(a.mrow + m0, mx);
    st16(alpha, al);
    for (int i = 0; i < 16 && m0 + i < a.M; ++i) {
      if (alpha[i] == 1.f) continue;
      float* acc = a.acc + (m0 + i) * a.D;
      for (int d = 0; d < a.D; d += 16) st16(acc + d, ld16(acc + d) * alpha[i]);
    }
  }
}

// One chunk for many rows (fp32 K/V rows a.k / a.v; queries a.qt; D % 16 == 0).
void attend_chunk_lanes_avx512(const ChunkArgs& a) {
  scores_lanes(a);
  softmax_lanes(a);
  pv_v16<float, true>(a, a.v);
}

void attend_chunk16_avx512(const ChunkArgs& a) {
  scores_v16<float>(a, a.k);
  softmax_update(a);
  pv_v16<float>(a, a.v);
}
void attend_chunk16_bf16_avx512(const ChunkArgs& a) {
  scores_v16<uint16_t>(a, a.kh);
  softmax_update(a);
  pv_v16<uint16_t>(a, a.vh);
}
#pragma GCC pop_options

// ---- AVX-512 BF16 (head_dim % 32 == 0): scores with vdpbf16ps on the raw bf16 Q and K -----------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")
constexpr int kMaxDpRows = 32;  // rows per bf16-probability block of the vdpbf16ps P V

// Scores from bf16 query rows a.qh (unscaled) and bf16 key rows a.kh: each vdpbf16ps adds 32
// exact bf16 products pairwise into 16 fp32 lanes (no conversion of K); then x a.qscale.
__attribute__((always_inline)) inline void scores_bf16dp(const ChunkArgs& a) {
  const int M = a.M, D = a.D, n = a.n;
  for (int j0 = 0; j0 < n; j0 += 8) {
    const uint16_t* kr[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) kr[t] = a.kh[std::min(j0 + t, n - 1)];
    const int cnt = std::min(8, n - j0);
    for (int m = 0; m < M; m += 2) {
      const int m1 = std::min(m + 1, M - 1);
      const uint16_t* q0 = a.qh + m * D;
      const uint16_t* q1 = a.qh + m1 * D;
      v16f part[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) part[t] = v16f{};
      for (int v = 0; v < D; v += 32) {
        const __m512bh qa = (__m512bh)_mm512_loadu_si512(q0 + v);
        const __m512bh qb = (__m512bh)_mm512_loadu_si512(q1 + v);
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          const __m512bh kv = (__m512bh)_mm512_loadu_si512(kr[t] + v);
          part[t] = (v16f)_mm512_dpbf16_ps((__m512)part[t], qa, kv);
          part[8 + t] = (v16f)_mm512_dpbf16_ps((__m512)part[8 + t], qb, kv);
        }
      }
      float sums[16];
      st16(sums, hsum16(part) * a.qscale);
      for (int t = 0; t < cnt; ++t) a.s[m * kChunk + j0 + t] = sums[t];
      if (m1 != m)
        for (int t = 0; t < cnt; ++t) a.s[m1 * kChunk + j0 + t] = sums[8 + t];
    }
  }
}

// acc[R rows, 64 dims at d0] += P V with vdpbf16ps: P rounded to bf16 (pairs of adjacent keys in
// one 32-bit word, pb: [M, kChunk + 1] bf16), each pair of V rows interleaved element-wise so that
// one instruction adds p_j v_j + p_j+1 v_j+1 into 16 fp32 lanes.
template <int R>
__attribute__((always_inline)) inline void pv_bf16dp_block(const ChunkArgs& a, const uint16_t* pb, int m0, int d0) {
  const __m512i inter = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  __m512 acc[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_loadu_ps(a.acc + (m0 + r) * a.D + d0 + 16 * v);
  for (int j = 0; j < a.n; j += 2) {
    const uint16_t* v0 = a.vh[j] + d0;
    const uint16_t* v1 = a.vh[std::min(j + 1, a.n - 1)] + d0;  // odd n: its p is 0 (pb padding)
    __m512bh vv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m512i x = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + 16 * v)));
      const __m512i y = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + 16 * v)));
      vv[v] = (__m512bh)_mm512_permutex2var_epi16(x, inter, y);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, pb + (m0 + r) * (kChunk + 2) + j, 4);
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pp, vv[v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(a.acc + (m0 + r) * a.D + d0 + 16 * v, acc[r][v]);
}

// bf16 K via vdpbf16ps. V: with D % 64 == 0 also via vdpbf16ps (P rounded to bf16, as tensor-core
// kernels do); otherwise as bf16 rows converted on load (a.vh) or, when a.vh is null, fp32 rows
// (a.v, converted once by the caller).
void attend_chunk16_bf16dp_avx512(const ChunkArgs& a) {
  scores_bf16dp(a);
  softmax_update(a);
  if (a.vh != nullptr && a.D % 64 == 0) {
    // pb: [M, kChunk + 2] bf16 probabilities (round to nearest even; p in [0, 1], no NaN), zero-padded
    alignas(64) uint16_t pb[kMaxDpRows * (kChunk + 2)];
    for (int m0 = 0; m0 < a.M; m0 += kMaxDpRows) {
      const int rows = std::min(kMaxDpRows, a.M - m0);
      for (int r = 0; r < rows; ++r) {
        const float* srow = a.s + (m0 + r) * kChunk;
        uint16_t* prow = pb + r * (kChunk + 2);
#pragma omp simd
        for (int j = 0; j < a.n; ++j) {
          const uint32_t bits = std::bit_cast<uint32_t>(srow[j]);
          prow[j] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        }
        prow[a.n] = 0;
        prow[a.n + 1] = 0;
      }
      ChunkArgs sub = a;
      sub.acc = a.acc + m0 * a.D;
      int r0 = 0;
      for (; r0 + 4 <= rows; r0 += 4)
        for (int d0 = 0; d0 < a.D; d0 += 64) pv_bf16dp_block<4>(sub, pb, r0, d0);
      for (int d0 = 0; d0 < a.D && r0 < rows; d0 += 64) {
        switch (rows - r0) {
          case 3: pv_bf16dp_block<3>(sub, pb, r0, d0); break;
          case 2: pv_bf16dp_block<2>(sub, pb, r0, d0); break;
          case 1: pv_bf16dp_block<1>(sub, pb, r0, d0); break;
          default: break;
        }
      }
    }
  } else if (a.vh != nullptr) {
    pv_v16<uint16_t>(a, a.vh);
  } else {
    pv_v16<float>(a, a.v);
  }
}
#pragma GCC pop_options
#endif

struct CpuKernels {
  void (*attend_chunk)(const ChunkArgs&);
  void (*bf16_rows)(const uint16_t* const*, int, int, float*);
  void (*attend_chunk16)(const ChunkArgs&);       // head_dim % 16 == 0 only; nullptr without AVX-512
  void (*attend_chunk16_bf16)(const ChunkArgs&);  // same, K/V read as bf16 through a.kh / a.vh
  void (*attend_chunk16_bf16dp)(const ChunkArgs&);  // head_dim % 32 == 0, AVX-512 BF16: a.qh x a.kh
  void (*attend_chunk_lanes)(const ChunkArgs&);     // head_dim % 16 == 0, many rows: a.qt, fp32 a.k / a.v
  void (*attend_chunk8)(const ChunkArgs&);  // head_dim % 8 == 0, <= kMaxDim8 (AVX2); nullptr in base
  void (*attend_chunk8_bf16)(const ChunkArgs&);  // same, K/V read as bf16 through a.kh / a.vh
};

// The kernels of the variant cpu_isa::best() chooses (TANDEM_RT_CPU_KERNELS: "avx512", "avx512f" =
// AVX-512 without the BF16 dot products, "avx2", "base"). Throws std::invalid_argument for an
// unknown name or a variant this CPU cannot run.
CpuKernels pick_cpu_kernels() {
  const CpuKernels base{&attend_chunk_base, &bf16_rows_base, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa::best()) {
    case cpu_isa::Isa::kAvx512:
      return {&attend_chunk_avx512, &bf16_rows_avx512, &attend_chunk16_avx512, &attend_chunk16_bf16_avx512,
              cpu_isa::bf16_dot_products() ? &attend_chunk16_bf16dp_avx512 : nullptr, &attend_chunk_lanes_avx512,
              &attend_chunk8_avx2, &attend_chunk8_bf16_avx2};  // the AVX2 kernels for head dims % 16 != 0
    case cpu_isa::Isa::kAvx2:
      return {&attend_chunk_avx2, &bf16_rows_avx2, nullptr, nullptr, nullptr, nullptr, &attend_chunk8_avx2,
              &attend_chunk8_bf16_avx2};
    default:
      break;
  }
#endif
  return base;
}

}  // namespace
}  // namespace tandem_rt
