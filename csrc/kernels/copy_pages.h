// Raw-pointer launcher for copy-on-write page copies (no ATen: included by .cu and .cpp).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tandem_rt::kernels {

// Copies page src[i] -> dst[i] in every cache, all caches in one launch.
//   cache_ptrs:  [num_caches] device array of base addresses (uint64), each cache
//                [num_pages_c, page_bytes_c] bytes, contiguous
//   page_bytes:  [num_caches] bytes per page of each cache
//   num_pages:   [num_caches] pages in each cache (out-of-range indices are skipped)
//   src, dst:    [n] page indices
cudaError_t launch_copy_pages(const uint64_t* cache_ptrs, const int64_t* page_bytes,
                              const int64_t* num_pages, const int64_t* src, const int64_t* dst,
                              int num_caches, int n, cudaStream_t stream);

}  // namespace tandem_rt::kernels
