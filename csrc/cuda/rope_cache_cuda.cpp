// CUDA dispatch for tandem_rt::rope_cache_write (glue only: the kernel lives in kernels/rope_cache.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "common/check.h"
#include "cuda/kv_dtype_cuda.h"
#include "kernels/rope_cache.h"
#include "ops/rope_cache.h"

namespace tandem_rt {
namespace {

void rope_cache_write_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                           const at::Tensor& slot_mapping, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           double rope_theta, const std::optional<at::Tensor>& q) {
  validate_rope_cache_write(k, v, positions, slot_mapping, k_cache, v_cache, rope_theta, q);
  TORCH_CHECK_VALUE(k.size(0) <= std::numeric_limits<int>::max(), "k has too many rows: ", k.size(0));
  if (k.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  kernels::RopeCacheWriteParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q = q.has_value() ? q->data_ptr() : nullptr;
  p.positions = positions.data_ptr<int64_t>();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.q_stride = q.has_value() ? q->stride(0) : 0;
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  p.n = static_cast<int>(k.size(0));
  p.hkv = static_cast<int>(k.size(1));
  p.hq = q.has_value() ? static_cast<int>(q->size(1)) : 0;
  p.head_dim = static_cast<int>(k.size(2));
  p.rope_theta = static_cast<float>(rope_theta);
  p.dtype = to_kv_dtype(k.scalar_type());
  const auto err = kernels::launch_rope_cache_write(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rope_cache_write kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem_rt, CUDA, m) {
  m.impl("rope_cache_write", &rope_cache_write_cuda);
}

}  // namespace tandem_rt
