// Ops tandem_rt::sample, tandem_rt::verify and tandem_rt::rng_uniform: schemas, validation
// shared with the CUDA glue, CPU implementations.
#include "ops/sampling.h"

#include <ATen/Parallel.h>

#include <vector>

#include "common/check.h"
#include "common/philox.h"
#include "common/sampling_common.h"
#include "ops/processed_dist_cpu.h"

namespace tandem_rt {
namespace {

void validate_row_params(const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                         const at::Tensor& rng_state, int64_t B, const at::Device& device) {
  for (auto [t, name, dtype] : {std::tuple{&temperature, "temperature", at::kFloat},
                                std::tuple{&top_k, "top_k", at::kInt}, std::tuple{&top_p, "top_p", at::kFloat}}) {
    check_device(*t, name, device);
    check_dtype(*t, name, dtype);
    check_rank(*t, name, 1);
    check_size(*t, name, 0, B);
    check_contiguous(*t, name);
  }
  check_device(rng_state, "rng_state", device);
  check_dtype(rng_state, "rng_state", at::kLong);
  TORCH_CHECK_VALUE((rng_state.dim() == 1 && rng_state.size(0) == 2) ||
                        (rng_state.dim() == 2 && rng_state.size(0) == B && rng_state.size(1) == 2),
                    "rng_state must be [2] (seed, offset) or per row [", B, ", 2], got shape ", rng_state.sizes());
  check_contiguous(rng_state, "rng_state");
}

// offset += kRngOffsetStep of the shared state [2] (rng_rows == 0) or of every row's [rng_rows, 2].
void advance_rng(int64_t* state, int rng_rows) {
  if (rng_rows == 0) state[1] += kRngOffsetStep;
  for (int b = 0; b < rng_rows; ++b) state[2 * b + 1] += kRngOffsetStep;
}

void check_logits(const at::Tensor& t, const char* name, int64_t rank) {
  TORCH_CHECK_VALUE(is_float_kv_dtype(t.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                    t.scalar_type());
  check_rank(t, name, rank);
  check_contiguous(t, name);
  TORCH_CHECK_VALUE(t.size(rank - 1) > 0, name, " must have a non-empty vocabulary dimension, got shape ",
                    t.sizes());
}

}  // namespace

void validate_sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                     const at::Tensor& top_p, const at::Tensor& rng_state,
                     const std::optional<at::Tensor>& probs_out) {
  check_logits(logits, "logits", 2);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), "logits vocabulary size ", V, " does not fit int32");
  validate_row_params(temperature, top_k, top_p, rng_state, B, logits.device());
  if (probs_out.has_value()) {
    const auto& p = *probs_out;
    check_device(p, "probs_out", logits.device());
    check_dtype(p, "probs_out", at::kFloat);
    check_rank(p, "probs_out", 2);
    check_size(p, "probs_out", 0, B);
    check_size(p, "probs_out", 1, V);
    check_contiguous(p, "probs_out");
  }
}

void validate_verify(const at::Tensor& draft_tokens, const at::Tensor& draft_lens,
                     const std::optional<at::Tensor>& draft_probs, const at::Tensor& target_logits,
                     const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                     const at::Tensor& rng_state) {
  check_logits(target_logits, "target_logits", 3);
  const auto device = target_logits.device();
  const int64_t B = target_logits.size(0), V = target_logits.size(2);
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), "target_logits vocabulary size ", V, " does not fit int32");
  check_device(draft_tokens, "draft_tokens", device);
  check_dtype(draft_tokens, "draft_tokens", at::kLong);
  check_rank(draft_tokens, "draft_tokens", 2);
  check_size(draft_tokens, "draft_tokens", 0, B);
  check_contiguous(draft_tokens, "draft_tokens");
  const int64_t G = draft_tokens.size(1);
  check_size(target_logits, "target_logits", 1, G + 1);
  check_device(draft_lens, "draft_lens", device);
  check_dtype(draft_lens, "draft_lens", at::kInt);
  check_rank(draft_lens, "draft_lens", 1);
  check_size(draft_lens, "draft_lens", 0, B);
  check_contiguous(draft_lens, "draft_lens");
  if (draft_probs.has_value()) {
    const auto& q = *draft_probs;
    check_device(q, "draft_probs", device);
    check_dtype(q, "draft_probs", at::kFloat);
    check_rank(q, "draft_probs", 3);
    check_size(q, "draft_probs", 0, B);
    check_size(q, "draft_probs", 1, G);
    check_size(q, "draft_probs", 2, V);
    check_contiguous(q, "draft_probs");
  }
  validate_row_params(temperature, top_k, top_p, rng_state, B, device);
}

void validate_rng_uniform(const at::Tensor& rng_state, int64_t num_subsequences, int64_t num_draws) {
  check_dtype(rng_state, "rng_state", at::kLong);
  check_rank(rng_state, "rng_state", 1);
  check_size(rng_state, "rng_state", 0, 2);
  check_contiguous(rng_state, "rng_state");
  TORCH_CHECK_VALUE(num_subsequences >= 0 && num_subsequences <= (int64_t{1} << 32),
                    "num_subsequences must be in [0, 2^32], got ", num_subsequences);
  TORCH_CHECK_VALUE(num_draws >= 0 && num_draws <= (int64_t{1} << 32), "num_draws must be in [0, 2^32], got ",
                    num_draws);
}

namespace {

// The logits rows as the ops read them: fp32, or, when every row is greedy, bf16 logits as they are
// (greedy reads only the argmax, which widening bf16 to fp32 does not change; the fp32 copy of a
// large vocabulary is a fresh allocation with page faults on every call). rows: [R, V].
struct LogitRows {
  at::Tensor f32;          // [R, V] fp32 contiguous, or undefined
  const uint16_t* bf16;    // [R, V] bf16 bits when f32 is undefined
  int64_t V;
  const float* row(int64_t r) const { return f32.data_ptr<float>() + r * V; }
  int64_t argmax(int64_t r) const {
    return f32.defined() ? cpu::argmax_lowest(row(r), V) : cpu::argmax_lowest_bf16(bf16 + r * V, V);
  }
};

LogitRows logit_rows(const at::Tensor& logits, const float* temperature, int64_t B) {
  const int64_t V = logits.size(logits.dim() - 1);
  bool greedy = true;
  for (int64_t b = 0; b < B; ++b) greedy = greedy && !(temperature[b] > 0.0f);
  if (greedy && logits.scalar_type() == at::kBFloat16 && logits.is_contiguous())
    return {at::Tensor(), reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()), V};
  return {logits.to(at::kFloat).contiguous(), nullptr, V};
}

// Value checks that need the data (CPU only: on CUDA they would synchronise with the host).
void check_row_param_values(const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p) {
  const float* t = temperature.data_ptr<float>();
  const int32_t* k = top_k.data_ptr<int32_t>();
  const float* p = top_p.data_ptr<float>();
  for (int64_t b = 0; b < temperature.size(0); ++b) {
    TORCH_CHECK_VALUE(t[b] >= 0.0f && std::isfinite(t[b]), "temperature[", b, "] = ", t[b],
                      " must be finite and >= 0");
    TORCH_CHECK_VALUE(k[b] >= 0, "top_k[", b, "] = ", k[b], " must be >= 0");
    TORCH_CHECK_VALUE(p[b] > 0.0f && p[b] <= 1.0f, "top_p[", b, "] = ", p[b], " must be in (0, 1]");
  }
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, at::Tensor rng_state, std::optional<at::Tensor> probs_out) {
  validate_sample(logits, temperature, top_k, top_p, rng_state, probs_out);
  check_row_param_values(temperature, top_k, top_p);
  const int64_t B = logits.size(0), V = logits.size(1);
  const LogitRows rows = logit_rows(logits, temperature.data_ptr<float>(), B);
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  int64_t* state = rng_state.data_ptr<int64_t>();
  const int rng_rows = rng_state.dim() == 2 ? static_cast<int>(B) : 0;
  const float* T = temperature.data_ptr<float>();
  const int32_t* K = top_k.data_ptr<int32_t>();
  const float* P = top_p.data_ptr<float>();
  float* out = probs_out.has_value() ? probs_out->data_ptr<float>() : nullptr;
  int64_t* tok = tokens.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    // sized only for a sampled row without probs_out: a greedy step allocates nothing (a [V]
    // buffer of a large vocabulary is a fresh mmap with page faults on every call)
    std::vector<float> scratch;
    std::vector<int32_t> order;
    for (int64_t b = begin; b < end; ++b) {
      if (!out && T[b] > 0.0f && scratch.empty()) scratch.resize(V);
      float* probs = out ? out + b * V : scratch.data();
      if (!(T[b] > 0.0f)) {
        tok[b] = rows.argmax(b);
        if (out) {
          std::fill(probs, probs + V, 0.0f);
          probs[tok[b]] = 1.0f;
        }
        continue;
      }
      const float* row = rows.row(b);
      cpu::processed_distribution(row, V, T[b], K[b], P[b], probs, order);
      float total = 0.0f;
      for (int64_t j = 0; j < V; ++j) total += probs[j];
      const float u = row_uniform(row_rng_key(state, rng_rows, b), sample_draw_index());
      tok[b] = cpu::sample_from_weights(probs, V, total, u);
    }
  });
  advance_rng(state, rng_rows);
  return tokens;
}

std::tuple<at::Tensor, at::Tensor> verify_cpu(const at::Tensor& draft_tokens, const at::Tensor& draft_lens,
                                              const std::optional<at::Tensor>& draft_probs,
                                              const at::Tensor& target_logits, const at::Tensor& temperature,
                                              const at::Tensor& top_k, const at::Tensor& top_p,
                                              at::Tensor rng_state) {
  validate_verify(draft_tokens, draft_lens, draft_probs, target_logits, temperature, top_k, top_p, rng_state);
  check_row_param_values(temperature, top_k, top_p);
  const int64_t B = target_logits.size(0), G = draft_tokens.size(1), V = target_logits.size(2);
  const int32_t* lens = draft_lens.data_ptr<int32_t>();
  const int64_t* draft = draft_tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= G, "draft_lens[", b, "] = ", lens[b], " is outside [0, ", G, "]");
    for (int64_t i = 0; i < lens[b]; ++i) {
      const int64_t x = draft[b * G + i];
      TORCH_CHECK_VALUE(x >= 0 && x < V, "draft_tokens[", b, ", ", i, "] = ", x, " is outside [0, ", V, ")");
    }
  }
  const LogitRows rows = logit_rows(target_logits, temperature.data_ptr<float>(), B);
  auto accepted = at::empty({B}, draft_lens.options());
  auto emitted = at::full({B, G + 1}, -1, draft_tokens.options());
  int64_t* state = rng_state.data_ptr<int64_t>();
  const int rng_rows = rng_state.dim() == 2 ? static_cast<int>(B) : 0;
  const float* Q = draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr;
  const float* T = temperature.data_ptr<float>();
  const int32_t* K = top_k.data_ptr<int32_t>();
  const float* P = top_p.data_ptr<float>();
  int32_t* acc = accepted.data_ptr<int32_t>();
  int64_t* em = emitted.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, w;  // sized for the first sampled row (greedy rows need neither)
    std::vector<int32_t> order;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      if (T[b] > 0.0f && p.empty()) p.resize(V), w.resize(V);
      const RowRngKey key = row_rng_key(state, rng_rows, b);
      int64_t* out = em + b * (G + 1);
      for (int64_t i = 0; i <= len; ++i) {
        const int64_t r = b * (G + 1) + i;
        if (!(T[b] > 0.0f)) {  // greedy: longest prefix equal to the target's argmax
          const int64_t a = rows.argmax(r);
          out[i] = a;
          if (i < len && draft[b * G + i] == a) continue;
          acc[b] = static_cast<int32_t>(i);
          break;
        }
        cpu::processed_distribution(rows.row(r), V, T[b], K[b], P[b], p.data(), order);
        if (i == len) {  // every draft accepted: bonus token from p
          float total = 0.0f;
          for (int64_t j = 0; j < V; ++j) total += p[j];
          out[i] = cpu::sample_from_weights(p.data(), V, total, row_uniform(key, verify_emit_draw_index(i)));
          acc[b] = static_cast<int32_t>(len);
          break;
        }
        const int64_t x = draft[b * G + i];
        const float* q = Q ? Q + (b * G + i) * V : nullptr;
        const float qx = q ? q[x] : 1.0f;
        if (accept_draft(row_uniform(key, verify_accept_draw_index(i)), p[x], qx)) {
          out[i] = x;
          continue;
        }
        // rejected: sample from normalise(max(0, p - q)), or from p if that has no mass
        float total = 0.0f;
        for (int64_t j = 0; j < V; ++j) {
          const float qj = q ? q[j] : (j == x ? 1.0f : 0.0f);
          w[j] = std::max(0.0f, p[j] - qj);
          total += w[j];
        }
        const float* weights = w.data();
        if (!(total >= kResidualMinMass)) {
          weights = p.data();
          total = 0.0f;
          for (int64_t j = 0; j < V; ++j) total += p[j];
        }
        out[i] = cpu::sample_from_weights(weights, V, total, row_uniform(key, verify_emit_draw_index(i)));
        acc[b] = static_cast<int32_t>(i);
        break;
      }
    }
  });
  advance_rng(state, rng_rows);
  return {accepted, emitted};
}

at::Tensor rng_uniform_cpu(const at::Tensor& rng_state, int64_t num_subsequences, int64_t num_draws) {
  validate_rng_uniform(rng_state, num_subsequences, num_draws);
  auto out = at::empty({num_subsequences, num_draws}, rng_state.options().dtype(at::kFloat));
  const int64_t* state = rng_state.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t s = 0; s < num_subsequences; ++s)
    for (int64_t d = 0; d < num_draws; ++d)
      o[s * num_draws + d] = philox_uniform(state[0], state[1], static_cast<uint32_t>(s), static_cast<uint32_t>(d));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor(a!) rng_state, "
        "Tensor(b!)? probs_out) -> Tensor");
  m.def("verify(Tensor draft_tokens, Tensor draft_lens, Tensor? draft_probs, Tensor target_logits, "
        "Tensor temperature, Tensor top_k, Tensor top_p, Tensor(a!) rng_state) -> (Tensor, Tensor)");
  m.def("rng_uniform(Tensor rng_state, int num_subsequences, int num_draws) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("sample", &sample_cpu);
  m.impl("verify", &verify_cpu);
  m.impl("rng_uniform", &rng_uniform_cpu);
}

}  // namespace tandem_rt
