// Greedy token choice of the sample and verify ops on the CPU: cpu::argmax_lowest, the lowest index
// of the largest sanitised logit (processed_dist_cpu.h). Two passes over the row: its maximum, then
// the first index holding it (ops/argmax_twopass.h, compiled for AVX-512 with 16 lanes and for AVX2
// with 8); the portable variant (argmax_lowest_base) is what the compiler makes of the scalar loops,
// ~6x slower on a 49,152-word row. All give the same index for every input (sanitised compares
// only; a maximum of zero takes the key loop, which orders -0.0 below +0.0).
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

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")

#include "common/avx512_vec.h"  // ld16: 16 bf16 widened to fp32 (compiled for this region's target)

namespace isa_avx512 {
using Vec = __m512;
constexpr int kW = 16;
inline Vec splat(float x) { return _mm512_set1_ps(x); }
// _mm512_max_ps / _mm512_min_ps by their zero-masked forms with every lane kept: the same
// instructions, without GCC 12's false -Wmaybe-uninitialized in the unmasked intrinsics.
inline Vec vmax(Vec a, Vec b) { return _mm512_maskz_max_ps(0xFFFF, a, b); }
inline Vec sanitize(Vec v) {  // NaN -> lowest float, +-inf -> +-largest float
  v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), splat(-kMaxLogit));
  return _mm512_maskz_min_ps(0xFFFF, vmax(v, splat(-kMaxLogit)), splat(kMaxLogit));
}
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const uint16_t* p) { return (Vec)avx512::ld16(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline unsigned eq_bits(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
#include "ops/argmax_twopass.h"
}  // namespace isa_avx512

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "common/avx2_vec.h"  // ld8: 8 bf16 widened to fp32 (compiled for this region's target)

namespace isa_avx2 {
using Vec = __m256;
constexpr int kW = 8;
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }  // b only for a NaN, which sanitize removed
inline Vec sanitize(Vec v) {  // NaN -> lowest float, +-inf -> +-largest float
  v = _mm256_blendv_ps(v, splat(-kMaxLogit), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_min_ps(vmax(v, splat(-kMaxLogit)), splat(kMaxLogit));
}
inline Vec load(const float* p) { return avx2::ld8(p); }
inline Vec load(const uint16_t* p) { return avx2::ld8(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline unsigned eq_bits(Vec a, Vec b) { return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ))); }
#include "ops/argmax_twopass.h"
}  // namespace isa_avx2

#pragma GCC pop_options
#endif

// argmax_lowest_keys over a bf16 row: the definition itself (largest key, lowest index), the
// portable variant and the vector variants' fallback for a maximum of zero.
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
  if (V >= 1 && cpu_isa::best() == cpu_isa::Isa::kAvx512) return isa_avx512::argmax_twopass(logits, V, keys);
  if (V >= 1 && cpu_isa::best() == cpu_isa::Isa::kAvx2) return isa_avx2::argmax_twopass(logits, V, keys);
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
