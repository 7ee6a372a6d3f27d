// Copy-on-write page copy for every layer of both pools in one launch.
#include "kernels/copy_pages.h"

namespace tandem_rt::kernels {
namespace {

// grid: (n pairs, num_caches); block: 256 threads copying 16-byte words when aligned.
__global__ void copy_pages_kernel(const uint64_t* __restrict__ cache_ptrs,  // [num_caches]
                                  const int64_t* __restrict__ page_bytes,   // [num_caches]
                                  const int64_t* __restrict__ num_pages,    // [num_caches]
                                  const int64_t* __restrict__ src,          // [n]
                                  const int64_t* __restrict__ dst) {        // [n]
  const int pair = blockIdx.x;
  const int c = blockIdx.y;
  const int64_t s = src[pair], d = dst[pair], pages = num_pages[c];
  if (s < 0 || s >= pages || d < 0 || d >= pages || s == d) return;
  const int64_t bytes = page_bytes[c];
  char* base = reinterpret_cast<char*>(cache_ptrs[c]);
  const char* from = base + s * bytes;
  char* to = base + d * bytes;
  if (bytes % 16 == 0 && (reinterpret_cast<uintptr_t>(base) % 16) == 0) {
    const int64_t words = bytes / 16;
    const int4* f = reinterpret_cast<const int4*>(from);
    int4* t = reinterpret_cast<int4*>(to);
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) t[i] = f[i];
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) to[i] = from[i];
  }
}

}  // namespace

cudaError_t launch_copy_pages(const uint64_t* cache_ptrs, const int64_t* page_bytes,
                              const int64_t* num_pages, const int64_t* src, const int64_t* dst,
                              int num_caches, int n, cudaStream_t stream) {
  if (n == 0 || num_caches == 0) return cudaSuccess;
  dim3 grid(n, num_caches);
  copy_pages_kernel<<<grid, 256, 0, stream>>>(cache_ptrs, page_bytes, num_pages, src, dst);
  return cudaGetLastError();
}

}  // namespace tandem_rt::kernels
