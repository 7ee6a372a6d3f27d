// Greedy token choice of the sample and verify ops on the CPU: cpu::argmax_lowest, the lowest index
// of the largest sanitised logit (processed_dist_cpu.h). Two passes over the row: its maximum, then
// the first index holding it. The AVX-512 variant reads 64 logits per iteration into four
// independent maxima and finds the first match with one compare mask per 16 logits; the AVX2 one
// 32 and 8, with scalar tails; the portable variant (argmax_lowest_base) is what the compiler makes
// of the scalar loops, ~6x slower on a 49,152-word row. All give the same index for every input
// (sanitised compares only; a maximum of zero takes the key loop, which orders -0.0 below +0.0).
#include "common/cpu_isa.h"
#include "common/cpu_math.h"
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

#include "common/avx512_vec.h"  // ld16: 16 bf16 widened to fp32 (compiled for this region's target)

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

// 16 logits from p as fp32 (tail: the lanes of mask, the others `fill`; bf16 widened exactly).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return (__m512)avx512::ld16(p); }
inline __m512 load16(const float* p, __mmask16 mask, __m512 fill) { return _mm512_mask_loadu_ps(fill, mask, p); }
inline __m512 load16(const uint16_t* p, __mmask16 mask, __m512 fill) {
  alignas(32) uint16_t tail[16] = {};
  for (int l = 0; l < 16; ++l)
    if (mask >> l & 1) tail[l] = p[l];
  return _mm512_mask_mov_ps(fill, mask, load16(tail));
}

// logits: [V] fp32 or bf16 bits, V >= 1; keys: the key loop over the same row (a maximum of zero).
template <typename E>
int64_t argmax_lowest_avx512(const E* logits, int64_t V, int64_t (*keys)(const E*, int64_t)) {
  const __m512 lowest = _mm512_set1_ps(-kMaxLogit);
  __m512 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 64 <= V; j += 64) {
    m0 = max16(m0, sanitize16(load16(logits + j)));
    m1 = max16(m1, sanitize16(load16(logits + j + 16)));
    m2 = max16(m2, sanitize16(load16(logits + j + 32)));
    m3 = max16(m3, sanitize16(load16(logits + j + 48)));
  }
  for (; j + 16 <= V; j += 16) m0 = max16(m0, sanitize16(load16(logits + j)));
  if (j < V) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (V - j)) - 1u);
    m0 = max16(m0, sanitize16(load16(logits + j, tail, lowest)));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, max16(max16(m0, m1), max16(m2, m3)));
  float m = lanes[0];
  for (int l = 1; l < 16; ++l) m = lanes[l] > m ? lanes[l] : m;
  if (m == 0.0f) return keys(logits, V);
  const __m512 mv = _mm512_set1_ps(m);
  for (j = 0; j + 16 <= V; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(sanitize16(load16(logits + j)), mv, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  if (j < V) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (V - j)) - 1u);
    const __m512 v = sanitize16(load16(logits + j, tail, lowest));
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail, v, mv, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  return 0;  // unreachable: m is one of the sanitised logits
}

#pragma GCC pop_options

// ---- AVX2: the same two passes, 8 lanes per vector, 32 logits per iteration of the max pass; the
// tail (fewer than 8 logits) by scalar compares with sanitize_logit.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// sanitize_logit on 8 lanes (NaN -> lowest float, +-inf -> +-largest float); max / min take the
// second operand only for a NaN, which the blend has removed.
inline __m256 sanitize8(__m256 v) {
  v = _mm256_blendv_ps(v, _mm256_set1_ps(-kMaxLogit), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-kMaxLogit)), _mm256_set1_ps(kMaxLogit));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 widened exactly
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

// logits: [V] fp32 or bf16 bits, V >= 1; keys: the key loop over the same row (a maximum of zero).
template <typename E>
int64_t argmax_lowest_avx2(const E* logits, int64_t V, int64_t (*keys)(const E*, int64_t)) {
  const __m256 lowest = _mm256_set1_ps(-kMaxLogit);
  __m256 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 32 <= V; j += 32) {
    m0 = _mm256_max_ps(m0, sanitize8(load8(logits + j)));
    m1 = _mm256_max_ps(m1, sanitize8(load8(logits + j + 8)));
    m2 = _mm256_max_ps(m2, sanitize8(load8(logits + j + 16)));
    m3 = _mm256_max_ps(m3, sanitize8(load8(logits + j + 24)));
  }
  for (; j + 8 <= V; j += 8) m0 = _mm256_max_ps(m0, sanitize8(load8(logits + j)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (; j < V; ++j) {
    const float v = sanitize_logit(load1(logits + j));
    m = v > m ? v : m;
  }
  if (m == 0.0f) return keys(logits, V);
  const __m256 mv = _mm256_set1_ps(m);
  for (j = 0; j + 8 <= V; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(sanitize8(load8(logits + j)), mv, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(hit);
  }
  for (; j < V; ++j)
    if (sanitize_logit(load1(logits + j)) == m) return j;
  return 0;  // unreachable: m is one of the sanitised logits
}

#pragma GCC pop_options
#endif

// argmax_lowest_keys over a bf16 row: the definition itself (largest key, lowest index), the
// portable variant and the AVX-512 variant's fallback for a maximum of zero.
int64_t argmax_lowest_keys_bf16(const uint16_t* logits, int64_t V) {
  int64_t best = 0;
  uint32_t best_key = float_order_key(bf16_to_float(logits[0]));
  for (int64_t j = 1; j < V; ++j) {
    const uint32_t k = float_order_key(bf16_to_float(logits[j]));
    if (k > best_key) best_key = k, best = j;
  }
  return best;
}

// The AVX-512 or AVX2 variant where this CPU runs it (cpu_isa::best()), else `portable`.
template <typename E>
int64_t argmax_dispatch(const E* logits, int64_t V, int64_t (*keys)(const E*, int64_t),
                        int64_t (*portable)(const E*, int64_t)) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (V >= 1 && cpu_isa::best() == cpu_isa::Isa::kAvx512) return argmax_lowest_avx512(logits, V, keys);
  if (V >= 1 && cpu_isa::best() == cpu_isa::Isa::kAvx2) return argmax_lowest_avx2(logits, V, keys);
#endif
  return portable(logits, V);
}

}  // namespace

int64_t argmax_lowest(const float* logits, int64_t V) {
  return argmax_dispatch(logits, V, argmax_lowest_keys, argmax_lowest_base);
}

int64_t argmax_lowest_bf16(const uint16_t* logits, int64_t V) {
  return argmax_dispatch(logits, V, argmax_lowest_keys_bf16, argmax_lowest_keys_bf16);
}

}  // namespace tandem_rt::cpu
