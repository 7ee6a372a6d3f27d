// Declarations shared by the rope_cache_write CPU op file and its CUDA glue.
#pragma once

#include "common/torch_headers.h"

#include <optional>

namespace tandem_rt {

// Checks devices, dtypes, ranks, layouts and shapes (not index values, which would need the host):
//   k: [N, Hkv, D] (heads contiguous, any row stride), v: [N, Hkv, D], q: optional [N, Hq, D],
//   positions/slot_mapping: int64 [N], k_cache/v_cache: [num_pages, page_size, Hkv, D] contiguous.
void validate_rope_cache_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                               const at::Tensor& slot_mapping, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, double rope_theta, const std::optional<at::Tensor>& q);

// True when the last two dims of a [N, H, D] tensor are packed (stride(2) == 1, stride(1) == D),
// so rows may be views into a wider projection output.
inline bool heads_packed(const at::Tensor& t) {
  return t.dim() == 3 && (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
}

}  // namespace tandem_rt
