// GCC vector types of 16 fp32 lanes and their helpers for the AVX-512 code of the CPU kernels.
// Include it inside a `#pragma GCC target("avx512f,...")` region and inside the includer's namespace
// (attention_chunk_cpu.h, mm_rows.cpp): the functions are then compiled for that target, in a
// nested namespace `avx512`. <cstdint>, <cstring> and <immintrin.h> must be included before.
#pragma once

namespace avx512 {

typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

__attribute__((always_inline)) inline v16f ld16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void st16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
// 16 bf16 (raw bits) -> 16 fp32: zero-extend and shift into the high half. One 512-bit vpmovzxwd
// from memory (GCC lowers __builtin_convertvector of this shape to two 256-bit halves and an insert).
// The zero-masked intrinsics with every lane kept are the same instructions, without GCC 12's
// false -Wmaybe-uninitialized in the unmasked ones.
__attribute__((always_inline)) inline v16f ld16(const uint16_t* p) {
  const __m512i w = _mm512_maskz_slli_epi32(
      0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return (v16f)_mm512_castsi512_ps(w);
}

// r[k] = sum of the 16 lanes of p[k], k = 0..15 (a shuffle-add tree: 45 vector ops for 16 sums).
__attribute__((always_inline)) inline v16f hsum16(const v16f (&p)[16]) {
  const v16i lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const v16i lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const v16i hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const v16i lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const v16i hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const v16i lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const v16i hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  v16f c[8], d[4], e[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    c[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], lo1) + __builtin_shuffle(p[2 * i], p[2 * i + 1], hi1);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], lo2) + __builtin_shuffle(c[2 * i], c[2 * i + 1], hi2);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    e[i] = __builtin_shuffle(d[2 * i], d[2 * i + 1], lo3) + __builtin_shuffle(d[2 * i], d[2 * i + 1], hi3);
  return __builtin_shuffle(e[0], e[1], lo4) + __builtin_shuffle(e[0], e[1], hi4);
}

}  // namespace avx512
