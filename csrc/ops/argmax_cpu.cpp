// Greedy token choice of the sample and verify ops on the CPU: cpu::argmax_lowest, the lowest index
// of the largest sanitised logit (processed_dist_cpu.h). Two passes over the row: its maximum, then
// the first index holding it. The AVX-512 variant reads 64 logits per iteration into four
// independent maxima and finds the first match with one compare mask per 16 logits; the portable
// variant (argmax_lowest_base) is what the compiler makes of the scalar loops, ~6x slower on a
// 49,152-word row. Both give the same index for every input (sanitised compares only; a maximum of
// zero takes the key loop, which orders -0.0 below +0.0).
#include "common/cpu_isa.h"
#include "ops/processed_dist_cpu.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace tandem_rt::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")

constexpr float kMaxLogit = 3.402823466e+38f;  // sanitize_logit's bound

// _mm512_max_ps / _mm512_min_ps by their zero-masked forms with every lane kept: the same
// instructions, without GCC 12's false -Wmaybe-uninitialized in the unmasked intrinsics.
inline __m512 max16(__m512 a, __m512 b) { return _mm512_maskz_max_ps(0xFFFF, a, b); }
inline __m512 min16(__m512 a, __m512 b) { return _mm512_maskz_min_ps(0xFFFF, a, b); }

// sanitize_logit on 16 lanes: NaN -> lowest float, +-inf -> +-largest float.
inline __m512 sanitize16(__m512 v) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(-kMaxLogit));
  return min16(max16(v, _mm512_set1_ps(-kMaxLogit)), _mm512_set1_ps(kMaxLogit));
}

// logits: [V], V >= 1.
int64_t argmax_lowest_avx512(const float* logits, int64_t V) {
  const __m512 lowest = _mm512_set1_ps(-kMaxLogit);
  __m512 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 64 <= V; j += 64) {
    m0 = max16(m0, sanitize16(_mm512_loadu_ps(logits + j)));
    m1 = max16(m1, sanitize16(_mm512_loadu_ps(logits + j + 16)));
    m2 = max16(m2, sanitize16(_mm512_loadu_ps(logits + j + 32)));
    m3 = max16(m3, sanitize16(_mm512_loadu_ps(logits + j + 48)));
  }
  for (; j + 16 <= V; j += 16) m0 = max16(m0, sanitize16(_mm512_loadu_ps(logits + j)));
  if (j < V) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (V - j)) - 1u);
    m0 = max16(m0, sanitize16(_mm512_mask_loadu_ps(lowest, tail, logits + j)));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, max16(max16(m0, m1), max16(m2, m3)));
  float m = lanes[0];
  for (int l = 1; l < 16; ++l) m = lanes[l] > m ? lanes[l] : m;
  if (m == 0.0f) return argmax_lowest_keys(logits, V);
  const __m512 mv = _mm512_set1_ps(m);
  for (j = 0; j + 16 <= V; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(sanitize16(_mm512_loadu_ps(logits + j)), mv, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  if (j < V) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (V - j)) - 1u);
    const __m512 v = sanitize16(_mm512_mask_loadu_ps(lowest, tail, logits + j));
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail, v, mv, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  return 0;  // unreachable: m is one of the sanitised logits
}

#pragma GCC pop_options
#endif

}  // namespace

int64_t argmax_lowest(const float* logits, int64_t V) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (V >= 1 && cpu_isa::best() == cpu_isa::Isa::kAvx512) return argmax_lowest_avx512(logits, V);
#endif
  return argmax_lowest_base(logits, V);
}

}  // namespace tandem_rt::cpu
