// The int8 quantization of activation rows shared by the int8 few-row product kernels
// (linear_rows_q16.cpp, and linear_rows_q.cpp's VNNI kernel): one block of 32 fp32 values at a
// time, AVX2 (every int8 kernel runs where AVX2 does); its callers are compiled for AVX2 too
// (#pragma GCC target("avx2,fma") or wider), so that it inlines.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace tandem_rt {
namespace quant_x {

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// One block of 32 fp32 x -> 32 int8 xq (AVX2; every int8 kernel runs where AVX2 does):
//   dx = max|x| / 127 (NaN when the block holds a NaN, so that it reaches the output),
//   xq = round-half-even(x * (1 / dx)) clamped to [-127, 127] (0 when dx = 0),
//   sx = the fp32 sum of x in a fixed order: lane sums w[l] = (x[l] + x[16+l]) + (x[8+l] + x[24+l])
//        for l < 8, then w[0..3] + w[4..7], then the two halves, then the last pair,
//   isum = the integer sum of xq.
__attribute__((always_inline)) inline void quantize_block32(const float* xb, int8_t* dst, float& dx_out,
                                                            float& sx_out, int32_t& isum_out) {
  const __m256 y0 = _mm256_loadu_ps(xb), y1 = _mm256_loadu_ps(xb + 8);
  const __m256 y2 = _mm256_loadu_ps(xb + 16), y3 = _mm256_loadu_ps(xb + 24);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 am = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, y0), _mm256_andnot_ps(sign, y1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, y2), _mm256_andnot_ps(sign, y3)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4);
  const __m256 w = _mm256_add_ps(_mm256_add_ps(y0, y2), _mm256_add_ps(y1, y3));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
  const float sum = _mm_cvtss_f32(s4);
  float dx = amax / 127.f;
  const float inv = dx > 0.f ? 1.f / dx : 0.f;
  if (std::isnan(sum)) dx = std::numeric_limits<float>::quiet_NaN();
  const __m256 vi = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  auto q = [&](__m256 y) {  // round-half-even (the default MXCSR rounding), clamped
    return _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(y, vi)), lo), hi);
  };
  const __m256i q0 = q(y0), q1 = q(y1), q2 = q(y2), q3 = q(y3);
  // int32 -> int8 (values in [-127, 127]): the packs interleave 128-bit lanes, the permute restores order
  const __m256i p01 = _mm256_packs_epi32(q0, q1), p23 = _mm256_packs_epi32(q2, q3);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), b);
  const __m256i t = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
  dx_out = dx;
  sx_out = sum;
  isum_out = _mm_cvtsi128_si32(t4);
}

#pragma GCC pop_options

}  // namespace quant_x
}  // namespace tandem_rt
#endif
