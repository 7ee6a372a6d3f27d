// Launcher of the few-row quantized products (kernels/linear_rows_q.cuh): dtype x qtype dispatch.
#include "kernels/linear_rows_q.cuh"

namespace tandem_rt::kernels {
namespace {

template <typename T>
cudaError_t launch_typed(const LinearRowsQParams& p, dim3 grid, cudaStream_t stream) {
  switch (p.qtype) {
    case 0: linear_rows_q_kernel<T, 0><<<grid, kLrqThreads, 0, stream>>>(p); break;
    case 1: linear_rows_q_kernel<T, 1><<<grid, kLrqThreads, 0, stream>>>(p); break;
    case 2: linear_rows_q_kernel<T, 2><<<grid, kLrqThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_linear_rows_q(const LinearRowsQParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.K % 32 != 0 || linear_rows_q_block_bytes(p.qtype) == 0)
    return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  const dim3 grid((p.N + kLrqWarps - 1) / kLrqWarps, (p.M + kLrqRows - 1) / kLrqRows);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case KvDType::kFloat32: return launch_typed<float>(p, grid, stream);
    case KvDType::kBFloat16: return launch_typed<__nv_bfloat16>(p, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace tandem_rt::kernels
