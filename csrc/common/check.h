// Argument validation shared by the op bindings. Every failure raises a Python
// ValueError (c10::ValueError) whose message names the offending argument.
#pragma once

#include "common/torch_headers.h"

#include <string>

namespace tandem_rt {

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, name, ".shape[", dim, "] must be ", expected, ", got ",
                    t.size(dim), " (shape ", t.sizes(), ")");
}

// y: the output of an op's _out form, a contiguous [rows, cols] tensor of x's dtype and device.
inline void check_out(const at::Tensor& y, const at::Tensor& x, int64_t rows, int64_t cols) {
  check_device(y, "y", x.device());
  check_dtype(y, "y", x.scalar_type());
  check_rank(y, "y", 2);
  check_size(y, "y", 0, rows);
  check_size(y, "y", 1, cols);
  check_contiguous(y, "y");
}

inline bool is_float_kv_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace tandem_rt
