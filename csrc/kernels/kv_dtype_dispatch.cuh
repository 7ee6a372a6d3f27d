// Element-type dispatch of the CUDA launchers: calls f(T{}) with T = float, __half or
// __nv_bfloat16 for the KvDType tag (cudaErrorInvalidValue for any other value).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kv_dtype.h"

namespace tandem_rt::kernels {

template <typename F>
cudaError_t dispatch_kv_dtype(KvDType dtype, F&& f) {
  switch (dtype) {
    case KvDType::kFloat32: return f(float{});
    case KvDType::kFloat16: return f(__half{});
    case KvDType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace tandem_rt::kernels
