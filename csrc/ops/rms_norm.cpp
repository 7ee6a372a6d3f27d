// Op tandem_rt::rms_norm (CPU): y = weight * normalise(x), the engine's RMSNorm in one dispatch.
//
// torch's rms_norm on the CPU is a composite of ~6 ATen ops; in a small model's decode step each
// of them pays the cache misses left by the weight streams of the surrounding matmuls, so one
// loop per row is several times cheaper there (docs/ENGINE.md). The CUDA engine keeps torch's
// fused kernel. Rounding follows the reference model (tandem_rt.models.llama.RMSNorm): the
// statistics and x / rms in fp32, rounded to the input dtype, then multiplied by the weight in that dtype.
#include "ops/direct.h"
#include "common/check.h"
#include "ops/layer_math_cpu.h"
#include "ops/team.h"

#include <cmath>

namespace tandem_rt {
namespace {

// x: [rows, d] with row stride x_stride; w: [d]; y: [rows, d] contiguous. E: float, uint16_t
// (bf16 bits) or c10::Half.
template <typename E>
void rms_norm_impl(const E* x, int64_t x_stride, const E* w, E* y, int64_t rows, int64_t d, float eps) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  team::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    layer_math::rms_norm_rows(x, x_stride, w, y, begin, end, d, eps);
  });
}

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
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
}

// y [rows, d] (contiguous, checked by the callers) = the RMSNorm of x.
void rms_norm_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.numel() == 0) return;
  const float feps = static_cast<float>(eps);
  cpu_isa::check_variant();
  layer_math::dispatch_elem(x.scalar_type(), [&](auto tag) {
    using E = decltype(tag);
    rms_norm_impl(layer_math::elems<const E>(x), x.stride(0), layer_math::elems<const E>(weight),
                  layer_math::elems<E>(y), x.size(0), x.size(1), feps);
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  at::Tensor y = at::empty(x.sizes(), x.options());
  rms_norm_into(y, x, weight, eps);
  return y;
}

}  // namespace

namespace direct {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_cpu(x, weight, eps);
}
void rms_norm_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  check_out(y, x, x.size(0), x.size(1));
  rms_norm_into(y, x, weight, eps);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
}

}  // namespace tandem_rt
