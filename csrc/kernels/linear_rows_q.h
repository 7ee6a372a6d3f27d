// Raw-pointer launcher for few-row products with GGUF block-quantized weights (the decode and
// verify rows of a quantized primary; no ATen: included by .cu and .cpp).
//   y[m, n] = add[m, n] (or add[n], or 0) + sum_k x[m, k] * dequant(w)[n, k]
// Block formats (32 weights a block, d and m fp16, as csrc/ops/quant_blocks.h):
//   Q8_0 (qtype 0, 34 bytes): d, int8 q[32];        w_k = d * q_k
//   Q4_0 (qtype 1, 18 bytes): d, uint8 qs[16];      w_k = d * (nib_k - 8)
//   Q4_1 (qtype 2, 20 bytes): d, m, uint8 qs[16];   w_k = d * nib_k + m
// with nib_k = qs[k] & 15 for k < 16 and qs[k - 16] >> 4 for k >= 16.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kernels/kv_dtype.h"

namespace tandem_rt::kernels {

struct LinearRowsQParams {
  void* y;              // [M, N] contiguous, dtype
  const void* x;        // [M, K] dtype, row stride x_stride elements, contiguous rows
  const uint8_t* w;     // [N, K / 32 * block_bytes(qtype)] GGUF block rows, contiguous
  const void* add;      // nullptr, [N] (add_stride 0) or [M, N] rows of add_stride elements, dtype
  int64_t x_stride;     // elements between x rows
  int64_t add_stride;   // elements between add rows (0: one [N] row for every m)
  int M, N, K;          // K a multiple of 32
  int qtype;            // 0 Q8_0, 1 Q4_0, 2 Q4_1
  KvDType dtype;        // kFloat32 or kBFloat16 (x, add and y)
};

// Bytes of one 32-weight block of qtype (0 for an unknown qtype).
inline int linear_rows_q_block_bytes(int qtype) { return qtype == 0 ? 34 : qtype == 1 ? 18 : qtype == 2 ? 20 : 0; }

// Launches the SIMT kernel (kernels/linear_rows_q.cuh) on `stream`. cudaErrorInvalidValue for an
// unknown qtype or dtype, K not a multiple of 32 or a negative size; no host sync.
cudaError_t launch_linear_rows_q(const LinearRowsQParams& p, cudaStream_t stream);

}  // namespace tandem_rt::kernels
