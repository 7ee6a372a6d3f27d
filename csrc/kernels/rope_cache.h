// Raw-pointer launcher for RoPE + paged KV cache write (no ATen: included by .cu and .cpp).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kernels/kv_dtype.h"

namespace tandem_rt::kernels {

struct RopeCacheWriteParams {
  void* k;                     // [n, hkv, head_dim], row stride k_stride elements; rotated in place
  const void* v;               // [n, hkv, head_dim], row stride v_stride elements
  void* q;                     // [n, hq, head_dim], row stride q_stride elements; nullptr = none
  const int64_t* positions;    // [n] absolute positions
  const int64_t* slot_mapping; // [n] page * page_size + offset; < 0 or >= num_slots = skip write
  void* k_cache;               // [num_slots, hkv, head_dim] contiguous (= [pages, page_size, hkv, D])
  void* v_cache;               // [num_slots, hkv, head_dim] contiguous
  int64_t k_stride, v_stride, q_stride;
  int64_t num_slots;
  int n, hkv, hq, head_dim;    // hq = 0 without q
  float rope_theta;
  KvDType dtype;
};

cudaError_t launch_rope_cache_write(const RopeCacheWriteParams& p, cudaStream_t stream);

}  // namespace tandem_rt::kernels
