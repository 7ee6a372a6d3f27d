// Host side of the tensor-core paged-attention kernel (the kernel itself, its design and its
// fragment layouts are in paged_attention_mma.cuh): per-device shared-memory setup, grid and the
// dtype / head_dim / row-tile dispatch. Selected with PagedAttentionParams::kernel ==
// kPagedAttentionMma (the op's kernel=1, tandem_rt.ops.paged_attention(kernel="mma")).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <atomic>
#include <cstdint>

#include "kernels/paged_attention.h"
#include "kernels/paged_attention_mma.cuh"

namespace tandem_rt::kernels {
namespace {

// Sets the dynamic shared-memory limit of one instantiation on the current device (once per device)
// and refuses devices older than sm_80.
template <typename T, int D, int MT>
cudaError_t prepare_mma_kernel() {
  static std::array<std::atomic<int>, 64> done{};  // per device: 1 = configured
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < static_cast<int>(done.size());
  if (cached && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  int major = 0;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;
  err = cudaFuncSetAttribute(paged_attention_mma_kernel<T, D, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             MmaConfig<T, D, MT>::kSmemBytes);
  if (err != cudaSuccess) return err;
  if (cached) done[device].store(1, std::memory_order_release);
  return cudaSuccess;
}

template <typename T, int D, int MT>
cudaError_t launch_mma(const PagedAttentionParams& p, cudaStream_t stream) {
  using Cfg = MmaConfig<T, D, MT>;
  const cudaError_t err = prepare_mma_kernel<T, D, MT>();
  if (err != cudaSuccess) return err;
  const int group = p.hq / p.hkv;
  const int64_t rows = static_cast<int64_t>(p.max_q_len) * group;
  const int row_tiles = static_cast<int>((rows + Cfg::kRows - 1) / Cfg::kRows);
  const dim3 grid(p.hkv * row_tiles, p.num_seqs, p.num_splits);
  paged_attention_mma_kernel<T, D, MT><<<grid, kMmaThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_mma_dim(const PagedAttentionParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.max_q_len) * (p.hq / p.hkv);
  return rows <= 16 ? launch_mma<T, D, 1>(p, stream) : launch_mma<T, D, 2>(p, stream);
}

template <typename T>
cudaError_t launch_mma_typed(const PagedAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch_mma_dim<T, 32>(p, stream);
    case 64: return launch_mma_dim<T, 64>(p, stream);
    case 128: return launch_mma_dim<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_paged_attention_mma(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.ntok == 0 || p.num_seqs == 0 || p.max_q_len == 0) return cudaSuccess;
  switch (p.dtype) {
    case KvDType::kFloat16: return launch_mma_typed<__half>(p, stream);
    case KvDType::kBFloat16: return launch_mma_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;  // fp32 goes through the SIMT kernel
  }
}

}  // namespace tandem_rt::kernels
