// Row loops of the CPU layer-math ops (rms_norm.cpp, silu_and_mul.cpp), compiled for AVX-512,
// AVX2+FMA and baseline x86-64 and chosen at run time. Elements are float, raw bf16 bits
// (uint16_t, converted with integer ops so the loops vectorise) or c10::Half (scalar).
#pragma once

#include "common/cpu_math.h"
#include "common/cpu_isa.h"
#include "common/torch_headers.h"

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace tandem_rt {
namespace layer_math {

template <typename E>
__attribute__((always_inline)) inline float load(E v) {
  if constexpr (std::is_same_v<E, uint16_t>) return bf16_to_float(v);
  else return static_cast<float>(v);
}
// Round an fp32 value to the element type and back (the reference's intermediate rounding).
template <typename E>
__attribute__((always_inline)) inline float round_to(float f) {
  if constexpr (std::is_same_v<E, uint16_t>) return bf16_to_float(float_to_bf16(f));
  else return static_cast<float>(static_cast<E>(f));
}
template <typename E>
__attribute__((always_inline)) inline E store(float f) {
  if constexpr (std::is_same_v<E, uint16_t>) return float_to_bf16(f);
  else return static_cast<E>(f);
}

// y[i] = round(w[i] * round(x[i] * rsqrt(mean(x^2) + eps))); x, w, y: [d]
template <typename E>
__attribute__((always_inline)) inline void rms_norm_row(const E* x, const E* w, E* y, int64_t d, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) {
    const float v = load(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] = store<E>(load(w[i]) * round_to<E>(load(x[i]) * inv));
}

// y[i] = round(round(silu(g[i])) * u[i]); g, u, y: [n]
template <typename E>
__attribute__((always_inline)) inline void silu_mul_row(const E* g, const E* u, E* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = store<E>(round_to<E>(silu(load(g[i]))) * load(u[i]));
}

#define TANDEM_LAYER_MATH_VARIANT(suffix, attr)                                                           \
  template <typename E>                                                                                  \
  attr void rms_norm_rows_##suffix(const E* x, int64_t x_stride, const E* w, E* y, int64_t r0, int64_t r1, \
                                   int64_t d, float eps) {                                               \
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * x_stride, w, y + r * d, d, eps);              \
  }                                                                                                      \
  template <typename E>                                                                                  \
  attr void silu_mul_rows_##suffix(const E* x, int64_t x_stride, E* y, int64_t r0, int64_t r1, int64_t n) { \
    for (int64_t r = r0; r < r1; ++r) silu_mul_row(x + r * x_stride, x + r * x_stride + n, y + r * n, n); \
  }
#if defined(__x86_64__) && defined(__GNUC__)
TANDEM_LAYER_MATH_VARIANT(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
TANDEM_LAYER_MATH_VARIANT(avx2, __attribute__((target("avx2,fma"))))
#endif
TANDEM_LAYER_MATH_VARIANT(base, )
#undef TANDEM_LAYER_MATH_VARIANT

// Rows [r0, r1) of x: [rows, d] (row stride x_stride) -> y: [rows, d] contiguous.
template <typename E>
void rms_norm_rows(const E* x, int64_t x_stride, const E* w, E* y, int64_t r0, int64_t r1, int64_t d, float eps) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa::best()) {
    case cpu_isa::Isa::kAvx512: return rms_norm_rows_avx512(x, x_stride, w, y, r0, r1, d, eps);
    case cpu_isa::Isa::kAvx2: return rms_norm_rows_avx2(x, x_stride, w, y, r0, r1, d, eps);
    default: break;
  }
#endif
  rms_norm_rows_base(x, x_stride, w, y, r0, r1, d, eps);
}

// Rows [r0, r1) of x: [rows, 2n] (gate columns, then up; row stride x_stride) -> y: [rows, n].
template <typename E>
void silu_mul_rows(const E* x, int64_t x_stride, E* y, int64_t r0, int64_t r1, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa::best()) {
    case cpu_isa::Isa::kAvx512: return silu_mul_rows_avx512(x, x_stride, y, r0, r1, n);
    case cpu_isa::Isa::kAvx2: return silu_mul_rows_avx2(x, x_stride, y, r0, r1, n);
    default: break;
  }
#endif
  silu_mul_rows_base(x, x_stride, y, r0, r1, n);
}

// Calls f(E{}) with E = float, uint16_t (bf16 bits) or c10::Half for the dtype of the tensors;
// callers reinterpret data pointers with elems<E>(t).
template <typename F>
void dispatch_elem(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) f(float{});
  else if (dtype == at::kBFloat16) f(uint16_t{});
  else f(c10::Half{});
}

template <typename E>
E* elems(const at::Tensor& t) {
  return static_cast<E*>(t.data_ptr());
}

}  // namespace layer_math
}  // namespace tandem_rt
