// Raw-pointer launcher for paged attention (decode and verify blocks; no ATen: included by .cu
// and .cpp).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kernels/kv_dtype.h"

namespace tandem_rt::kernels {

// Attention kernel of a launch (PagedAttentionParams::kernel).
enum PagedAttentionKernel : int {
  kPagedAttentionSimt = 0,  // paged_attention.cu: CUDA cores, every dtype (the default)
  kPagedAttentionMma = 1,   // paged_attention_mma.cu: tensor cores + cp.async, fp16/bf16, sm_80+
                            // (fp32 launches use the SIMT kernel whatever this field says)
};

struct PagedAttentionParams {
  void* out;                       // [ntok, hq, head_dim] contiguous
  const void* q;                   // [ntok, hq, head_dim], row stride q_stride elements, 16-byte aligned rows
  const void* k_cache;             // [num_pages, page_size, hkv, head_dim] contiguous
  const void* v_cache;             // [num_pages, page_size, hkv, head_dim] contiguous
  const int32_t* block_tables;     // [num_seqs, max_pages]
  const int32_t* seq_lens;         // [num_seqs] cached tokens, including this call's queries
  const int32_t* query_start_loc;  // [num_seqs + 1]
  float* part_out;                 // [num_splits, ntok, hq, head_dim] fp32 workspace (num_splits > 1)
  float* part_ml;                  // [num_splits, ntok, hq, 2] fp32 workspace: (max in log2 units, sum)
  int64_t q_stride;
  int num_seqs, ntok, hq, hkv, head_dim, page_size, max_pages, num_pages;
  int max_q_len;                   // upper bound of q_len per sequence (grid sizing)
  int num_splits, split_len;       // KV splits and keys per split (from paged_attention_splits)
  float scale;
  KvDType dtype;
  int kernel;                      // PagedAttentionKernel
};

// Head dims with a compiled kernel.
bool paged_attention_head_dim_supported(int head_dim);

// CTA waves the KV split aims for when the caller gives none (paged_attention_splits, waves <= 0).
constexpr int kPagedAttentionDefaultWaves = 8;

// Chooses the number of KV splits (and keys per split, written to *split_len) for a launch, from
// the CTA count without splitting, max_seq_len and the SM count of `device` (queried once, cached):
// enough splits for `waves` CTAs per SM (<= 0: kPagedAttentionDefaultWaves; a tuning option).
int paged_attention_splits(int device, int num_seqs, int hq, int hkv, int max_q_len, int max_seq_len, int waves,
                           int* split_len);

// Launches the attention kernel chosen by p.kernel and, when num_splits > 1, the reduction over
// splits.
cudaError_t launch_paged_attention(const PagedAttentionParams& p, cudaStream_t stream);

// Launches only the tensor-core attention kernel (paged_attention_mma.cu; fp16/bf16, head_dim
// 32/64/128): with num_splits > 1 it writes part_out / part_ml and the caller launches the combine.
// Returns cudaErrorNotSupported below compute capability 8.0, cudaErrorInvalidValue for fp32.
// Called by launch_paged_attention.
cudaError_t launch_paged_attention_mma(const PagedAttentionParams& p, cudaStream_t stream);

}  // namespace tandem_rt::kernels
