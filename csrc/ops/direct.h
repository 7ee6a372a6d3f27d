// The CPU implementations of the hot ops of a decode / verify step, callable without the torch
// dispatcher: tandem_rt._C.cpu.<op> binds them with pybind11 (module.cpp), so a step's ~10 op calls
// per layer skip the host work of a torch.ops call (boxing, schema parsing, dispatch). Same
// arguments, checks and results as torch.ops.tandem_rt.<op> on CPU tensors (each wrapper calls the
// op's own CPU function); no autograd (the engine runs under no_grad).
#pragma once

#include "common/torch_headers.h"

#include <optional>

namespace tandem_rt {
namespace direct {

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& add);
at::Tensor linear_rows_q(const at::Tensor& x, const at::Tensor& w, int64_t qtype, const std::optional<at::Tensor>& add);
at::Tensor linear_rows_q16(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                           const std::optional<at::Tensor>& add);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// Rows ids [T] of a GGUF-quantized embedding table [N, K / 32 * block_bytes] -> [T, K] in dtype.
at::Tensor embedding_rows_q(const at::Tensor& table, const at::Tensor& ids, int64_t qtype, at::ScalarType dtype);
at::Tensor silu_and_mul(const at::Tensor& x);
void rope_cache_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                      const at::Tensor& slot_mapping, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      double rope_theta, const std::optional<at::Tensor>& q);
// _out forms: the same op into a caller's contiguous output y of the op's result shape and x's
// dtype (checked); the decoder plan's team (ops/team.h) writes every op's result into buffers it
// allocates once per step.
void linear_rows_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& add);
void linear_rows_q_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                       const std::optional<at::Tensor>& add);
void linear_rows_q16_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                         const std::optional<at::Tensor>& add);
void rms_norm_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, double eps);
void silu_and_mul_out(at::Tensor& y, const at::Tensor& x);
// scratch: paged_attention_scratch(...) for the step's rows (the partial states of long sequences'
// key segments and their completion counts, row_invariant only; a decoder plan shares one between
// its layers and its team, the op allocates its own otherwise; the op leaves its counts zero).
// Only sequences longer than kAttentionSegmentKeys use it.
constexpr int64_t kAttentionSegmentKeys = 512;
void paged_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                     double scale, int64_t max_q_len, int64_t max_seq_len, bool row_invariant,
                     const std::optional<at::Tensor>& scratch = std::nullopt);
// None when no sequence can be longer than one segment (max_seq_len <= kAttentionSegmentKeys).
std::optional<at::Tensor> paged_attention_scratch(int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                                                  int64_t head_dim, int64_t max_seq_len);

}  // namespace direct
}  // namespace tandem_rt
