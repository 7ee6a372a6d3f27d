// CUDA dispatch for tandem_rt::copy_pages (glue only: the kernel lives in kernels/copy_pages.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/check.h"
#include "kernels/copy_pages.h"
#include "ops/copy_pages.h"

namespace tandem_rt {
namespace {

void copy_pages_cuda(std::vector<at::Tensor> caches, const at::Tensor& src_pages, const at::Tensor& dst_pages) {
  validate_copy_pages(caches, src_pages, dst_pages);
  const c10::cuda::CUDAGuard guard(caches[0].device());
  const int64_t num_caches = static_cast<int64_t>(caches.size());
  // meta rows: [0] base address, [1] page bytes, [2] num pages; staged through pinned memory.
  auto meta = at::empty({3, num_caches}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  auto* m = meta.data_ptr<int64_t>();
  for (int64_t c = 0; c < num_caches; ++c) {
    m[c] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(caches[c].data_ptr()));
    m[num_caches + c] = caches[c].numel() / caches[c].size(0) * caches[c].element_size();
    m[2 * num_caches + c] = caches[c].size(0);
  }
  auto meta_dev = meta.to(caches[0].device(), /*non_blocking=*/true);
  const auto* md = meta_dev.data_ptr<int64_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto err = kernels::launch_copy_pages(reinterpret_cast<const uint64_t*>(md), md + num_caches, md + 2 * num_caches,
                                        src_pages.data_ptr<int64_t>(), dst_pages.data_ptr<int64_t>(),
                                        static_cast<int>(num_caches), static_cast<int>(src_pages.size(0)), stream);
  TORCH_CHECK(err == cudaSuccess, "copy_pages kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem_rt, CUDA, m) {
  m.impl("copy_pages", &copy_pages_cuda);
}

}  // namespace tandem_rt
