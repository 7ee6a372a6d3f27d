// Argument checks shared by the few-row product ops (linear_rows, linear_rows_q): ValueError naming
// the argument.
#pragma once

#include "common/check.h"

#include <cstdint>
#include <optional>

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

}  // namespace tandem_rt
