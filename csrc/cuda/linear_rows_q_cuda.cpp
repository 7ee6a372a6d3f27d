// CUDA dispatch for tandem_rt::linear_rows_q (glue only: the kernel lives in kernels/linear_rows_q.cu).
// Same arguments and checks as the CPU op (ops/linear_rows_q.cpp): x bf16 / fp32 [M, K] with
// contiguous rows, w the GGUF block rows [N, K / 32 * block_bytes] uint8 on x's device, add none /
// [N] / [M, N]; returns y [M, N] in x's dtype. No host sync.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/kv_dtype_cuda.h"
#include "kernels/linear_rows_q.h"
#include "ops/quant_blocks.h"
#include "ops/rows_args.h"

namespace tandem_rt {
namespace {

at::Tensor linear_rows_q_cuda(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                              const std::optional<at::Tensor>& add) {
  TORCH_CHECK_VALUE(qtype == quant::kQ8_0 || qtype == quant::kQ4_0 || qtype == quant::kQ4_1,
                    "qtype must be 0 (Q8_0), 1 (Q4_0) or 2 (Q4_1), got ", qtype);
  check_rows_quant(x, w, quant::block_bytes(qtype));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t ars = check_rows_add(add, x, M, N);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(M <= 65535LL * 8 && N <= kIntMax && K <= kIntMax, "x [", M, ", ", K, "] and w with ", N,
                    " rows exceed the kernel's grid (M <= 524280, N and K < 2^31)");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  kernels::LinearRowsQParams p{};
  p.y = y.data_ptr();
  p.x = x.data_ptr();
  p.w = w.data_ptr<uint8_t>();
  p.add = add.has_value() ? add->data_ptr() : nullptr;
  p.x_stride = M > 1 ? x.stride(0) : K;
  p.add_stride = ars;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.qtype = static_cast<int>(qtype);
  p.dtype = to_kv_dtype(x.scalar_type());
  const cudaError_t err = kernels::launch_linear_rows_q(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "linear_rows_q kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem_rt, CUDA, m) {
  m.impl("linear_rows_q", &linear_rows_q_cuda);
}

}  // namespace tandem_rt
