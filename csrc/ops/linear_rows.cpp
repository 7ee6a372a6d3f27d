// Op tandem_rt::linear_rows (CPU, bf16 or fp32): y = add + x @ w^T for a few rows x: [M, K] and a
// weight in nn.Linear's layout w: [N, K], fp32 accumulation and one rounding to the dtype at the end.
// Decode and verify steps multiply a few rows by every weight of the model, so the weight stream
// dominates: each output is a dot product along a contiguous weight row, the rows stream in address
// order (prefetched ahead of the loads), and up to 8 query rows share each weight load
// (register-blocked: 16 vector accumulators, one shuffle tree for their 16 sums). Each output's
// arithmetic is the same whatever M is, so a row's result does not depend on the other rows.
// Variants: AVX-512 BF16 (bf16: vdpbf16ps on the rows as stored: exact products, fp32 pairwise
// accumulation), AVX-512F (x rows in fp32 once, each weight vector widened on load), AVX2 and scalar.
#include "ops/direct.h"
#include "common/check.h"
#include "ops/layer_math_cpu.h"
#include "ops/rows_args.h"

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace tandem_rt {
namespace {

constexpr int kMaxRows = 8;  // rows per pass over the weight
constexpr int kPrefetchBytes = 8192;  // how far ahead of its loads the kernels prefetch the weight stream

// Any ISA: y[m, n] for n in [n0, n1), m < rows. E: uint16_t (bf16 bits) or float. xf: [rows, K]
// fp32; w: [N, K]; add: null, [N] (ars = 0) or [rows, N] (row stride ars); y: [rows, N], row stride ys.
template <typename E>
__attribute__((always_inline)) inline void linear_rows_loops(const float* xf, int64_t K, int rows, const E* w,
                                                             const E* add, int64_t ars, E* y, int64_t ys, int64_t n0,
                                                             int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const E* wr = w + n * K;
    for (int m = 0; m < rows; ++m) {
      const float* xr = xf + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += xr[k] * layer_math::load(wr[k]);
      if (add != nullptr) s += layer_math::load(add[m * ars + n]);
      y[m * ys + n] = layer_math::store<E>(s);
    }
  }
}

#define TANDEM_LINEAR_ROWS_VARIANT(suffix, attr)                                                          \
  template <typename E>                                                                                   \
  attr void linear_rows_##suffix(const float* xf, int64_t K, int rows, const E* w, const E* add, int64_t ars, \
                                 E* y, int64_t ys, int64_t n0, int64_t n1) {                              \
    linear_rows_loops<E>(xf, K, rows, w, add, ars, y, ys, n0, n1);                                         \
  }
#if defined(__x86_64__) && defined(__GNUC__)
TANDEM_LINEAR_ROWS_VARIANT(avx2, __attribute__((target("avx2,fma"))))
#endif
TANDEM_LINEAR_ROWS_VARIANT(base, )
#undef TANDEM_LINEAR_ROWS_VARIANT

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#include "common/avx512_vec.h"

// NB outputs n .. n+NB-1 for R rows (R * NB <= 16 accumulators): acc[r * NB + b] holds 16 partial
// sums of x[r] . w[n + b]; one shuffle tree reduces all of them. E: uint16_t (bf16 bits) or float.
template <typename E, int R, int NB>
__attribute__((always_inline)) inline void linear_block(const float* xf, int64_t K, const E* w, const E* add,
                                                        int64_t ars, E* y, int64_t ys, int64_t n) {
  static_assert(R * NB <= 16, "16 accumulators at most");
  constexpr int kPerLine = 64 / static_cast<int>(sizeof(E));  // elements per cache line
  avx512::v16f acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    avx512::v16f wv[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      wv[b] = avx512::ld16(w + (n + b) * K + k);
      if (k % kPerLine == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (n + b) * K + k) + kPrefetchBytes, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const avx512::v16f xv = avx512::ld16(xf + r * K + k);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[r * NB + b] += xv * wv[b];
    }
  }
  alignas(64) float sums[16];
  avx512::st16(sums, avx512::hsum16(acc));
  for (; k < K; ++k)  // K % 16 tail
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) sums[r * NB + b] += xf[r * K + k] * layer_math::load(w[(n + b) * K + k]);
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      const float a = add != nullptr ? layer_math::load(add[r * ars + n + b]) : 0.f;
      y[r * ys + n + b] = layer_math::store<E>(sums[r * NB + b] + a);
    }
}

template <typename E, int R, int NB>
__attribute__((always_inline)) inline void linear_range(const float* xf, int64_t K, const E* w, const E* add,
                                                        int64_t ars, E* y, int64_t ys, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) linear_block<E, R, NB>(xf, K, w, add, ars, y, ys, n);
  for (; n < n1; ++n) linear_block<E, R, 1>(xf, K, w, add, ars, y, ys, n);
}

template <typename E>
void linear_rows_avx512(const float* xf, int64_t K, int rows, const E* w, const E* add, int64_t ars, E* y,
                        int64_t ys, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: return linear_range<E, 1, 8>(xf, K, w, add, ars, y, ys, n0, n1);
    case 2: return linear_range<E, 2, 8>(xf, K, w, add, ars, y, ys, n0, n1);
    case 3: return linear_range<E, 3, 4>(xf, K, w, add, ars, y, ys, n0, n1);
    case 4: return linear_range<E, 4, 4>(xf, K, w, add, ars, y, ys, n0, n1);
    case 5: return linear_range<E, 5, 2>(xf, K, w, add, ars, y, ys, n0, n1);
    case 6: return linear_range<E, 6, 2>(xf, K, w, add, ars, y, ys, n0, n1);
    case 7: return linear_range<E, 7, 2>(xf, K, w, add, ars, y, ys, n0, n1);
    default: return linear_range<E, 8, 2>(xf, K, w, add, ars, y, ys, n0, n1);
  }
}
#pragma GCC pop_options

// ---- AVX-512 BF16: vdpbf16ps on the raw bf16 rows (no conversion of x or w) ------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")

// As linear_block, but each vdpbf16ps adds 32 exact bf16 products pairwise into 16 fp32 lanes, so a
// weight vector is loaded once for R rows and never converted. xh: [R, K] bf16 bits, row stride xs.
// The K % 32 tail is read with a masked load (zeros beyond K add nothing).
template <int R, int NB>
__attribute__((always_inline)) inline void linear_block_dp(const uint16_t* xh, int64_t xs, int64_t K,
                                                           const uint16_t* w, const uint16_t* add, int64_t ars,
                                                           uint16_t* y, int64_t ys, int64_t n) {
  static_assert(R * NB <= 16, "16 accumulators at most");
  avx512::v16f acc[16] = {};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      wv[b] = (__m512bh)_mm512_loadu_si512(w + (n + b) * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + b) * K + k) + kPrefetchBytes, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xh + r * xs + k);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
        acc[r * NB + b] = (avx512::v16f)_mm512_dpbf16_ps((__m512)acc[r * NB + b], xv, wv[b]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n + b) * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xh + r * xs + k);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
        acc[r * NB + b] = (avx512::v16f)_mm512_dpbf16_ps((__m512)acc[r * NB + b], xv, wv[b]);
    }
  }
  alignas(64) float sums[16];
  avx512::st16(sums, avx512::hsum16(acc));
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      const float a = add != nullptr ? bf16_to_float(add[r * ars + n + b]) : 0.f;
      y[r * ys + n + b] = float_to_bf16(sums[r * NB + b] + a);
    }
}

// Rows [0, M) against one block of NB weight rows at n: groups of up to 8 rows, the block staying in
// L1 between groups (the weight stream is read from memory once whatever M is).
template <int NB>
__attribute__((always_inline)) inline void linear_rows_block_dp(const uint16_t* xh, int64_t xs, int64_t K, int64_t M,
                                                                const uint16_t* w, const uint16_t* add, int64_t ars,
                                                                uint16_t* y, int64_t ys, int64_t n) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const uint16_t* xm = xh + m0 * xs;
    const uint16_t* am = add != nullptr ? add + m0 * ars : nullptr;
    uint16_t* ym = y + m0 * ys;
    switch (std::min<int64_t>(kMaxRows, M - m0)) {
#define TANDEM_DP_CASE(R)                                                                      \
  case R:                                                                                      \
    if constexpr (R * NB <= 16) linear_block_dp<R, NB>(xm, xs, K, w, am, ars, ym, ys, n);       \
    break;
      TANDEM_DP_CASE(1) TANDEM_DP_CASE(2) TANDEM_DP_CASE(3) TANDEM_DP_CASE(4)
      TANDEM_DP_CASE(5) TANDEM_DP_CASE(6) TANDEM_DP_CASE(7) TANDEM_DP_CASE(8)
#undef TANDEM_DP_CASE
    }
  }
}

template <int NB>
__attribute__((always_inline)) inline void linear_range_dp(const uint16_t* xh, int64_t xs, int64_t K, int64_t M,
                                                           const uint16_t* w, const uint16_t* add, int64_t ars,
                                                           uint16_t* y, int64_t ys, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) linear_rows_block_dp<NB>(xh, xs, K, M, w, add, ars, y, ys, n);
  for (; n < n1; ++n) linear_rows_block_dp<1>(xh, xs, K, M, w, add, ars, y, ys, n);
}

// Outputs [n0, n1) for all M rows (any M): 8 weight rows a block for 1-2 rows, 4 for 3-4, else 2
// (R * NB <= 16 accumulators).
void linear_rows_bf16dp(const uint16_t* xh, int64_t xs, int64_t K, int64_t M, const uint16_t* w,
                        const uint16_t* add, int64_t ars, uint16_t* y, int64_t ys, int64_t n0, int64_t n1) {
  if (M <= 2) return linear_range_dp<8>(xh, xs, K, M, w, add, ars, y, ys, n0, n1);
  if (M <= 4) return linear_range_dp<4>(xh, xs, K, M, w, add, ars, y, ys, n0, n1);
  linear_range_dp<2>(xh, xs, K, M, w, add, ars, y, ys, n0, n1);
}
#pragma GCC pop_options
#endif

// Outputs [n0, n1) for `rows` (<= 8) rows, in the variant this CPU runs (TANDEM_RT_CPU_KERNELS).
template <typename E>
void linear_rows_range(const float* xf, int64_t K, int rows, const E* w, const E* add, int64_t ars, E* y,
                       int64_t ys, int64_t n0, int64_t n1) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa::best()) {
    case cpu_isa::Isa::kAvx512: return linear_rows_avx512<E>(xf, K, rows, w, add, ars, y, ys, n0, n1);
    case cpu_isa::Isa::kAvx2: return linear_rows_avx2<E>(xf, K, rows, w, add, ars, y, ys, n0, n1);
    default: break;
  }
#endif
  linear_rows_base<E>(xf, K, rows, w, add, ars, y, ys, n0, n1);
}

// The portable / AVX-512F path: x rows in fp32 once ([M, K]), then passes of up to 8 rows.
template <typename E>
void linear_rows_fp32_rows(const E* xp, int64_t xs, int64_t M, int64_t K, const E* wp, const E* ap, int64_t ars,
                           E* yp, int64_t N, int64_t grain) {
  const std::vector<float> xf = rows_to_fp32(xp, xs, M, K);  // x rows in fp32 once
  for_row_passes(M, N, grain, kMaxRows, [&](int64_t m0, int rows, int64_t n0, int64_t n1) {
    linear_rows_range<E>(xf.data() + m0 * K, K, rows, wp, ap != nullptr ? ap + m0 * ars : nullptr, ars, yp + m0 * N,
                         N, n0, n1);
  });
}

void check_linear_rows(const at::Tensor& x, const at::Tensor& w) {
  check_rows_x(x);
  check_device(w, "w", x.device());
  check_dtype(w, "w", x.scalar_type());
  check_rank(w, "w", 2);
  check_contiguous(w, "w");
  check_size(w, "w", 1, x.size(1));
}

// y = add + x @ w^T into y [M, N] (checked by the callers).
void linear_rows_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& add) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t ars = check_rows_add(add, x, M, N);
  cpu_isa::check_variant();
  if (M == 0 || N == 0) return;
  const int64_t grain = std::max<int64_t>(8, 32768 / std::max<int64_t>(K, 1));  // >= 64 KB of weights a task
  const int64_t xs = M > 1 ? x.stride(0) : K;
  if (x.scalar_type() == at::kFloat) {
    linear_rows_fp32_rows<float>(x.data_ptr<float>(), xs, M, K, w.data_ptr<float>(),
                                 add.has_value() ? add->data_ptr<float>() : nullptr, ars, y.data_ptr<float>(), N,
                                 grain);
    return;
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const auto* ap = add.has_value() ? reinterpret_cast<const uint16_t*>(add->data_ptr<at::BFloat16>()) : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa::bf16_dot_products()) {  // the bf16 rows as they are
    team::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      linear_rows_bf16dp(xp, xs, K, M, wp, ap, ars, yp, N, n0, n1);
    });
    return;
  }
#endif
  linear_rows_fp32_rows<uint16_t>(xp, xs, M, K, wp, ap, ars, yp, N, grain);
}

at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& add) {
  check_linear_rows(x, w);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_rows_into(y, x, w, add);
  return y;
}

}  // namespace

namespace direct {
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& add) {
  return linear_rows_cpu(x, w, add);
}
void linear_rows_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& add) {
  check_linear_rows(x, w);
  check_out(y, x, x.size(0), w.size(0));
  linear_rows_into(y, x, w, add);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("linear_rows(Tensor x, Tensor w, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("linear_rows", &linear_rows_cpu);
}

}  // namespace tandem_rt
