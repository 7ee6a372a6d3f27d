// Op tandem_rt::embedding_rows_q (CPU): rows of a GGUF-quantized embedding table, dequantized.
//
//   out[t, :] = dequant(table[ids[t], :]) rounded to dtype (fp32 / bf16 / fp16)
//
// The weights are quant::dequant_block's, which equal tandem_rt.quantized.dequantize's (ggml's
// dequantize_row_*): d * q is exact in fp32 (an 11-bit fp16 significand times an integer of at most
// 8 bits), so Q4_1's fma(d, nib, m) and dequantize's d * nib then + m round the same sum once; then
// one rounding to the output dtype. A decode step embeds one row per sequence: the ~10 ATen ops of
// the Python dequantisation cost ~0.3 ms there, this loop a few microseconds.
#include "common/check.h"
#include "ops/direct.h"
#include "ops/layer_math_cpu.h"
#include "ops/quant_blocks.h"

namespace tandem_rt {
namespace {

using quant::kBlock;
using quant::kQ4_0;
using quant::kQ4_1;
using quant::kQ8_0;

// table: [N, K / 32 * block_bytes] uint8 block rows; ids: [T] int64 in [0, N); out: [T, K] of E
// (float, bf16 bits or c10::Half: layer_math's element types).
template <int64_t Q, typename E>
void embed_rows(const uint8_t* table, int64_t row_bytes, const int64_t* ids, int64_t T, int64_t K, E* out) {
  float w[kBlock];
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* row = table + ids[t] * row_bytes;  // [K / 32 blocks]
    E* y = out + t * K;                               // [K]
    for (int64_t j = 0; j < K / kBlock; ++j) {
      quant::dequant_block<Q>(row + j * quant::block_bytes(Q), w);
      for (int k = 0; k < kBlock; ++k) y[j * kBlock + k] = layer_math::store<E>(w[k]);
    }
  }
}

template <typename E>
void embed_rows_q(int64_t qtype, const uint8_t* table, int64_t row_bytes, const int64_t* ids, int64_t T, int64_t K,
                  E* out) {
  if (qtype == kQ8_0) return embed_rows<kQ8_0, E>(table, row_bytes, ids, T, K, out);
  if (qtype == kQ4_0) return embed_rows<kQ4_0, E>(table, row_bytes, ids, T, K, out);
  embed_rows<kQ4_1, E>(table, row_bytes, ids, T, K, out);
}

void check_embedding_rows_q(const at::Tensor& table, const at::Tensor& ids, int64_t qtype, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(is_float_kv_dtype(dtype), "dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1,
                    "qtype must be 0 (Q8_0), 1 (Q4_0) or 2 (Q4_1), got ", qtype);
  TORCH_CHECK_VALUE(table.device().is_cpu(), "table must be on the CPU, got ", table.device());
  check_dtype(table, "table", at::kByte);
  check_rank(table, "table", 2);
  check_contiguous(table, "table");
  TORCH_CHECK_VALUE(table.size(1) % quant::block_bytes(qtype) == 0, "table.shape[1] (", table.size(1),
                    ") must be a whole number of ", quant::block_bytes(qtype), "-byte blocks for qtype ", qtype);
  check_device(ids, "ids", table.device());
  check_dtype(ids, "ids", at::kLong);
  check_rank(ids, "ids", 1);
  check_contiguous(ids, "ids");
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t N = table.size(0);
  for (int64_t t = 0; t < ids.size(0); ++t)
    TORCH_CHECK_VALUE(id[t] >= 0 && id[t] < N, "ids[", t, "] = ", id[t], " is outside [0, ", N, ")");
}

void embedding_rows_q_into(at::Tensor& out, const at::Tensor& table, const at::Tensor& ids, int64_t qtype) {
  const int64_t T = out.size(0), K = out.size(1), row_bytes = table.size(1);
  layer_math::dispatch_elem(out.scalar_type(), [&](auto e) {
    using E = decltype(e);
    embed_rows_q<E>(qtype, table.data_ptr<uint8_t>(), row_bytes, ids.data_ptr<int64_t>(), T, K,
                    layer_math::elems<E>(out));
  });
}

at::Tensor embedding_rows_q_cpu(const at::Tensor& table, const at::Tensor& ids, int64_t qtype, at::ScalarType dtype) {
  check_embedding_rows_q(table, ids, qtype, dtype);
  const int64_t K = table.size(1) / quant::block_bytes(qtype) * kBlock;
  at::Tensor out = at::empty({ids.size(0), K}, table.options().dtype(dtype));
  embedding_rows_q_into(out, table, ids, qtype);
  return out;
}

}  // namespace

namespace direct {
at::Tensor embedding_rows_q(const at::Tensor& table, const at::Tensor& ids, int64_t qtype, at::ScalarType dtype) {
  return embedding_rows_q_cpu(table, ids, qtype, dtype);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("embedding_rows_q(Tensor table, Tensor ids, int qtype, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("embedding_rows_q", &embedding_rows_q_cpu);
}

}  // namespace tandem_rt
