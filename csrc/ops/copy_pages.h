// Declarations shared by the CPU op file and its CUDA glue.
#pragma once

#include "common/torch_headers.h"

#include <vector>

namespace tandem_rt {

// caches: each [num_pages, ...] contiguous, one device; src_pages/dst_pages: int64 [n].
void validate_copy_pages(const std::vector<at::Tensor>& caches, const at::Tensor& src_pages,
                         const at::Tensor& dst_pages);

}  // namespace tandem_rt
