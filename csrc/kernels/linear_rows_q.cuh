// Few-row products with GGUF block-quantized weights on CUDA cores (kernels/linear_rows_q.h).
//
// Grid (ceil(N / kLrqWarps), ceil(M / kLrqRows)), kLrqThreads threads: warp `w` of CTA (bx, by)
// owns output column n = bx * kLrqWarps + w for the x rows m0 = by * kLrqRows .. m0 + kLrqRows - 1.
// The CTA stages those rows of x in fp32 shared memory, kLrqChunk columns at a time; for each
// 32-weight block of its weight row a warp dequantizes one weight per lane (lane l: weight l of the
// block) and accumulates it times x[m, k] into kLrqRows fp32 registers; a butterfly reduction over
// the warp gives the sums, lane 0 adds `add` and writes y. Weight bytes are read once per pass of
// kLrqRows rows (M > kLrqRows reads them ceil(M / kLrqRows) times).
//
// The host emulator (csrc/emulation/linear_rows_q_emulator.cpp) defines TANDEM_RT_HOST_EMULATION and
// includes csrc/emulation/cuda_host_prelude.h before this header: it runs this very source on the CPU,
// one host thread per CUDA thread, against a float64 reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "kernels/linear_rows_q.h"

#ifdef TANDEM_RT_HOST_EMULATION
#define TANDEM_RT_LRQ_SHARED_FLOATS(name, count) float* name = reinterpret_cast<float*>(emu::tls.cta->smem.data())
#define TANDEM_RT_LRQ_DEVICE inline
#else
#define TANDEM_RT_LRQ_SHARED_FLOATS(name, count) __shared__ float name[count]
#define TANDEM_RT_LRQ_DEVICE __device__ __forceinline__
#endif

namespace tandem_rt::kernels {

constexpr int kLrqThreads = 128;
constexpr int kLrqWarps = kLrqThreads / 32;  // output columns per CTA
constexpr int kLrqRows = 8;                  // x rows per CTA (a pass over the weight)
constexpr int kLrqChunk = 512;               // x columns staged per step (16 blocks)
constexpr int kLrqSmemFloats = kLrqRows * kLrqChunk;

TANDEM_RT_LRQ_DEVICE float lrq_load(const float* p) { return *p; }
TANDEM_RT_LRQ_DEVICE float lrq_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
TANDEM_RT_LRQ_DEVICE void lrq_store(float* p, float v) { *p = v; }
TANDEM_RT_LRQ_DEVICE void lrq_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// IEEE fp16 at a 2-byte aligned address -> fp32.
TANDEM_RT_LRQ_DEVICE float lrq_half(const uint8_t* p) {
  __half h;
  std::memcpy(&h, p, sizeof(h));
  return __half2float(h);
}

// Weight `lane` (0..31) of the block at `blk` (Q: 0 Q8_0, 1 Q4_0, 2 Q4_1), as csrc/ops/quant_blocks.h.
template <int Q>
TANDEM_RT_LRQ_DEVICE float lrq_weight(const uint8_t* blk, int lane) {
  const float d = lrq_half(blk);
  if constexpr (Q == 0) {
    return d * static_cast<float>(static_cast<int8_t>(blk[2 + lane]));
  } else {
    const int off = Q == 1 ? 2 : 4;
    const uint8_t byte = blk[off + (lane & 15)];
    const int nib = lane < 16 ? (byte & 15) : (byte >> 4);
    if constexpr (Q == 1) return d * static_cast<float>(nib - 8);
    return fmaf(d, static_cast<float>(nib), lrq_half(blk + 2));
  }
}

template <typename T, int Q>
__global__ void __launch_bounds__(kLrqThreads)
    linear_rows_q_kernel(const LinearRowsQParams p) {
  constexpr int kBlockBytes = Q == 0 ? 34 : Q == 1 ? 18 : 20;
  TANDEM_RT_LRQ_SHARED_FLOATS(xs, kLrqSmemFloats);  // [kLrqRows, kLrqChunk] x rows in fp32
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int n = static_cast<int>(blockIdx.x) * kLrqWarps + warp;
  const int m0 = static_cast<int>(blockIdx.y) * kLrqRows;
  const int rows = min(kLrqRows, p.M - m0);
  const T* x = static_cast<const T*>(p.x);                                    // [M, K], stride x_stride
  const uint8_t* wrow = p.w + static_cast<int64_t>(n < p.N ? n : 0) * (p.K / 32) * kBlockBytes;  // [K/32 blocks]

  float acc[kLrqRows];
#pragma unroll
  for (int r = 0; r < kLrqRows; ++r) acc[r] = 0.f;

  for (int k0 = 0; k0 < p.K; k0 += kLrqChunk) {
    const int len = min(kLrqChunk, p.K - k0);  // a multiple of 32
    __syncthreads();                          // the previous chunk is consumed
    for (int i = static_cast<int>(threadIdx.x); i < kLrqSmemFloats; i += kLrqThreads) {
      const int r = i / kLrqChunk, c = i % kLrqChunk;
      xs[i] = (r < rows && c < len) ? lrq_load(x + static_cast<int64_t>(m0 + r) * p.x_stride + k0 + c) : 0.f;
    }
    __syncthreads();
    if (n < p.N) {
      const uint8_t* blk = wrow + static_cast<int64_t>(k0 / 32) * kBlockBytes;
      for (int b = 0; b < len / 32; ++b, blk += kBlockBytes) {
        const float wv = lrq_weight<Q>(blk, lane);
#pragma unroll
        for (int r = 0; r < kLrqRows; ++r) acc[r] = fmaf(wv, xs[r * kLrqChunk + b * 32 + lane], acc[r]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kLrqRows; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  }
  if (lane == 0 && n < p.N) {
    T* y = static_cast<T*>(p.y);                // [M, N]
    const T* add = static_cast<const T*>(p.add);  // nullptr, [N] or [M, N] (stride add_stride)
#pragma unroll
    for (int r = 0; r < kLrqRows; ++r) {
      if (r < rows) {
        const int m = m0 + r;
        const float a = add != nullptr ? lrq_load(add + static_cast<int64_t>(m) * p.add_stride + n) : 0.f;
        lrq_store(y + static_cast<int64_t>(m) * p.N + n, acc[r] + a);
      }
    }
  }
}

}  // namespace tandem_rt::kernels
