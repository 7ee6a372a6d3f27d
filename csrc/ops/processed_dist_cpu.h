// The processed sampling distribution on the CPU (temperature, top-k, top-p), shared by the
// sample and verify ops. Plain C++ (no ATen). The CUDA counterpart is
// kernels/processed_dist.cuh; both keep the same token set:
//   * temperature 0: one-hot at the argmax (lowest index on ties);
//   * non-finite logits are clamped first (sanitize_logit: +inf -> largest float, -inf / NaN ->
//     lowest float);
//   * otherwise p = softmax(logits / T) in fp32, computed as exp((l - max) / T), restricted to the top_k most likely tokens
//     (top_k 0 or >= V: off), then to the smallest prefix of most likely tokens whose
//     cumulative probability (renormalised over the top-k set) reaches top_p (1: off),
//     renormalised. "Most likely" = larger logit first, lower token index on ties.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/sampling_common.h"

namespace tandem_rt::cpu {

// Lowest index of the largest logit (float_order_key order). logits: [V]. The argmax variants
// below compare sanitised floats, which have equal keys except -0.0 / +0.0, so a maximum of zero
// takes this key loop (its keys order -0.0 below +0.0).
inline int64_t argmax_lowest_keys(const float* logits, int64_t V) {
  int64_t best = 0;
  uint32_t best_key = float_order_key(logits[0]);
  for (int64_t j = 1; j < V; ++j) {
    const uint32_t k = float_order_key(logits[j]);
    if (k > best_key) best_key = k, best = j;
  }
  return best;
}

// Lowest index of the largest sanitised logit; the scalar loops below, or their AVX-512 / AVX2
// forms (ops/argmax_cpu.cpp, chosen as the other CPU kernels are: cpu_isa::best()). logits: [V], V >= 1.
int64_t argmax_lowest(const float* logits, int64_t V);
// The same over bf16 logits (bits [V]; widened to fp32 exactly, so the index is argmax_lowest's of
// the widened row).
int64_t argmax_lowest_bf16(const uint16_t* logits, int64_t V);

// The portable variant: the largest sanitised logit over 16 independent lanes (vectorised by the
// compiler), then the first index holding it.
inline int64_t argmax_lowest_base(const float* logits, int64_t V) {
  constexpr int kLanes = 16;
  float lane_max[kLanes];
  for (int l = 0; l < kLanes; ++l) lane_max[l] = sanitize_logit(logits[0]);
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = sanitize_logit(logits[j + l]);
      lane_max[l] = v > lane_max[l] ? v : lane_max[l];
    }
  float m = lane_max[0];
  for (int l = 1; l < kLanes; ++l) m = lane_max[l] > m ? lane_max[l] : m;
  for (; j < V; ++j) {
    const float v = sanitize_logit(logits[j]);
    m = v > m ? v : m;
  }
  if (m == 0.0f) return argmax_lowest_keys(logits, V);
  for (int64_t i = 0; i < V; ++i)
    if (sanitize_logit(logits[i]) == m) return i;
  return 0;  // unreachable: m is one of the sanitised logits
}

// Writes the processed distribution of one row into probs (zeros outside the kept set).
//   logits: [V] fp32; probs: [V] fp32 out; order: scratch.
inline void processed_distribution(const float* logits, int64_t V, float temperature, int64_t top_k, float top_p,
                                   float* probs, std::vector<int32_t>& order) {
  if (!(temperature > 0.0f)) {
    std::fill(probs, probs + V, 0.0f);
    probs[argmax_lowest(logits, V)] = 1.0f;
    return;
  }
  float mx = sanitize_logit(logits[0]);
  for (int64_t j = 1; j < V; ++j) mx = std::max(mx, sanitize_logit(logits[j]));
  // exp((l - max) / T): no overflow for tiny temperatures (the maximum gets weight 1)
  for (int64_t j = 0; j < V; ++j) probs[j] = std::exp((sanitize_logit(logits[j]) - mx) / temperature);

  const bool use_k = top_k > 0 && top_k < V;
  const bool use_p = top_p < 1.0f;
  if (!use_k && !use_p) {
    float s = 0.0f;
    for (int64_t j = 0; j < V; ++j) s += probs[j];
    const float inv = 1.0f / s;
    for (int64_t j = 0; j < V; ++j) probs[j] *= inv;
    return;
  }
  order.resize(V);
  std::iota(order.begin(), order.end(), 0);
  auto more_likely = [logits](int32_t a, int32_t b) {
    const uint32_t ka = float_order_key(logits[a]), kb = float_order_key(logits[b]);
    return ka != kb ? ka > kb : a < b;
  };
  const int64_t K = use_k ? top_k : V;
  if (use_k) {
    std::partial_sort(order.begin(), order.begin() + K, order.end(), more_likely);
  } else {
    std::sort(order.begin(), order.end(), more_likely);
  }
  int64_t L = K;
  if (use_p) {
    float mass = 0.0f;
    for (int64_t t = 0; t < K; ++t) mass += probs[order[t]];
    const float target = top_p * mass;
    float cum = 0.0f;
    for (int64_t t = 0; t < K; ++t) {
      cum += probs[order[t]];
      if (cum >= target) {
        L = t + 1;
        break;
      }
    }
  }
  float s = 0.0f;
  for (int64_t t = 0; t < L; ++t) s += probs[order[t]];
  const float inv = 1.0f / s;
  // Scale the kept tokens, zero the others (order[L:] lists exactly the dropped ones).
  for (int64_t t = 0; t < L; ++t) probs[order[t]] *= inv;
  for (int64_t t = L; t < V; ++t) probs[order[t]] = 0.0f;
}

// Inverse-CDF draw: the first index whose inclusive running sum of weights exceeds u * total
// (falls back to the last positive weight if rounding leaves the target unreached).
//   weights: [V] non-negative.
inline int64_t sample_from_weights(const float* weights, int64_t V, float total, float u) {
  const float target = u * total;
  float cum = 0.0f;
  int64_t last = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (weights[j] > 0.0f) {
      last = j;
      cum += weights[j];
      if (cum > target) return j;
    }
  }
  return last;
}

}  // namespace tandem_rt::cpu
