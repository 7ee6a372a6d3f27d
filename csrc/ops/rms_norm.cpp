// Op tandem_rt::rms_norm (CPU): y = weight * normalise(x), the engine's RMSNorm in one dispatch.
//
// torch's rms_norm on the CPU is a composite of ~6 ATen ops; in a small model's decode step each
// of them pays the cache misses left by the weight streams of the surrounding matmuls, so one
// loop per row is several times cheaper there (docs/ENGINE.md). The CUDA engine keeps torch's
// fused kernel. Rounding follows the reference model (tandem_rt.models.llama.RMSNorm): the
// statistics and x / rms in fp32, rounded to the input dtype, then multiplied by the weight in that dtype.
#include "common/check.h"

#include <cmath>

namespace tandem_rt {
namespace {

template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  // x: [rows, d] with row stride x_stride; w: [d]; y: [rows, d] contiguous
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      T* yr = y + r * d;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        const float v = static_cast<float>(xr[i]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const T normed = static_cast<T>(static_cast<float>(xr[i]) * inv);
        yr[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
      }
    }
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rank(x, "x", 2);
  TORCH_CHECK_VALUE(is_float_kv_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == 0 || x.size(1) == 1 || x.stride(1) == 1, "x must have a contiguous last dim");
  check_device(weight, "weight", x.device());
  check_dtype(weight, "weight", x.scalar_type());
  check_rank(weight, "weight", 1);
  check_contiguous(weight, "weight");
  check_size(weight, "weight", 0, x.size(1));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            x.size(0), x.size(1), static_cast<float>(eps));
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
}

}  // namespace tandem_rt
