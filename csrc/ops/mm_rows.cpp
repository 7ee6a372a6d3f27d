// Op tandem_rt::mm_rows (CPU, bf16): y = add + x @ w for a few rows x: [M, K] and a weight held
// [K, N] (the engine's input-major layout), fp32 accumulation, one rounding to bf16 at the end (as
// torch's bf16 addmm). Decode and verify steps multiply 1-8 rows by every weight of the model, so
// the weight stream dominates; torch's bf16 GEMM on the CPU costs more than its fp32 one at these
// sizes (docs/ENGINE.md), this loop reads each bf16 weight once per 8 rows and converts it with a
// shift. Larger M (prompts) should use torch's GEMM.
#include "common/check.h"
#include "ops/layer_math_cpu.h"

namespace tandem_rt {
namespace {

constexpr int kRowBlock = 8;    // rows per pass over the weight
constexpr int64_t kPanel = 256;  // output columns per panel: its accumulators stay in L1

// y[m, n0:n0+pw] (m < R <= 8, pw <= kPanel) = add + x[m, :] @ w[:, n0:n0+pw]. All bf16 bits.
//   x: [R, K] row stride xs; w: [K, N] contiguous; add: null, [N] (ars = 0) or [R, N] row stride
//   ars; y: [R, N] row stride ys. Each step of k reads pw contiguous weights (a 512-byte run), so
//   the weight streams in address order panel by panel.
template <int R>
__attribute__((always_inline)) inline void mm_panel(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t N,
                                                    int64_t K, const uint16_t* add, int64_t ars, uint16_t* y,
                                                    int64_t ys, int64_t n0, int64_t pw) {
  alignas(64) float acc[R][kPanel];
  alignas(64) float wk[kPanel];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
#pragma omp simd
    for (int64_t j = 0; j < pw; ++j) acc[m][j] = add != nullptr ? bf16_to_float(add[m * ars + n0 + j]) : 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* wr = w + k * N + n0;
#pragma omp simd
    for (int64_t j = 0; j < pw; ++j) wk[j] = bf16_to_float(wr[j]);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const float xm = bf16_to_float(x[m * xs + k]);
#pragma omp simd
      for (int64_t j = 0; j < pw; ++j) acc[m][j] += xm * wk[j];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
#pragma omp simd
    for (int64_t j = 0; j < pw; ++j) y[m * ys + n0 + j] = float_to_bf16(acc[m][j]);
}

template <int R>
__attribute__((always_inline)) inline void mm_panels(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t N,
                                                     int64_t K, const uint16_t* add, int64_t ars, uint16_t* y,
                                                     int64_t ys, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPanel;
    mm_panel<R>(x, xs, w, N, K, add, ars, y, ys, n0, std::min(kPanel, N - n0));
  }
}

#define TANDEM_MM_ROWS_VARIANT(suffix, attr)                                                              \
  attr void mm_rows_##suffix(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t N, int64_t K,      \
                             const uint16_t* add, int64_t ars, uint16_t* y, int64_t ys, int rows,        \
                             int64_t p0, int64_t p1) {                                                   \
    switch (rows) {                                                                                      \
      case 1: return mm_panels<1>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                               \
      case 2: return mm_panels<2>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                               \
      case 3: return mm_panels<3>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                               \
      case 4: return mm_panels<4>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                               \
      case 5: return mm_panels<5>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                               \
      case 6: return mm_panels<6>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                               \
      case 7: return mm_panels<7>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                               \
      default: return mm_panels<8>(x, xs, w, N, K, add, ars, y, ys, p0, p1);                              \
    }                                                                                                    \
  }
#if defined(__x86_64__) && defined(__GNUC__)
TANDEM_MM_ROWS_VARIANT(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
TANDEM_MM_ROWS_VARIANT(avx2, __attribute__((target("avx2,fma"))))
#endif
TANDEM_MM_ROWS_VARIANT(base, )
#undef TANDEM_MM_ROWS_VARIANT

// Panels [p0, p1) of kPanel columns for `rows` (<= 8) rows, in the variant this CPU runs.
void mm_rows_panels(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t N, int64_t K, const uint16_t* add,
                    int64_t ars, uint16_t* y, int64_t ys, int rows, int64_t p0, int64_t p1) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (layer_math::best_isa()) {
    case layer_math::Isa::kAvx512: return mm_rows_avx512(x, xs, w, N, K, add, ars, y, ys, rows, p0, p1);
    case layer_math::Isa::kAvx2: return mm_rows_avx2(x, xs, w, N, K, add, ars, y, ys, rows, p0, p1);
    default: break;
  }
#endif
  mm_rows_base(x, xs, w, N, K, add, ars, y, ys, rows, p0, p1);
}

at::Tensor mm_rows_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& add) {
  check_rank(x, "x", 2);
  check_dtype(x, "x", at::kBFloat16);
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, "x must have a contiguous last dim");
  check_device(w, "w", x.device());
  check_dtype(w, "w", at::kBFloat16);
  check_rank(w, "w", 2);
  check_contiguous(w, "w");
  check_size(w, "w", 0, x.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  int64_t ars = 0;
  if (add.has_value()) {
    check_device(*add, "add", x.device());
    check_dtype(*add, "add", at::kBFloat16);
    TORCH_CHECK_VALUE(add->dim() == 1 || add->dim() == 2, "add must be [N] or [M, N], got shape ", add->sizes());
    TORCH_CHECK_VALUE(add->size(-1) == N && add->stride(-1) == 1,
                      "add must have N = ", N, " contiguous columns, got shape ", add->sizes());
    if (add->dim() == 2) {
      check_size(*add, "add", 0, M);
      ars = add->stride(0);
    }
  }
  layer_math::check_variant();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const auto* ap = add.has_value() ? reinterpret_cast<const uint16_t*>(add->data_ptr<at::BFloat16>()) : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t panels = (N + kPanel - 1) / kPanel;
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, M - m0));
    const uint16_t* xm = xp + m0 * x.stride(0);
    const uint16_t* am = ap != nullptr ? ap + m0 * ars : nullptr;
    uint16_t* ym = yp + m0 * N;
    // threads take whole panels (each streams its own columns of the weight)
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      mm_rows_panels(xm, x.stride(0), wp, N, K, am, ars, ym, N, rows, p0, p1);
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("mm_rows(Tensor x, Tensor w, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("mm_rows", &mm_rows_cpu);
}

}  // namespace tandem_rt
