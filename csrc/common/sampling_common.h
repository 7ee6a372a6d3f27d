// Definitions shared by the CPU and CUDA sampling ops (host/device, no ATen), so that both
// devices order tokens, address random numbers and test acceptance the same way.
#pragma once

#include <cstdint>

#include "common/philox.h"

namespace tandem_rt {

// Non-finite logits follow one rule on both devices: they are clamped to the finite float range,
// +inf -> the largest float (the +inf tokens share the distribution's mass, and greedy picks the
// lowest such index), -inf and NaN -> the lowest float (never chosen unless every logit is).
constexpr float kMaxLogit = 3.402823466e+38f;  // the largest float: sanitize_logit's bound
TANDEM_HD float sanitize_logit(float x) {
  return x != x ? -kMaxLogit : (x > kMaxLogit ? kMaxLogit : (x < -kMaxLogit ? -kMaxLogit : x));
}

// Total order key of a (sanitised) float: larger float -> larger key (-0.0 sorts just below +0.0).
// "Most likely" token order everywhere = key descending, then token index ascending.
TANDEM_HD uint32_t float_order_key(float f) {
  f = sanitize_logit(f);
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

TANDEM_HD float float_from_order_key(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Random-number addressing (Philox subsequence = batch row):
//   sample: draw 0 of each row.
//   verify: draw 2*i tests acceptance of draft i; draw 2*i+1 samples the correction token at
//           position i (rejection at i, or the bonus token when i == draft length).
// The Philox key of batch row b. rng_rows == 0: one (seed, offset) state [2] for the batch, row b
// drawing subsequence b. rng_rows > 0: per-row states [rng_rows, 2] (seed_b, offset_b), subsequence
// 0, so a row's draws depend on its own state only, not on its batch partners or its row index.
struct RowRngKey {
  int64_t seed;
  int64_t offset;
  uint32_t sub;
};
TANDEM_HD RowRngKey row_rng_key(const int64_t* rng_state, int rng_rows, int64_t b) {
  if (rng_rows > 0) return RowRngKey{rng_state[2 * b], rng_state[2 * b + 1], 0u};
  return RowRngKey{rng_state[0], rng_state[1], static_cast<uint32_t>(b)};
}
TANDEM_HD float row_uniform(const RowRngKey& k, uint32_t index) { return philox_uniform(k.seed, k.offset, k.sub, index); }

TANDEM_HD uint32_t sample_draw_index() { return 0u; }
TANDEM_HD uint32_t verify_accept_draw_index(int i) { return 2u * static_cast<uint32_t>(i); }
TANDEM_HD uint32_t verify_emit_draw_index(int i) { return 2u * static_cast<uint32_t>(i) + 1u; }

// Accept draft token x with probability min(1, p(x)/q(x)) given u ~ U[0, 1).
TANDEM_HD bool accept_draft(float u, float p_x, float q_x) { return u * q_x < p_x; }

// The residual max(0, p - q) counts as empty below this total mass; then the correction
// token is sampled from p itself.
constexpr float kResidualMinMass = 1e-6f;

}  // namespace tandem_rt
