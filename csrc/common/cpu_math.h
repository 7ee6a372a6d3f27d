// Scalar math for the CPU kernels, written so that the compiler vectorises the loops using it.
#pragma once

#include <bit>
#include <cstdint>

namespace tandem_rt {

// exp(x) for x <= 0 (Cephes polynomial, ~2 ulp), written so that the compiler vectorises it.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  return y * std::bit_cast<float>(bits);
}

// SiLU x * sigmoid(x) = x / (1 + e^-x), from exp of a non-positive argument only (no overflow).
__attribute__((always_inline)) inline float silu(float x) {
  const float s = exp_nonpos(x < 0.f ? x : -x);  // e^-|x|
  return (x < 0.f ? x * s : x) / (1.f + s);
}

// bf16 (raw bits) <-> fp32 without library calls, so that loops over them vectorise.
__attribute__((always_inline)) inline float bf16_to_float(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}
// Round to nearest even; NaN stays a (quiet) NaN, as c10::BFloat16 does.
__attribute__((always_inline)) inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0u) : rounded;
}

}  // namespace tandem_rt
