// Op tandem_rt::linear_rows_q16 (CPU): y = add + x @ dequant(w)^T for a few rows x: [M, K] (bf16 or
// fp32) and a GGUF Q8_0 / Q4_1 weight repacked 16 outputs at a time (tandem_rt/quantized.py
// pack_rows16), so that each int32 lane of a 512-bit register accumulates one output:
//   w: uint8 [N / 16, K / 32 * group_bytes]; per group of 16 outputs and block j of 32 inputs:
//     Q4_1 (320 bytes): d[16] fp16, m[16] fp16, then 4 x 64 bytes P_t (t = 0..3): lane o of P_t
//           holds output o's block bytes qs[4t .. 4t+3] (low nibbles: inputs 4t..4t+3, high
//           nibbles: inputs 16+4t .. 16+4t+3);
//     Q8_0 (544 bytes): d[16] fp16, then 8 x 64 bytes: lane o of register t holds output o's
//           q[4t .. 4t+3] + 128 (uint8).
// Scheme (the one of linear_rows_q's VNNI kernel, the llama.cpp scheme): each row of x is quantized
// per block of 32 to int8, dx_j = max|x| / 127, xq = round-half-even(x / dx_j), sx_j = sum of the
// block's x (fp32, in the order of quantize_block32; a NaN in the block makes dx_j NaN); per block, with exact integer dot products (vpdpbusd: 4 u8 x s8 products per
// lane, the x quad broadcast to all 16 lanes):
//   Q4_1: y += d_j dx_j sum(q xq) + m_j sx_j       Q8_0: y += d_j dx_j (sum((q+128) xq) - 128 sum(xq))
// accumulated in fp32 per output in block order, rounded once to the output dtype. Compared with
// the block-row layout, a block's scales are one load and one conversion for 16 outputs and there is
// no lane reduction, so the per-weight instruction count drops about 4x and a decode product runs
// near the memory bandwidth. Variants: AVX-512 VNNI; AVX2 (the same int8 scheme and results with
// vpmaddubsw / vpmaddwd, below; also where AVX-512 runs without VNNI); and portable loops (the exact
// fp32 product with the dequantized weights, as linear_rows_q's non-VNNI variants). Each output's
// arithmetic is the same whatever M is.
#include "ops/direct.h"
#include "common/check.h"
#include "common/cpu_isa.h"
#include "ops/layer_math_cpu.h"
#include "ops/quant_blocks.h"
#include "ops/quantize_x.h"
#include "ops/rows_args.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace tandem_rt {
namespace {

using quant::half_to_float;
using quant::kBlock;
using quant::kQ4_1;
using quant::kQ8_0;

constexpr int kGroup = 16;           // outputs per packed group (one per int32 lane)
constexpr int kMaxRows = 8;          // rows per pass over the weight
constexpr int kPrefetchBytes = 2048;  // how far ahead of its loads the kernel prefetches the weight stream

constexpr int64_t group_bytes(int64_t qtype) { return qtype == kQ8_0 ? 544 : 320; }

// Output o's 32 weights of one packed group block, as fp32 (the portable loops' arithmetic).
template <int64_t Q>
inline void dequant_packed(const uint8_t* blk, int o, float* out) {
  const float d = half_to_float(blk + 2 * o);
  if constexpr (Q == kQ8_0) {
    for (int k = 0; k < kBlock; ++k) {
      const int t = k / 4, i = k % 4;
      const int q = static_cast<int>(blk[32 + 64 * t + 4 * o + i]) - 128;
      out[k] = d * static_cast<float>(q);
    }
  } else {
    const float m = half_to_float(blk + 32 + 2 * o);
    for (int k = 0; k < 16; ++k) {
      const int t = k / 4, i = k % 4;
      const uint8_t byte = blk[64 + 64 * t + 4 * o + i];
      out[k] = std::fma(d, static_cast<float>(byte & 15), m);
      out[k + 16] = std::fma(d, static_cast<float>(byte >> 4), m);
    }
  }
}

// Any ISA: rows x outputs of groups [g0, g1). xf: [rows, K] fp32; w: packed; add: null, [N]
// (ars = 0) or [rows, N]; y: [rows, N], row stride ys.
template <int64_t Q, typename E>
void q16_loops(const float* xf, int64_t K, int rows, const uint8_t* w, const E* add, int64_t ars, E* y, int64_t ys,
               int64_t g0, int64_t g1) {
  constexpr int64_t gb = group_bytes(Q);
  const int64_t nb = K / kBlock;
  float wf[kBlock];
  for (int64_t g = g0; g < g1; ++g)
    for (int o = 0; o < kGroup; ++o) {
      float acc[kMaxRows][kBlock] = {};
      for (int64_t j = 0; j < nb; ++j) {
        dequant_packed<Q>(w + (g * nb + j) * gb, o, wf);
        for (int m = 0; m < rows; ++m)
          for (int k = 0; k < kBlock; ++k) acc[m][k] = std::fma(xf[m * K + j * kBlock + k], wf[k], acc[m][k]);
      }
      const int64_t n = g * kGroup + o;
      for (int m = 0; m < rows; ++m) {
        float s = 0.f;
        for (int k = 0; k < kBlock; ++k) s += acc[m][k];
        if (add != nullptr) s += layer_math::load(add[m * ars + n]);
        y[m * ys + n] = layer_math::store<E>(s);
      }
    }
}

// Rows of x quantized per block: xq [rows, nb, 32] int8, dx [rows, nb], sx [rows, nb] (Q4_1: the
// fp32 sum of x; Q8_0: 128 * the integer sum of xq, in sq).
struct QuantRows16 {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<float> sx;
  std::vector<int32_t> sq;
  std::vector<int8_t> xb;  // AVX2 kernel of 3+ rows: [rows, nb, 8, 32], see broadcast_quads
};

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")

void quantize_rows16(const float* xf, int64_t K, int64_t rows, QuantRows16& out) {
  const int64_t nb = K / kBlock;
  out.xq.resize(rows * nb * kBlock);
  out.dx.resize(rows * nb);
  out.sx.resize(rows * nb);
  out.sq.resize(rows * nb);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t at = r * nb + j;
      int32_t isum;
      quant_x::quantize_block32(xf + r * K + j * kBlock, out.xq.data() + at * kBlock, out.dx[at], out.sx[at], isum);
      out.sq[at] = 128 * isum;
    }
}
#pragma GCC pop_options
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")

inline __m512i bcast4(const int8_t* p) {  // 4 bytes broadcast to every int32 lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One group (16 outputs from n) x R rows of quantized x (from row0 on).
template <int64_t Q, typename E, int R>
__attribute__((always_inline)) inline void q16_group(const QuantRows16& xr, int64_t row0, int64_t nb, const uint8_t* wg,
                                                     const E* add, int64_t ars, E* y, int64_t ys, int64_t n) {
  constexpr int64_t gb = group_bytes(Q);
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wg + j * gb;
#pragma GCC unroll 9
    for (int64_t c = 0; c < gb; c += 64) _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + c, _MM_HINT_T0);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    __m512i wv[8];
    __m512 m;
    if constexpr (Q == kQ4_1) {
      m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const __m512i p = _mm512_loadu_si512(blk + 64 + 64 * t);
        wv[t] = _mm512_and_si512(p, low);                            // inputs 4t .. 4t+3
        wv[t + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);  // inputs 16+4t .. 16+4t+3
      }
    } else {
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) wv[t] = _mm512_loadu_si512(blk + 32 + 64 * t);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t at = (row0 + r) * nb + j;
      const int8_t* xb = xr.xq.data() + at * kBlock;
      // one dot chain over the 8 quads (register t: inputs 4t .. 4t+3); Q8_0 starts it at
      // -128 * sum(xq), so that it ends at sum(q * xq) (exact int32 arithmetic in any order)
      __m512i dot = Q == kQ8_0 ? _mm512_set1_epi32(-xr.sq[at]) : _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) dot = _mm512_dpbusd_epi32(dot, wv[t], bcast4(xb + 4 * t));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(xr.dx[at])), acc[r]);
      if constexpr (Q == kQ4_1) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xr.sx[at]), acc[r]);
    }
  }
  alignas(64) float out[kGroup];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_store_ps(out, acc[r]);
    for (int o = 0; o < kGroup; ++o) {
      float s = out[o];
      if (add != nullptr) s += layer_math::load(add[r * ars + n + o]);
      y[r * ys + n + o] = layer_math::store<E>(s);
    }
  }
}

// Rows [row0, row0 + rows) x groups [g0, g1) (rows <= kMaxRows).
template <int64_t Q, typename E>
void q16_vnni(const QuantRows16& xr, int64_t row0, int64_t K, int rows, const uint8_t* w, const E* add, int64_t ars,
              E* y, int64_t ys, int64_t g0, int64_t g1) {
  const int64_t nb = K / kBlock;
  with_row_count<kMaxRows>(rows, [&](auto r) {
    for (int64_t g = g0; g < g1; ++g)
      q16_group<Q, E, decltype(r)::value>(xr, row0, nb, w + g * nb * group_bytes(Q), add, ars, y, ys, g * kGroup);
  });
}
#pragma GCC pop_options

// ---- AVX2: the same int8 scheme with 256-bit registers (8 outputs per register, two per group) ------
// vpmaddubsw (u8 x s8 pairs summed to int16) then vpmaddwd with ones (int16 pairs to int32): every
// int32 lane again sums the 4 products of one output's 4 inputs, exactly. Q4_1: nibbles (u8 <= 15)
// times xq (|xq| <= 127): the 8 int16 partial sums of a block stay within 8 * 2 * 15 * 127 = 30480,
// so they are added in int16 and widened once. Q8_0: the stored q + 128 is turned back into the
// signed q (xor 0x80); the u8 side is |q| (<= 128) and the s8 side xq * sign(q) (|.| <= 127), so a
// pair is at most 2 * 128 * 127 = 32512 and never saturates. Same fp32 accumulation as the VNNI kernel.
// Rows go in chunks of up to kChunkAvx2 per group, so the weight streams from memory once per pass of
// up to kMaxRowsAvx2 rows (a second chunk reads the group's bytes from L1 / L2). q16_both_avx2 takes
// both halves (8 outputs each) of a group per block, x quads broadcast per product; with 16 ymm
// registers it spills beyond 2 rows, so 3-4 rows of Q4_1 go one half at a time (q16_half_avx2): per
// block, each pair of weight quads unpacked once and used by every row, whose products read x from
// QuantRows16::xb (each quad already in all 8 lanes) as their memory operand; the first half's pass
// brings the group's bytes (K / 32 * 320: 15 KB for K = 1536) into L1 for the second. For Q8_0 the
// half-at-a-time tile measured no faster (Zen 3), so it keeps q16_both_avx2.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

constexpr int kMaxRowsAvx2 = 8;  // rows per pass over the weight
constexpr int kChunkAvx2 = 4;    // rows per q16_half_avx2 tile (R accumulators, R sums, 8 weights)
constexpr int kHalfMinRowsAvx2 = 3;  // Q4_1 chunks of this many rows or more go one half at a time

// xb [rows, nb, 8, 32]: quad t (bytes 4t .. 4t+3) of every block of xq repeated in the 8 int32 lanes.
void broadcast_quads(QuantRows16& xr, int64_t rows, int64_t nb) {
  xr.xb.resize(rows * nb * 8 * 32);
  for (int64_t at = 0; at < rows * nb; ++at) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.xq.data() + at * kBlock));
    for (int t = 0; t < 8; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xr.xb.data() + (at * 8 + t) * 32),
                          _mm256_permutevar8x32_epi32(b, _mm256_set1_epi32(t)));
  }
}

inline __m256i bcast4_256(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Quad pair t of half h (outputs 8h .. 8h+7, one per int32 lane) of a Q4_1 group block: wl the
// nibbles of inputs 4t .. 4t+3, wh those of inputs 16+4t .. 16+4t+3 (u8, <= 15).
__attribute__((always_inline)) inline void q4_1_quads(const uint8_t* blk, int t, int h, __m256i low, __m256i& wl,
                                                      __m256i& wh) {
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 + 64 * t + 32 * h));
  wl = _mm256_and_si256(p, low);
  wh = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
}

// One group (16 outputs from n) x R rows, both halves per block, x quads broadcast per product.
template <int64_t Q, typename E, int R>
__attribute__((always_inline)) inline void q16_both_avx2(const QuantRows16& xr, int64_t row0, int64_t nb,
                                                         const uint8_t* wg, const E* add, int64_t ars, E* y,
                                                         int64_t ys, int64_t n) {
  constexpr int64_t gb = group_bytes(Q);
  __m256 acc[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wg + j * gb;
#pragma GCC unroll 9
    for (int64_t c = 0; c < gb; c += 64) _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + c, _MM_HINT_T0);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // outputs 8h .. 8h+7 of the group
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * h)));
      __m256i dot[R];
      if constexpr (Q == kQ4_1) {
        __m256i s16[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) {
          __m256i wl, wh;
          q4_1_quads(blk, t, h, low, wl, wh);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const int8_t* xb = xr.xq.data() + ((row0 + r) * nb + j) * kBlock;
            s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(wl, bcast4_256(xb + 4 * t)));
            s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(wh, bcast4_256(xb + 16 + 4 * t)));
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) dot[r] = _mm256_madd_epi16(s16[r], ones);
      } else {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          const __m256i q = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 64 * t + 32 * h)), flip);
          const __m256i aq = _mm256_abs_epi8(q);                                  // |q| as u8 (<= 128)
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const int8_t* xb = xr.xq.data() + ((row0 + r) * nb + j) * kBlock;
            const __m256i sx = _mm256_sign_epi8(bcast4_256(xb + 4 * t), q);       // xq * sign(q)
            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aq, sx), ones));
          }
        }
      }
      __m256 m;
      if constexpr (Q == kQ4_1) m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * h)));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int64_t at = (row0 + r) * nb + j;
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_mul_ps(d, _mm256_set1_ps(xr.dx[at])), acc[r][h]);
        if constexpr (Q == kQ4_1) acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(xr.sx[at]), acc[r][h]);
      }
    }
  }
  alignas(32) float out[kGroup];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    for (int o = 0; o < kGroup; ++o) {
      float s = out[o];
      if (add != nullptr) s += layer_math::load(add[r * ars + n + o]);
      y[r * ys + n + o] = layer_math::store<E>(s);
    }
  }
}

// Q4_1: rows [row0, row0 + R) x outputs n + 8h .. n + 8h + 7 (half h of the group at wg).
template <typename E, int R>
__attribute__((always_inline)) inline void q16_half_avx2(const QuantRows16& xr, int64_t row0, int64_t nb,
                                                         const uint8_t* wg, int h, const E* add, int64_t ars, E* y,
                                                         int64_t ys, int64_t n) {
  constexpr int64_t gb = group_bytes(kQ4_1);
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i* xv[R];  // row r's broadcast quads: [nb, 8]
  const float* dx[R];    // [nb]
  const float* sx[R];    // [nb]
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    xv[r] = reinterpret_cast<const __m256i*>(xr.xb.data()) + (row0 + r) * nb * 8;
    dx[r] = xr.dx.data() + (row0 + r) * nb;
    sx[r] = xr.sx.data() + (row0 + r) * nb;
  }
  __m256 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wg + j * gb;
    // the two halves' passes consume the group's nb * gb bytes: prefetch half a block per iteration,
    // from half a group ahead (the next group's bytes while the second half reads L1)
    const char* pf = reinterpret_cast<const char*>(wg) + (h * nb + j + nb) * (gb / 2);
#pragma GCC unroll 3
    for (int64_t c = 0; c < gb / 2; c += 64) _mm_prefetch(pf + c, _MM_HINT_T0);
    // t outer, rows inner: one quad pair of weights live at a time, R int16 sums (exact in any order,
    // see above); the empty asm keeps GCC from reassociating the int16 adds, which hoists all 8 R
    // products ahead of their sums and spills them (asm of R = 4: 16 spilled vectors, 1.2x the time)
    __m256i s16[R];
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      __m256i wl, wh;
      q4_1_quads(blk, t, h, low, wl, wh);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i* xq = xv[r] + j * 8;
        const __m256i lo = _mm256_maddubs_epi16(wl, _mm256_loadu_si256(xq + t));
        s16[r] = t == 0 ? lo : _mm256_add_epi16(s16[r], lo);
        s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(wh, _mm256_loadu_si256(xq + 4 + t)));
        asm("" : "+x"(s16[r]));
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * h)));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * h)));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {  // widened once per block
      const __m256i dot = _mm256_madd_epi16(s16[r], ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(dx[r][j])), acc[r]);
      acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[r][j]), acc[r]);
    }
  }
  alignas(32) float out[8];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(out, acc[r]);
    for (int o = 0; o < 8; ++o) {
      const int64_t at = n + 8 * h + o;
      float s = out[o];
      if (add != nullptr) s += layer_math::load(add[r * ars + at]);
      y[r * ys + at] = layer_math::store<E>(s);
    }
  }
}

// Rows [row0, row0 + R) (R <= kChunkAvx2) of one group (16 outputs from n).
template <int64_t Q, typename E, int R>
__attribute__((always_inline)) inline void q16_chunk_avx2(const QuantRows16& xr, int64_t row0, int64_t nb,
                                                          const uint8_t* wg, const E* add, int64_t ars, E* y,
                                                          int64_t ys, int64_t n) {
  if constexpr (R < kHalfMinRowsAvx2 || Q == kQ8_0) {
    q16_both_avx2<Q, E, R>(xr, row0, nb, wg, add, ars, y, ys, n);
  } else {
    q16_half_avx2<E, R>(xr, row0, nb, wg, 0, add, ars, y, ys, n);
    q16_half_avx2<E, R>(xr, row0, nb, wg, 1, add, ars, y, ys, n);
  }
}

// One group (16 outputs from n) x R rows (R <= kMaxRowsAvx2), in row chunks of up to kChunkAvx2.
template <int64_t Q, typename E, int R>
__attribute__((always_inline)) inline void q16_group_avx2(const QuantRows16& xr, int64_t row0, int64_t nb,
                                                          const uint8_t* wg, const E* add, int64_t ars, E* y,
                                                          int64_t ys, int64_t n) {
  constexpr int R0 = R < kChunkAvx2 ? R : kChunkAvx2;
  q16_chunk_avx2<Q, E, R0>(xr, row0, nb, wg, add, ars, y, ys, n);
  if constexpr (R > kChunkAvx2)
    q16_chunk_avx2<Q, E, R - kChunkAvx2>(xr, row0 + kChunkAvx2, nb, wg, add != nullptr ? add + kChunkAvx2 * ars : nullptr,
                                         ars, y + kChunkAvx2 * ys, ys, n);
}

// Rows [row0, row0 + rows) x groups [g0, g1) (rows <= kMaxRowsAvx2).
template <int64_t Q, typename E>
void q16_avx2(const QuantRows16& xr, int64_t row0, int64_t K, int rows, const uint8_t* w, const E* add, int64_t ars,
              E* y, int64_t ys, int64_t g0, int64_t g1) {
  const int64_t nb = K / kBlock;
  with_row_count<kMaxRowsAvx2>(rows, [&](auto r) {
    for (int64_t g = g0; g < g1; ++g)
      q16_group_avx2<Q, E, decltype(r)::value>(xr, row0, nb, w + g * nb * group_bytes(Q), add, ars, y, ys,
                                               g * kGroup);
  });
}
#pragma GCC pop_options
#endif

template <int64_t Q, typename E>
void q16_typed(const E* xp, int64_t xs, int64_t M, int64_t K, const uint8_t* w, const E* ap, int64_t ars, E* yp,
               int64_t N) {
  const std::vector<float> xf = rows_to_fp32(xp, xs, M, K);  // x rows in fp32 once
  const int64_t G = N / kGroup;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(K, 1));  // groups per task
#if defined(__x86_64__) && defined(__GNUC__)
  // the int8 kernels: VNNI, else AVX2 (also AVX-512 without VNNI / with its extensions off)
  const bool vnni = cpu_isa::int8_dot_products();
  if (vnni || cpu_isa::best() != cpu_isa::Isa::kBase) {
    QuantRows16 xr;  // every row quantized once
    quantize_rows16(xf.data(), K, M, xr);
    if (!vnni && Q == kQ4_1 && M >= kHalfMinRowsAvx2) broadcast_quads(xr, M, K / kBlock);  // for q16_half_avx2
    for_row_passes(M, G, grain, vnni ? kMaxRows : kMaxRowsAvx2, [&](int64_t m0, int rows, int64_t g0, int64_t g1) {
      const E* a = ap != nullptr ? ap + m0 * ars : nullptr;
      if (vnni)
        q16_vnni<Q, E>(xr, m0, K, rows, w, a, ars, yp + m0 * N, N, g0, g1);
      else
        q16_avx2<Q, E>(xr, m0, K, rows, w, a, ars, yp + m0 * N, N, g0, g1);
    });
    return;
  }
#endif
  for_row_passes(M, G, grain, kMaxRows, [&](int64_t m0, int rows, int64_t g0, int64_t g1) {
    q16_loops<Q, E>(xf.data() + m0 * K, K, rows, w, ap != nullptr ? ap + m0 * ars : nullptr, ars, yp + m0 * N, N,
                    g0, g1);
  });
}

template <typename E>
void dispatch16(int64_t qtype, const E* xp, int64_t xs, int64_t M, int64_t K, const uint8_t* w, const E* ap,
                int64_t ars, E* yp, int64_t N) {
  if (qtype == kQ8_0) return q16_typed<kQ8_0, E>(xp, xs, M, K, w, ap, ars, yp, N);
  return q16_typed<kQ4_1, E>(xp, xs, M, K, w, ap, ars, yp, N);
}

void check_linear_rows_q16(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK_VALUE(qtype == kQ8_0 || qtype == kQ4_1, "qtype must be 0 (Q8_0) or 2 (Q4_1), got ", qtype);
  check_rows_quant(x, w, group_bytes(qtype));
}

// y = add + x @ dequant(w)^T into y [M, N] (checked by the callers).
void linear_rows_q16_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                          const std::optional<at::Tensor>& add) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * kGroup;
  const int64_t ars = check_rows_add(add, x, M, N);
  cpu_isa::check_variant();
  if (M == 0 || N == 0) return;
  const int64_t xs = M > 1 ? x.stride(0) : K;
  with_rows_dtype(x, add, y, [&](const auto* xp, const auto* ap, auto* yp) {
    using E = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
    dispatch16<E>(qtype, xp, xs, M, K, w.data_ptr<uint8_t>(), ap, ars, yp, N);
  });
}

at::Tensor linear_rows_q16_cpu(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                               const std::optional<at::Tensor>& add) {
  check_linear_rows_q16(x, w, qtype);
  at::Tensor y = at::empty({x.size(0), w.size(0) * kGroup}, x.options());
  linear_rows_q16_into(y, x, w, qtype, add);
  return y;
}

}  // namespace

namespace direct {
at::Tensor linear_rows_q16(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                           const std::optional<at::Tensor>& add) {
  return linear_rows_q16_cpu(x, w, qtype, add);
}
void linear_rows_q16_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                         const std::optional<at::Tensor>& add) {
  check_linear_rows_q16(x, w, qtype);
  check_out(y, x, x.size(0), w.size(0) * kGroup);
  linear_rows_q16_into(y, x, w, qtype, add);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("linear_rows_q16(Tensor x, Tensor w, int qtype, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("linear_rows_q16", &linear_rows_q16_cpu);
}

}  // namespace tandem_rt
