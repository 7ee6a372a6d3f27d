// Op tandem_rt::linear_rows_q (CPU): y = add + x @ dequant(w)^T for a few rows x: [M, K] (bf16 or
// fp32) and a weight kept in its GGUF block quantization, w: uint8 [N, K / 32 * block_bytes] (one
// row of blocks per output, as GGUF stores an [N, K] tensor). Decode and verify steps stream every
// weight once, so reading 4.5-8.5 bits per weight instead of 16 cuts the bytes of a step 2-3.5x.
// Block formats: quant_blocks.h. (linear_rows_q16.cpp reads the same blocks repacked 16 outputs at
// a time, the faster layout for the VNNI kernel.) Variants: AVX-512 VNNI (x
// quantized to int8 per block, exact integer block dots: the llama.cpp scheme, below), AVX-512F
// (each block dequantized in registers to fp32 and shared by up to 8 rows, fp32 FMAs: the exact
// product with the dequantized weights) and portable fp32 loops. One rounding to the output dtype
// at the end; each output's arithmetic is the same whatever M is.
#include "ops/direct.h"
#include "common/check.h"
#include "ops/layer_math_cpu.h"
#include "ops/quant_blocks.h"
#include "ops/quantize_x.h"
#include "ops/rows_args.h"

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace tandem_rt {
namespace {

using quant::block_bytes;
using quant::dequant_block;
using quant::half_to_float;
using quant::kBlock;
using quant::kQ4_0;
using quant::kQ4_1;
using quant::kQ8_0;

constexpr int kMaxRows = 8;          // rows per pass over the weight
constexpr int kPrefetchBytes = 4096;  // how far ahead of its loads the kernel prefetches the weight stream

// Any ISA: y[m, n] for n in [n0, n1), m < rows. xf: [rows, K] fp32; w: [N, K/32 * bb] blocks;
// add: null, [N] (ars = 0) or [rows, N] (row stride ars); y: [rows, N], row stride ys.
template <int64_t Q, typename E>
void linear_rows_q_loops(const float* xf, int64_t K, int rows, const uint8_t* w, const E* add, int64_t ars, E* y,
                         int64_t ys, int64_t n0, int64_t n1) {
  constexpr int64_t bb = block_bytes(Q);
  const int64_t nb = K / kBlock;
  float wf[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    float acc[kMaxRows][kBlock] = {};
    for (int64_t j = 0; j < nb; ++j) {
      dequant_block<Q>(w + (n * nb + j) * bb, wf);
      for (int m = 0; m < rows; ++m)
        for (int k = 0; k < kBlock; ++k) acc[m][k] = std::fma(xf[m * K + j * kBlock + k], wf[k], acc[m][k]);
    }
    for (int m = 0; m < rows; ++m) {
      float s = 0.f;
      for (int k = 0; k < kBlock; ++k) s += acc[m][k];
      if (add != nullptr) s += layer_math::load(add[m * ars + n]);
      y[m * ys + n] = layer_math::store<E>(s);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")

// One block's 32 weights as two vectors of 16 fp32 (elements 0-15 and 16-31).
template <int64_t Q>
__attribute__((always_inline)) inline void dequant_block_avx512(const uint8_t* blk, __m512& lo, __m512& hi) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk)));
  if constexpr (Q == kQ8_0) {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
    lo = _mm512_mul_ps(d, a);
    hi = _mm512_mul_ps(d, b);
  } else {
    const uint8_t* qs = blk + (Q == kQ4_1 ? 4 : 2);
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    __m512i a = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
    __m512i b = _mm512_srli_epi32(bytes, 4);
    if constexpr (Q == kQ4_0) {
      a = _mm512_sub_epi32(a, _mm512_set1_epi32(8));
      b = _mm512_sub_epi32(b, _mm512_set1_epi32(8));
      lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(a));
      hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(b));
    } else {
      const __m512 m = _mm512_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk + 2)));
      lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(a), m);
      hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(b), m);
    }
  }
}

// y[r, n + b] = sum of acc[r * NB + b]'s lanes (+ add), rounded once to E (both kernel families).
template <typename E, int R, int NB>
__attribute__((always_inline)) inline void store_outputs(const __m512* acc, const E* add, int64_t ars, E* y,
                                                         int64_t ys, int64_t n) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      float s = _mm512_reduce_add_ps(acc[r * NB + b]);
      if (add != nullptr) s += layer_math::load(add[r * ars + n + b]);
      y[r * ys + n + b] = layer_math::store<E>(s);
    }
}

// R rows x NB outputs (2 * R * NB <= 32 fp32 partial vectors are too many: R * NB <= 8, each output
// accumulating both halves of a block into one vector).
template <int64_t Q, typename E, int R, int NB>
__attribute__((always_inline)) inline void linear_q_block(const float* xf, int64_t K, const uint8_t* w, const E* add,
                                                          int64_t ars, E* y, int64_t ys, int64_t n) {
  constexpr int64_t bb = block_bytes(Q);
  const int64_t nb = K / kBlock;
  __m512 acc[R * NB];
#pragma GCC unroll 16
  for (int i = 0; i < R * NB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    __m512 lo[NB], hi[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      const uint8_t* blk = w + ((n + b) * nb + j) * bb;
      _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
      dequant_block_avx512<Q>(blk, lo[b], hi[b]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xl = _mm512_loadu_ps(xf + r * K + j * kBlock);
      const __m512 xh = _mm512_loadu_ps(xf + r * K + j * kBlock + 16);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        acc[r * NB + b] = _mm512_fmadd_ps(xl, lo[b], acc[r * NB + b]);
        acc[r * NB + b] = _mm512_fmadd_ps(xh, hi[b], acc[r * NB + b]);
      }
    }
  }
  store_outputs<E, R, NB>(acc, add, ars, y, ys, n);
}

template <int64_t Q, typename E, int R, int NB>
void linear_q_range(const float* xf, int64_t K, const uint8_t* w, const E* add, int64_t ars, E* y, int64_t ys,
                    int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) linear_q_block<Q, E, R, NB>(xf, K, w, add, ars, y, ys, n);
  for (; n < n1; ++n) linear_q_block<Q, E, R, 1>(xf, K, w, add, ars, y, ys, n);
}

// rows (1..8) -> the register block of the quantized kernels (R rows x NB outputs, R * NB <= 8);
// CALL(R, NB) runs it. Shared by the fp32 and the VNNI kernel families.
#define TANDEM_Q_ROW_BLOCKS(rows, CALL) \
  switch (rows) {                       \
    case 1: return CALL(1, 4);          \
    case 2: return CALL(2, 2);          \
    case 3: return CALL(3, 2);          \
    case 4: return CALL(4, 2);          \
    case 5: return CALL(5, 1);          \
    case 6: return CALL(6, 1);          \
    case 7: return CALL(7, 1);          \
    default: return CALL(8, 1);         \
  }

template <int64_t Q, typename E>
void linear_rows_q_avx512(const float* xf, int64_t K, int rows, const uint8_t* w, const E* add, int64_t ars, E* y,
                          int64_t ys, int64_t n0, int64_t n1) {
#define TANDEM_Q_F32(R, NB) linear_q_range<Q, E, R, NB>(xf, K, w, add, ars, y, ys, n0, n1)
  TANDEM_Q_ROW_BLOCKS(rows, TANDEM_Q_F32)
#undef TANDEM_Q_F32
}
#pragma GCC pop_options
#endif

// ---- AVX-512 VNNI: int8 activations (the llama.cpp scheme), integer block dot products -------------
// Each row of x is quantized per block of 32 (quant_x::quantize_block32, shared with
// linear_rows_q16): dx_j = max|x| / 127 (fp32; NaN when the block holds a NaN), xq =
// round-to-nearest-even (x / dx_j) in int8, and sx_j = sum of the block's x in fp32. Then per block
//   Q8_0: d_j * dx_j * sum(q * xq)               Q4_0: d_j * dx_j * sum(q * xq) - 8 d_j * sx_j
//   Q4_1: d_j * dx_j * sum(q * xq) + m_j * sx_j   (q: the stored int8 / nibble values)
// with the integer sums exact (vpdpbusd: u8 x s8 products summed in int32). Blocks go in pairs (64
// weights, one 512-bit vpdpbusd); the x bytes of a pair are laid out to match the weight bytes:
//   nibbles: [x_a[0..15], x_b[0..15], x_a[16..31], x_b[16..31]]   (low nibbles, then high)
//   Q8_0:    [x_a[0..31], x_b[0..31]]  stored as xq + 128 (u8; the weight is the signed side)
// so int32 lane l of the product belongs to block a or b by the pattern below; per-lane fp32 scale
// vectors carry dx and sx / 8 of each lane's block.
struct QuantRows {
  std::vector<uint8_t> xq;    // [rows, pairs, 64] bytes in the pair layout
  std::vector<float> dxl;     // [rows, pairs, 16] dx of each lane's block
  std::vector<float> sxl;     // [rows, pairs, 16] sx / 8 of each lane's block (0 for Q8_0)
  int64_t pairs = 0;
};

template <int64_t Q>
inline int lane_block(int lane) {  // 0: block a, 1: block b of a pair, for int32 lane 0..15
  if constexpr (Q == kQ8_0) return lane / 8;
  else return (lane / 4) % 2;
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// x rows (fp32 [rows, K]) -> the pair layout of qtype Q (odd block counts: a zero last block b),
// each block quantized by quant_x::quantize_block32 (as linear_rows_q16: a NaN in the block makes
// its dx NaN, so that it reaches the outputs).
template <int64_t Q>
void quantize_rows(const float* xf, int64_t K, int64_t rows, QuantRows& out) {
  const int64_t nb = K / kBlock, pairs = (nb + 1) / 2;
  out.pairs = pairs;
  out.xq.assign(rows * pairs * 64, Q == kQ8_0 ? 128 : 0);
  out.dxl.assign(rows * pairs * 16, 0.f);
  out.sxl.assign(rows * pairs * 16, 0.f);
  int8_t q[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < nb; ++j) {
      float dx, sum;
      int32_t isum;
      quant_x::quantize_block32(xf + r * K + j * kBlock, q, dx, sum, isum);
      const int64_t p = j / 2, half = j % 2;
      uint8_t* dst = out.xq.data() + (r * pairs + p) * 64;
      for (int k = 0; k < kBlock; ++k) {
        int pos;
        if constexpr (Q == kQ8_0) pos = static_cast<int>(half) * 32 + k;
        else pos = (k < 16 ? 0 : 32) + static_cast<int>(half) * 16 + (k % 16);
        dst[pos] = static_cast<uint8_t>(Q == kQ8_0 ? q[k] + 128 : q[k]);
      }
      for (int l = 0; l < 16; ++l)
        if (lane_block<Q>(l) == half) {
          out.dxl[(r * pairs + p) * 16 + l] = dx;
          out.sxl[(r * pairs + p) * 16 + l] = Q == kQ8_0 ? 0.f : sum / 8.f;
        }
    }
  }
}
#pragma GCC pop_options
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")

// The 64 weight bytes of blocks a = j, b = j + 1 (b absent when has_b is false: zeros) in the pair
// layout, and the per-lane fp32 vectors d (and the additive coefficient: m for Q4_1, -8 d for Q4_0).
template <int64_t Q>
__attribute__((always_inline)) inline void load_pair(const uint8_t* a, const uint8_t* b, bool has_b, __m512i& q,
                                                     __m512& dl, __m512& ml) {
  const __m512i pattern = Q == kQ8_0 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                     : _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  const uint16_t da = *reinterpret_cast<const uint16_t*>(a);
  const uint16_t db = has_b ? *reinterpret_cast<const uint16_t*>(b) : 0;
  const __m128 d2 = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, 0, 0, static_cast<short>(db), static_cast<short>(da)));
  dl = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(d2));
  if constexpr (Q == kQ8_0) {
    const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2));
    const __m256i qb = has_b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)) : _mm256_setzero_si256();
    q = _mm512_inserti64x4(_mm512_castsi256_si512(qa), qb, 1);
    ml = _mm512_setzero_ps();
  } else {
    const int off = Q == kQ4_1 ? 4 : 2;
    const __m128i na = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + off));
    const __m128i nbv = has_b ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + off)) : _mm_setzero_si128();
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(na), nbv, 1);
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(both, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(both, 4), mask);
    q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if constexpr (Q == kQ4_1) {
      const uint16_t ma = *reinterpret_cast<const uint16_t*>(a + 2);
      const uint16_t mb = has_b ? *reinterpret_cast<const uint16_t*>(b + 2) : 0;
      const __m128 m2 = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, 0, 0, static_cast<short>(mb), static_cast<short>(ma)));
      ml = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(m2));
    } else {
      ml = _mm512_mul_ps(dl, _mm512_set1_ps(-8.f));
    }
  }
}

// R rows x NB outputs, R * NB <= 8 fp32 accumulators.
template <int64_t Q, typename E, int R, int NB>
__attribute__((always_inline)) inline void linear_q_block_vnni(const QuantRows& xr, int64_t row0, int64_t K,
                                                               const uint8_t* w, const E* add, int64_t ars, E* y,
                                                               int64_t ys, int64_t n) {
  constexpr int64_t bb = block_bytes(Q);
  const int64_t nb = K / kBlock, pairs = xr.pairs;
  __m512 acc[R * NB];
#pragma GCC unroll 16
  for (int i = 0; i < R * NB; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t p = 0; p < pairs; ++p) {
    const bool has_b = 2 * p + 1 < nb;
    __m512i q[NB];
    __m512 dl[NB], ml[NB];
    __m512i qsum[NB];  // Q8_0: 128 * (sum of 4 weights) per lane, removed from the u8-shifted x
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      const uint8_t* blk = w + ((n + b) * nb + 2 * p) * bb;
      _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
      load_pair<Q>(blk, blk + bb, has_b, q[b], dl[b], ml[b]);
      if constexpr (Q == kQ8_0)
        qsum[b] = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q[b]), 7);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t at = (row0 + r) * pairs + p;
      const __m512i xv = _mm512_loadu_si512(xr.xq.data() + at * 64);
      const __m512 dx = _mm512_loadu_ps(xr.dxl.data() + at * 16);
      const __m512 sx = _mm512_loadu_ps(xr.sxl.data() + at * 16);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        __m512i dot;
        if constexpr (Q == kQ8_0) dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, q[b]), qsum[b]);
        else dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[b], xv);
        acc[r * NB + b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dl[b], dx), acc[r * NB + b]);
        if constexpr (Q != kQ8_0) acc[r * NB + b] = _mm512_fmadd_ps(ml[b], sx, acc[r * NB + b]);
      }
    }
  }
  store_outputs<E, R, NB>(acc, add, ars, y, ys, n);
}

template <int64_t Q, typename E, int R, int NB>
void linear_q_range_vnni(const QuantRows& xr, int64_t row0, int64_t K, const uint8_t* w, const E* add, int64_t ars,
                         E* y, int64_t ys, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) linear_q_block_vnni<Q, E, R, NB>(xr, row0, K, w, add, ars, y, ys, n);
  for (; n < n1; ++n) linear_q_block_vnni<Q, E, R, 1>(xr, row0, K, w, add, ars, y, ys, n);
}

// rows <= 8 rows of quantized x (xr, from row0 on).
template <int64_t Q, typename E>
void linear_rows_q_vnni(const QuantRows& xr, int64_t row0, int64_t K, int rows, const uint8_t* w, const E* add,
                        int64_t ars, E* y, int64_t ys, int64_t n0, int64_t n1) {
#define TANDEM_Q_VNNI(R, NB) linear_q_range_vnni<Q, E, R, NB>(xr, row0, K, w, add, ars, y, ys, n0, n1)
  TANDEM_Q_ROW_BLOCKS(rows, TANDEM_Q_VNNI)
#undef TANDEM_Q_VNNI
}
#pragma GCC pop_options
#endif

// Outputs [n0, n1) for `rows` (<= 8) rows in the variant this CPU runs (TANDEM_RT_CPU_KERNELS:
// "avx512" / "avx512f" the AVX-512 kernel, "avx2" / "base" the portable loops).
template <int64_t Q, typename E>
void linear_rows_q_range(const float* xf, int64_t K, int rows, const uint8_t* w, const E* add, int64_t ars, E* y,
                         int64_t ys, int64_t n0, int64_t n1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa::best() == cpu_isa::Isa::kAvx512 && __builtin_cpu_supports("f16c"))
    return linear_rows_q_avx512<Q, E>(xf, K, rows, w, add, ars, y, ys, n0, n1);
#endif
  linear_rows_q_loops<Q, E>(xf, K, rows, w, add, ars, y, ys, n0, n1);
}

template <int64_t Q, typename E>
void linear_rows_q_typed(const E* xp, int64_t xs, int64_t M, int64_t K, const uint8_t* w, const E* ap, int64_t ars,
                         E* yp, int64_t N) {
  const std::vector<float> xf = rows_to_fp32(xp, xs, M, K);  // x rows in fp32 once
  const int64_t grain = std::max<int64_t>(8, 16384 / std::max<int64_t>(K, 1));
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa::int8_dot_products()) {
    QuantRows xr;  // every row quantized once
    quantize_rows<Q>(xf.data(), K, M, xr);
    for_row_passes(M, N, grain, kMaxRows, [&](int64_t m0, int rows, int64_t n0, int64_t n1) {
      linear_rows_q_vnni<Q, E>(xr, m0, K, rows, w, ap != nullptr ? ap + m0 * ars : nullptr, ars, yp + m0 * N, N,
                               n0, n1);
    });
    return;
  }
#endif
  for_row_passes(M, N, grain, kMaxRows, [&](int64_t m0, int rows, int64_t n0, int64_t n1) {
    linear_rows_q_range<Q, E>(xf.data() + m0 * K, K, rows, w, ap != nullptr ? ap + m0 * ars : nullptr, ars,
                              yp + m0 * N, N, n0, n1);
  });
}

template <typename E>
void dispatch_qtype(int64_t qtype, const E* xp, int64_t xs, int64_t M, int64_t K, const uint8_t* w, const E* ap,
                    int64_t ars, E* yp, int64_t N) {
  switch (qtype) {
    case kQ8_0: return linear_rows_q_typed<kQ8_0, E>(xp, xs, M, K, w, ap, ars, yp, N);
    case kQ4_0: return linear_rows_q_typed<kQ4_0, E>(xp, xs, M, K, w, ap, ars, yp, N);
    default: return linear_rows_q_typed<kQ4_1, E>(xp, xs, M, K, w, ap, ars, yp, N);
  }
}

void check_linear_rows_q(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK_VALUE(qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1,
                    "qtype must be 0 (Q8_0), 1 (Q4_0) or 2 (Q4_1), got ", qtype);
  check_rows_quant(x, w, block_bytes(qtype));
}

// y = add + x @ dequant(w)^T into y [M, N] (checked by the callers).
void linear_rows_q_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                        const std::optional<at::Tensor>& add) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t ars = check_rows_add(add, x, M, N);
  cpu_isa::check_variant();
  if (M == 0 || N == 0) return;
  const int64_t xs = M > 1 ? x.stride(0) : K;
  with_rows_dtype(x, add, y, [&](const auto* xp, const auto* ap, auto* yp) {
    using E = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
    dispatch_qtype<E>(qtype, xp, xs, M, K, w.data_ptr<uint8_t>(), ap, ars, yp, N);
  });
}

at::Tensor linear_rows_q_cpu(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                             const std::optional<at::Tensor>& add) {
  check_linear_rows_q(x, w, qtype);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_rows_q_into(y, x, w, qtype, add);
  return y;
}

}  // namespace

namespace direct {
at::Tensor linear_rows_q(const at::Tensor& x, const at::Tensor& w, int64_t qtype, const std::optional<at::Tensor>& add) {
  return linear_rows_q_cpu(x, w, qtype, add);
}
void linear_rows_q_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                       const std::optional<at::Tensor>& add) {
  check_linear_rows_q(x, w, qtype);
  check_out(y, x, x.size(0), w.size(0));
  linear_rows_q_into(y, x, w, qtype, add);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("linear_rows_q(Tensor x, Tensor w, int qtype, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("linear_rows_q", &linear_rows_q_cpu);
}

}  // namespace tandem_rt
