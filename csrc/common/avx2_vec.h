// 8-lane fp32 loads for the AVX2 code of the CPU kernels. Include it inside a
// `#pragma GCC target("avx2,...")` region and inside the includer's namespace (argmax_cpu.cpp,
// attention_chunk_cpu.h): the functions are then compiled for that target, in a nested namespace
// `avx2`. <cstdint> and <immintrin.h> must be included before.
#pragma once

namespace avx2 {

__attribute__((always_inline)) inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
// 8 bf16 (raw bits) -> 8 fp32, exactly: zero-extend and shift into the high half.
__attribute__((always_inline)) inline __m256 ld8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

}  // namespace avx2
