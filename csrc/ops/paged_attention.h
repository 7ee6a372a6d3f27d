// Declarations shared by the paged_attention CPU op file and its CUDA glue.
#pragma once

#include "common/torch_headers.h"

namespace tandem_rt {

// Checks devices, dtypes, ranks, layouts, shapes and scalars (not index values, which would need
// the host):
//   out: [Ntok, Hq, D] contiguous; q: [Ntok, Hq, D] (heads packed, any row stride);
//   k_cache/v_cache: [num_pages, page_size, Hkv, D] contiguous, Hq % Hkv == 0;
//   block_tables: int32 [B, max_pages_per_seq]; seq_lens: int32 [B]; query_start_loc: int32 [B + 1].
void validate_paged_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, double scale, int64_t max_q_len,
                              int64_t max_seq_len);

// The CUDA launch options of the op (explicit arguments, checked on every device): kernel 0 = the
// SIMT kernel, 1 = the tensor-core kernel (fp16 / bf16, sm_80+; fp32 keeps SIMT); waves = CTA waves
// the KV split aims for, 0 = the default (kernels::kPagedAttentionDefaultWaves).
void validate_paged_attention_options(int64_t kernel, int64_t waves);

// Checks the index tensors' values (CPU tensors only): query_start_loc starts at 0, is
// non-decreasing and ends at Ntok; q_len <= max_q_len; q_len <= seq_len <= max_seq_len; the
// pages each sequence uses fit in block_tables and lie in [0, num_pages).
void validate_paged_attention_indices(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_tables,
                                      const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                      int64_t max_q_len, int64_t max_seq_len);

}  // namespace tandem_rt
