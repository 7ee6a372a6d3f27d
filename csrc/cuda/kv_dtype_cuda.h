// ATen dtype -> kernel dtype tag (CUDA glue only).
#pragma once

#include "common/torch_headers.h"

#include "kernels/kv_dtype.h"

namespace tandem_rt {

inline kernels::KvDType to_kv_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::KvDType::kFloat32;
    case at::kHalf: return kernels::KvDType::kFloat16;
    case at::kBFloat16: return kernels::KvDType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t, " (float32, float16 or bfloat16)");
  }
  return kernels::KvDType::kFloat32;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace tandem_rt
