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

}  // namespace tandem_rt
