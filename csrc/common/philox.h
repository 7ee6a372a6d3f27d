// Counter-based Philox4x32-10 (Salmon et al., SC'11), identical on host and device.
//
// A draw is addressed by (seed, offset, subsequence, index): key = seed, counter =
// (index, subsequence, offset_lo, offset_hi). Sampling ops read (seed, offset) from an
// int64 [2] state tensor and use subsequence = batch row, index = draw number within the row,
// then advance offset by kRngOffsetStep, so every call (and every CUDA-graph replay) gets a
// fresh, non-overlapping block of counters. CPU and CUDA produce bit-identical numbers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TANDEM_HD __host__ __device__ __forceinline__
#else
#define TANDEM_HD inline
#endif

namespace tandem_rt {

// Offset advance per op call (sample and verify alike).
constexpr int64_t kRngOffsetStep = 1;

struct Philox4 {
  uint32_t x[4];
};

TANDEM_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds: counter c, key (k0, k1).
TANDEM_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kM0, c.x[0], &hi0);
    const uint32_t lo1 = philox_mulhilo(kM1, c.x[2], &hi1);
    c = Philox4{{hi1 ^ c.x[1] ^ k0, lo1, hi0 ^ c.x[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// Uniform float in [0, 1) with 24 random bits (exactly representable, so host == device).
TANDEM_HD float philox_uniform(int64_t seed, int64_t offset, uint32_t subsequence, uint32_t index) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const Philox4 c{{index, subsequence, static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32)}};
  const Philox4 r = philox4x32_10(c, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return static_cast<float>(r.x[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace tandem_rt
