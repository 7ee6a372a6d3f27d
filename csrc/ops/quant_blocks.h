// GGUF block quantizations read by linear_rows_q and linear_rows_q16 (ggml formats, 32 weights a
// block; d, m fp16):
//   Q8_0 (qtype 0, 34 bytes): d, int8 q[32];           w_k = d * q_k
//   Q4_0 (qtype 1, 18 bytes): d, uint8 qs[16];         w_k = d * (nib_k - 8)
//   Q4_1 (qtype 2, 20 bytes): d, m, uint8 qs[16];      w_k = d * nib_k + m
// with nib_k = qs[k] & 15 for k < 16 and qs[k - 16] >> 4 for k >= 16.
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tandem_rt {
namespace quant {

constexpr int kBlock = 32;  // weights per quantization block

enum QType : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };

constexpr int64_t block_bytes(int64_t qtype) { return qtype == kQ8_0 ? 34 : qtype == kQ4_0 ? 18 : 20; }

inline float half_to_float(const uint8_t* p) {  // IEEE fp16 (little endian) -> fp32, exact
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// The 32 weights of one block as fp32 (any ISA; the reference arithmetic of the kernels).
template <int64_t Q>
inline void dequant_block(const uint8_t* blk, float* out) {
  const float d = half_to_float(blk);
  if constexpr (Q == kQ8_0) {
    for (int k = 0; k < kBlock; ++k) out[k] = d * static_cast<float>(static_cast<int8_t>(blk[2 + k]));
  } else if constexpr (Q == kQ4_0) {
    for (int k = 0; k < 16; ++k) {
      out[k] = d * static_cast<float>(static_cast<int>(blk[2 + k] & 15) - 8);
      out[k + 16] = d * static_cast<float>(static_cast<int>(blk[2 + k] >> 4) - 8);
    }
  } else {
    const float m = half_to_float(blk + 2);
    for (int k = 0; k < 16; ++k) {
      out[k] = std::fma(d, static_cast<float>(blk[4 + k] & 15), m);
      out[k + 16] = std::fma(d, static_cast<float>(blk[4 + k] >> 4), m);
    }
  }
}

}  // namespace quant
}  // namespace tandem_rt
