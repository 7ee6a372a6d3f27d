// RoPE (Hugging Face Llama rotate-half) + KV cache write by slot mapping.
//
// inv_freq, the angle and the rotation follow the fp32 roundings of the PyTorch reference
// (explicit _rn intrinsics, so --use_fast_math does not change them); cos/sin are evaluated in
// double and rounded, because angles reach thousands of radians.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/rope_cache.h"
#include "kernels/kv_dtype_dispatch.cuh"

namespace tandem_rt::kernels {
namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// grid: (n rows); block: 128 threads over (head, rotation pair) items, then over the V row.
template <typename T>
__global__ void rope_cache_write_kernel(T* __restrict__ k,                  // [n, hkv, D] (row stride k_stride)
                                        const T* __restrict__ v,            // [n, hkv, D] (row stride v_stride)
                                        T* __restrict__ q,                  // [n, hq, D] (row stride q_stride) or null
                                        const int64_t* __restrict__ positions,     // [n]
                                        const int64_t* __restrict__ slot_mapping,  // [n]
                                        T* __restrict__ k_cache,            // [num_slots, hkv, D]
                                        T* __restrict__ v_cache,            // [num_slots, hkv, D]
                                        int64_t k_stride, int64_t v_stride, int64_t q_stride, int64_t num_slots,
                                        int hkv, int hq, int head_dim, float theta) {
  const int64_t r = blockIdx.x;
  const int half = head_dim / 2;
  const float pos = static_cast<float>(positions[r]);
  const int64_t slot = slot_mapping[r];
  const bool write = slot >= 0 && slot < num_slots;
  const int64_t row_elems = static_cast<int64_t>(hkv) * head_dim;
  T* krow = k + r * k_stride;
  const int items = (hkv + (q != nullptr ? hq : 0)) * half;
  for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
    const int head = idx / half, i = idx % half;
    const float e = __fdiv_rn(static_cast<float>(2 * i), static_cast<float>(head_dim));
    const float pw = static_cast<float>(pow(static_cast<double>(theta), static_cast<double>(e)));
    const float inv = __fdiv_rn(1.0f, pw);
    const float angle = __fmul_rn(pos, inv);
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float sn = static_cast<float>(sd), cs = static_cast<float>(cd);
    T* x = head < hkv ? krow + static_cast<int64_t>(head) * head_dim
                      : q + r * q_stride + static_cast<int64_t>(head - hkv) * head_dim;
    const float x1 = to_f(x[i]), x2 = to_f(x[i + half]);
    const T o1 = from_f<T>(__fadd_rn(__fmul_rn(x1, cs), -__fmul_rn(x2, sn)));
    const T o2 = from_f<T>(__fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn)));
    x[i] = o1;
    x[i + half] = o2;
    if (head < hkv && write) {
      T* dst = k_cache + slot * row_elems + static_cast<int64_t>(head) * head_dim;
      dst[i] = o1;
      dst[i + half] = o2;
    }
  }
  if (write) {
    const T* vrow = v + r * v_stride;
    T* dst = v_cache + slot * row_elems;
    for (int64_t idx = threadIdx.x; idx < row_elems; idx += blockDim.x) dst[idx] = vrow[idx];
  }
}

template <typename T>
cudaError_t launch_typed(const RopeCacheWriteParams& p, cudaStream_t stream) {
  rope_cache_write_kernel<T><<<p.n, 128, 0, stream>>>(
      static_cast<T*>(p.k), static_cast<const T*>(p.v), static_cast<T*>(p.q), p.positions, p.slot_mapping,
      static_cast<T*>(p.k_cache), static_cast<T*>(p.v_cache), p.k_stride, p.v_stride, p.q_stride, p.num_slots,
      p.hkv, p.hq, p.head_dim, p.rope_theta);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rope_cache_write(const RopeCacheWriteParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return dispatch_kv_dtype(p.dtype, [&](auto tag) { return launch_typed<decltype(tag)>(p, stream); });
}

}  // namespace tandem_rt::kernels
