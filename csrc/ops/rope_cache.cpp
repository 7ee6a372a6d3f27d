// Op tandem_rt::rope_cache_write: schema, validation shared with CUDA glue, CPU implementation.
//
// Rotates K (and optionally Q) in place at absolute positions (Hugging Face Llama rotate-half
// convention, inv_freq = 1 / theta^(2i/D) and angles in fp32, rotation in fp32) and writes the
// rotated K row and the V row into their cache slots (slot = page * page_size + offset; -1 = skip).
#include "ops/direct.h"
#include "common/check.h"
#include "ops/rope_cache.h"

#include "ops/team.h"

#include <cmath>
#include <vector>

namespace tandem_rt {

void validate_rope_cache_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                               const at::Tensor& slot_mapping, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, double rope_theta, const std::optional<at::Tensor>& q) {
  const auto device = k.device();
  check_rank(k, "k", 3);
  TORCH_CHECK_VALUE(is_float_kv_dtype(k.scalar_type()), "k must be float32, float16 or bfloat16, got ",
                    k.scalar_type());
  TORCH_CHECK_VALUE(heads_packed(k), "k must have packed heads (stride[-1] == 1, stride[-2] == head_dim)");
  const int64_t n = k.size(0), hkv = k.size(1), d = k.size(2);
  TORCH_CHECK_VALUE(d > 0 && d % 2 == 0, "k head_dim must be even and positive, got ", d);
  check_device(v, "v", device);
  check_dtype(v, "v", k.scalar_type());
  check_rank(v, "v", 3);
  TORCH_CHECK_VALUE(heads_packed(v), "v must have packed heads (stride[-1] == 1, stride[-2] == head_dim)");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  for (auto [t, name] : {std::pair{&positions, "positions"}, std::pair{&slot_mapping, "slot_mapping"}}) {
    check_device(*t, name, device);
    check_dtype(*t, name, at::kLong);
    check_rank(*t, name, 1);
    check_contiguous(*t, name);
    check_size(*t, name, 0, n);
  }
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_device(*t, name, device);
    check_dtype(*t, name, k.scalar_type());
    check_rank(*t, name, 4);
    check_contiguous(*t, name);
    check_size(*t, name, 2, hkv);
    check_size(*t, name, 3, d);
  }
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(0) > 0 && k_cache.size(1) > 0, "k_cache must have at least one page and slot");
  TORCH_CHECK_VALUE(std::isfinite(rope_theta) && rope_theta > 0.0, "rope_theta must be positive, got ", rope_theta);
  if (q.has_value()) {
    const auto& qt = *q;
    check_device(qt, "q", device);
    check_dtype(qt, "q", k.scalar_type());
    check_rank(qt, "q", 3);
    TORCH_CHECK_VALUE(heads_packed(qt), "q must have packed heads (stride[-1] == 1, stride[-2] == head_dim)");
    check_size(qt, "q", 0, n);
    check_size(qt, "q", 2, d);
    TORCH_CHECK_VALUE(qt.size(1) > 0, "q must have at least one head");
  }
}

namespace {

// inv_freq[i] = 1 / theta^(2i/D), every step rounded to fp32 as torch does in rope_cos_sin.
std::vector<float> inv_freq_table(int64_t d, double theta) {
  std::vector<float> inv(d / 2);
  const float theta_f = static_cast<float>(theta);
  for (int64_t i = 0; i < d / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(d);
    const float p = static_cast<float>(std::pow(static_cast<double>(theta_f), static_cast<double>(e)));
    inv[i] = 1.0f / p;
  }
  return inv;
}

template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t d, const float* cs, const float* sn) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* row = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(row[i]);
      const float x2 = static_cast<float>(row[i + half]);
      const float a = x1 * cs[i], b = x2 * sn[i], c = x2 * cs[i], e = x1 * sn[i];
      row[i] = static_cast<T>(a - b);
      row[i + half] = static_cast<T>(c + e);
    }
  }
}

template <typename T>
void rope_cache_write_impl(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                           const at::Tensor& slot_mapping, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           double rope_theta, const std::optional<at::Tensor>& q) {
  const int64_t n = k.size(0), hkv = k.size(1), d = k.size(2);
  const int64_t hq = q.has_value() ? q->size(1) : 0;
  const int64_t k_stride = k.stride(0), v_stride = v.stride(0), q_stride = q.has_value() ? q->stride(0) : 0;
  T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* qp = q.has_value() ? q->data_ptr<T>() : nullptr;
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const auto inv = inv_freq_table(d, rope_theta);
  team::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(d / 2), sn(d / 2);
    for (int64_t r = begin; r < end; ++r) {
      const float p = static_cast<float>(pos[r]);
      for (int64_t i = 0; i < d / 2; ++i) {
        const float angle = p * inv[i];
        cs[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sn[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      T* krow = kp + r * k_stride;
      rotate_heads(krow, hkv, d, cs.data(), sn.data());
      if (qp != nullptr) rotate_heads(qp + r * q_stride, hq, d, cs.data(), sn.data());
      const int64_t slot = slots[r];
      if (slot < 0) continue;
      std::copy(krow, krow + hkv * d, kc + slot * hkv * d);
      const T* vrow = vp + r * v_stride;
      std::copy(vrow, vrow + hkv * d, vc + slot * hkv * d);
    }
  });
}

void rope_cache_write_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                          const at::Tensor& slot_mapping, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          double rope_theta, const std::optional<at::Tensor>& q) {
  validate_rope_cache_write(k, v, positions, slot_mapping, k_cache, v_cache, rope_theta, q);
  const int64_t n = k.size(0);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK_VALUE(slots[r] >= -1 && slots[r] < num_slots, "slot_mapping[", r, "] = ", slots[r],
                      " is outside [-1, ", num_slots, ")");
    TORCH_CHECK_VALUE(pos[r] >= 0, "positions[", r, "] = ", pos[r], " is negative");
  }
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "rope_cache_write_cpu", [&] {
    rope_cache_write_impl<scalar_t>(k, v, positions, slot_mapping, k_cache, v_cache, rope_theta, q);
  });
}

}  // namespace

namespace direct {
void rope_cache_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                      const at::Tensor& slot_mapping, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      double rope_theta, const std::optional<at::Tensor>& q) {
  rope_cache_write_cpu(k, v, positions, slot_mapping, k_cache, v_cache, rope_theta, q);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("rope_cache_write(Tensor(a!) k, Tensor v, Tensor positions, Tensor slot_mapping, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, float rope_theta, Tensor(d!)? q) -> ()");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("rope_cache_write", &rope_cache_write_cpu);
}

}  // namespace tandem_rt
