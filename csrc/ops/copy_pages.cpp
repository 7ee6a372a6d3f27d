// Op tandem_rt::copy_pages: schema, validation shared with CUDA glue, CPU implementation.
#include "common/check.h"
#include "ops/copy_pages.h"

#include <cstring>

namespace tandem_rt {

void validate_copy_pages(const std::vector<at::Tensor>& caches, const at::Tensor& src_pages,
                         const at::Tensor& dst_pages) {
  TORCH_CHECK_VALUE(!caches.empty(), "caches must hold at least one cache tensor");
  const auto device = caches[0].device();
  for (size_t i = 0; i < caches.size(); ++i) {
    const auto name = "caches[" + std::to_string(i) + "]";
    check_device(caches[i], name.c_str(), device);
    check_contiguous(caches[i], name.c_str());
    TORCH_CHECK_VALUE(caches[i].dim() >= 1 && caches[i].size(0) > 0, name, " must have a non-empty page dimension");
  }
  for (auto [t, name] : {std::pair{&src_pages, "src_pages"}, std::pair{&dst_pages, "dst_pages"}}) {
    check_device(*t, name, device);
    check_dtype(*t, name, at::kLong);
    check_rank(*t, name, 1);
    check_contiguous(*t, name);
  }
  TORCH_CHECK_VALUE(src_pages.size(0) == dst_pages.size(0), "src_pages and dst_pages must have the same length, got ",
                    src_pages.size(0), " and ", dst_pages.size(0));
}

namespace {

void copy_pages_cpu(std::vector<at::Tensor> caches, const at::Tensor& src_pages, const at::Tensor& dst_pages) {
  validate_copy_pages(caches, src_pages, dst_pages);
  const int64_t n = src_pages.size(0);
  const int64_t* src = src_pages.data_ptr<int64_t>();
  const int64_t* dst = dst_pages.data_ptr<int64_t>();
  // every index against every cache before the first byte is written (no partial copy on error)
  for (size_t c = 0; c < caches.size(); ++c) {
    const int64_t pages = caches[c].size(0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(src[i] >= 0 && src[i] < pages, "src_pages[", i, "] = ", src[i], " is outside [0, ", pages,
                        ") of caches[", c, "]");
      TORCH_CHECK_VALUE(dst[i] >= 0 && dst[i] < pages, "dst_pages[", i, "] = ", dst[i], " is outside [0, ", pages,
                        ") of caches[", c, "]");
    }
  }
  for (auto& cache : caches) {
    const int64_t pages = cache.size(0);
    const int64_t bytes = cache.numel() / pages * cache.element_size();
    char* base = static_cast<char*>(cache.data_ptr());
    for (int64_t i = 0; i < n; ++i) {
      if (src[i] != dst[i]) std::memcpy(base + dst[i] * bytes, base + src[i] * bytes, bytes);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("copy_pages(Tensor(a!)[] caches, Tensor src_pages, Tensor dst_pages) -> ()");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("copy_pages", &copy_pages_cpu);
}

}  // namespace tandem_rt
