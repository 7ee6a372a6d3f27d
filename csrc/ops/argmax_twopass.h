// The two-pass greedy argmax of argmax_cpu.cpp, written once for every vector width. Included (no
// include guard) inside each ISA's `#pragma GCC target` region and inside a namespace that defines
//   Vec (a vector of kW fp32 lanes), constexpr int kW,
//   Vec splat(float), Vec vmax(Vec, Vec), Vec sanitize(Vec) (sanitize_logit per lane),
//   Vec load(const float*), Vec load(const uint16_t*) (bf16 bits, widened exactly),
//   void store(float*, Vec), unsigned eq_bits(Vec, Vec) (bit l: lane l equal),
// and, outside, float load1(const float*), load1(const uint16_t*) (one logit as fp32).
//
// argmax_twopass(logits [V], V >= 1, keys): the lowest index of the largest sanitised logit. Pass
// 1: the maximum, 4 vectors per iteration into independent maxima, the tail (< kW logits) scalar;
// pass 2: the first index holding it. Sanitised floats are compared exactly (no NaN), so the index
// does not depend on the vector width, except that a maximum of zero (whose sign may depend on the
// order) takes the key loop `keys`, which orders -0.0 below +0.0.
template <typename E>
int64_t argmax_twopass(const E* logits, int64_t V, int64_t (*keys)(const E*, int64_t)) {
  const Vec lowest = splat(-kMaxLogit);
  Vec m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 4 * kW <= V; j += 4 * kW) {
    m0 = vmax(m0, sanitize(load(logits + j)));
    m1 = vmax(m1, sanitize(load(logits + j + kW)));
    m2 = vmax(m2, sanitize(load(logits + j + 2 * kW)));
    m3 = vmax(m3, sanitize(load(logits + j + 3 * kW)));
  }
  for (; j + kW <= V; j += kW) m0 = vmax(m0, sanitize(load(logits + j)));
  alignas(64) float lanes[kW];
  store(lanes, vmax(vmax(m0, m1), vmax(m2, m3)));
  float m = lanes[0];
  for (int l = 1; l < kW; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (; j < V; ++j) {
    const float v = sanitize_logit(load1(logits + j));
    m = v > m ? v : m;
  }
  if (m == 0.0f) return keys(logits, V);
  const Vec mv = splat(m);
  for (j = 0; j + kW <= V; j += kW) {
    const unsigned hit = eq_bits(sanitize(load(logits + j)), mv);
    if (hit) return j + __builtin_ctz(hit);
  }
  for (; j < V; ++j)
    if (sanitize_logit(load1(logits + j)) == m) return j;
  return 0;  // unreachable: m is one of the sanitised logits
}
