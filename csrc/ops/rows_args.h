// Argument checks shared by the few-row product ops (linear_rows, linear_rows_q): ValueError naming
// the argument.
#pragma once

#include "common/check.h"
#include "ops/layer_math_cpu.h"
#include "ops/team.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace tandem_rt {

// x: [M, K] bf16 or fp32 with a contiguous last dim (rows may be strided).
inline void check_rows_x(const at::Tensor& x) {
  check_rank(x, "x", 2);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
                    "x must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, "x must have a contiguous last dim");
}

// add: none, [N] (a bias) or [M, N] (e.g. the residual) of x's dtype and device with contiguous
// columns. Returns its row stride (0 for none or [N]).
inline int64_t check_rows_add(const std::optional<at::Tensor>& add, const at::Tensor& x, int64_t M, int64_t N) {
  if (!add.has_value()) return 0;
  check_device(*add, "add", x.device());
  check_dtype(*add, "add", x.scalar_type());
  TORCH_CHECK_VALUE(add->dim() == 1 || add->dim() == 2, "add must be [N] or [M, N], got shape ", add->sizes());
  TORCH_CHECK_VALUE(add->size(-1) == N && add->stride(-1) == 1,
                    "add must have N = ", N, " contiguous columns, got shape ", add->sizes());
  if (add->dim() == 1) return 0;
  check_size(*add, "add", 0, M);
  return add->stride(0);
}

// The checks the quantized few-row ops share: x as check_rows_x with K a multiple of the block
// size 32; w uint8 [rows, K / 32 * bytes_per_block] on x's device, contiguous.
inline void check_rows_quant(const at::Tensor& x, const at::Tensor& w, int64_t bytes_per_block) {
  check_rows_x(x);
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(K % 32 == 0, "x.shape[1] (K = ", K, ") must be a multiple of the block size 32");
  check_device(w, "w", x.device());
  check_dtype(w, "w", at::kByte);
  check_rank(w, "w", 2);
  check_contiguous(w, "w");
  check_size(w, "w", 1, K / 32 * bytes_per_block);
}

// f(xp, ap, yp) with the element pointers of x, add (or null) and y as E = float (fp32) or
// uint16_t (bf16 bits), by x's dtype (checked by check_rows_x / check_rows_add).
template <typename F>
inline void with_rows_dtype(const at::Tensor& x, const std::optional<at::Tensor>& add, at::Tensor& y, F&& f) {
  if (x.scalar_type() == at::kFloat) {
    f(x.data_ptr<float>(), add.has_value() ? add->data_ptr<float>() : static_cast<float*>(nullptr),
      y.data_ptr<float>());
  } else {
    using B = uint16_t;
    f(reinterpret_cast<const B*>(x.data_ptr<at::BFloat16>()),
      add.has_value() ? reinterpret_cast<const B*>(add->data_ptr<at::BFloat16>()) : static_cast<const B*>(nullptr),
      reinterpret_cast<B*>(y.data_ptr<at::BFloat16>()));
  }
}

// x rows ([M, K] of E = float or uint16_t bf16 bits, row stride xs) as contiguous fp32 [M, K].
template <typename E>
inline std::vector<float> rows_to_fp32(const E* xp, int64_t xs, int64_t M, int64_t K) {
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = layer_math::load(xp[m * xs + k]);
  return xf;
}

// f(std::integral_constant<int, R>{}) with R = min(rows, MaxR) (rows >= 1): a register-blocked
// kernel's row count as a template argument. f is a lambda of the caller, so it is compiled for the
// caller's instruction set (#pragma GCC target regions) and may inline that region's kernels.
template <int MaxR, typename F>
inline void with_row_count(int rows, F&& f) {
  if constexpr (MaxR > 1) {
    if (rows < MaxR) return with_row_count<MaxR - 1>(rows, f);
  }
  f(std::integral_constant<int, MaxR>{});
}

// Passes of up to max_rows rows over the weight (each pass reads it once), the outputs [0, N) of a
// pass split between threads (team::parallel_for): f(m0, rows, n0, n1) computes rows [m0, m0 + rows) x
// outputs [n0, n1).
template <typename F>
inline void for_row_passes(int64_t M, int64_t N, int64_t grain, int max_rows, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += max_rows) {
    const int rows = static_cast<int>(std::min<int64_t>(max_rows, M - m0));
    team::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { f(m0, rows, n0, n1); });
  }
}

}  // namespace tandem_rt
