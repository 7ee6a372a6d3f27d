// Op tandem_rt::silu_and_mul (CPU): y = silu(x[:, :I]) * x[:, I:] for the fused gate/up output of
// a Llama MLP, in one dispatch (torch needs silu, two slices and a mul). CPU only, like rms_norm
// (see rms_norm.cpp). Rounding follows F.silu(gate) * up: silu in fp32 rounded to the input dtype,
// then the product in fp32 rounded to it.
#include "ops/direct.h"
#include "common/check.h"
#include "ops/layer_math_cpu.h"
#include "ops/team.h"

namespace tandem_rt {
namespace {

// x: [rows, 2 * inter] (gate columns, then up columns), row stride x_stride; y: [rows, inter].
// E: float, uint16_t (bf16 bits) or c10::Half.
template <typename E>
void silu_and_mul_impl(const E* x, int64_t x_stride, E* y, int64_t rows, int64_t inter) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(inter, 1));
  team::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    layer_math::silu_mul_rows(x, x_stride, y, begin, end, inter);
  });
}

void check_silu_and_mul(const at::Tensor& x) {
  check_rank(x, "gate_up", 2);
  TORCH_CHECK_VALUE(is_float_kv_dtype(x.scalar_type()), "gate_up must be float32, float16 or bfloat16, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) % 2 == 0, "gate_up.shape[1] must be even (gate columns, then up columns), got ", x.size(1));
  TORCH_CHECK_VALUE(x.size(1) == 0 || x.stride(1) == 1, "gate_up must have a contiguous last dim");
}

// y [rows, inter] (contiguous, checked by the callers) = silu(gate) * up of x.
void silu_and_mul_into(at::Tensor& y, const at::Tensor& x) {
  const int64_t inter = x.size(1) / 2;
  if (y.numel() == 0) return;
  cpu_isa::check_variant();
  layer_math::dispatch_elem(x.scalar_type(), [&](auto tag) {
    using E = decltype(tag);
    silu_and_mul_impl(layer_math::elems<const E>(x), x.stride(0), layer_math::elems<E>(y), x.size(0), inter);
  });
}

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  check_silu_and_mul(x);
  at::Tensor y = at::empty({x.size(0), x.size(1) / 2}, x.options());
  silu_and_mul_into(y, x);
  return y;
}

}  // namespace

namespace direct {
at::Tensor silu_and_mul(const at::Tensor& x) { return silu_and_mul_cpu(x); }
void silu_and_mul_out(at::Tensor& y, const at::Tensor& x) {
  check_silu_and_mul(x);
  check_out(y, x, x.size(0), x.size(1) / 2);
  silu_and_mul_into(y, x);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("silu_and_mul", &silu_and_mul_cpu);
}

}  // namespace tandem_rt
