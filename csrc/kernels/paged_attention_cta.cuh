// What one paged-attention CTA works on, shared by the SIMT and the tensor-core kernels (grid
// (hkv * row_tiles, num_seqs, num_splits)): its KV head, sequence, query rows and key range.
#pragma once

#include <cstdint>

#include "kernels/paged_attention.h"

namespace tandem_rt::kernels {

struct CtaWork {
  int kvh, b, split, group;  // KV head, sequence, KV split, query heads per KV head
  int q0, q_len;             // first query row (token) of sequence b and its row count
  int r0, rows;              // first CTA row (r = t * group + g) and real rows (0: nothing to do)
  int seq;                   // cached tokens of sequence b, this call's queries included
  int k_begin, k_end;        // keys [k_begin, k_end) of this split that the CTA's last row may see
  const int32_t* bt;         // [max_pages] page table row of sequence b
  int64_t slot_bytes;        // bytes of one cache slot (hkv * D elements)
  int64_t head_bytes;        // byte offset of KV head kvh inside a slot
};

// kTileRows: query rows per CTA. A CTA with rows == 0 must return before any barrier (CTA-uniform).
template <int kTileRows, int D, typename T>
__device__ __forceinline__ CtaWork cta_work(const PagedAttentionParams& p) {
  CtaWork w;
  w.kvh = blockIdx.x % p.hkv;
  const int tile = blockIdx.x / p.hkv;
  w.b = blockIdx.y;
  w.split = blockIdx.z;
  w.group = p.hq / p.hkv;
  w.q0 = p.query_start_loc[w.b];
  w.q_len = p.query_start_loc[w.b + 1] - w.q0;
  w.r0 = tile * kTileRows;
  w.rows = max(0, min(kTileRows, w.q_len * w.group - w.r0));
  w.seq = p.seq_lens[w.b];
  const int kv_end = w.seq - w.q_len + (w.r0 + w.rows - 1) / w.group + 1;  // keys the last row may see
  w.k_begin = w.split * p.split_len;
  w.k_end = min(kv_end, w.k_begin + p.split_len);
  w.bt = p.block_tables + static_cast<int64_t>(w.b) * p.max_pages;
  w.slot_bytes = static_cast<int64_t>(p.hkv) * D * sizeof(T);
  w.head_bytes = static_cast<int64_t>(w.kvh) * D * sizeof(T);
  return w;
}

}  // namespace tandem_rt::kernels
