// CUDA dispatch for tandem_rt::sample, tandem_rt::verify and tandem_rt::rng_uniform (glue only:
// the kernels live in kernels/sampling.cu). No host synchronisation: argument values
// (temperature, top_k, top_p, draft_lens) are not inspected here; the kernels clamp them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/check.h"
#include "kernels/sampling.h"
#include "ops/sampling.h"

namespace tandem_rt {
namespace {

kernels::LogitDtype logit_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kernels::LogitDtype::kFloat32;
    case at::kHalf:
      return kernels::LogitDtype::kFloat16;
    case at::kBFloat16:
      return kernels::LogitDtype::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "unsupported logits dtype ", t.scalar_type());
  return kernels::LogitDtype::kFloat32;  // unreachable
}

at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, at::Tensor rng_state, std::optional<at::Tensor> probs_out) {
  validate_sample(logits, temperature, top_k, top_p, rng_state, probs_out);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), V = logits.size(1);
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto err = kernels::launch_sample(logits.data_ptr(), logit_dtype(logits), temperature.data_ptr<float>(),
                                    top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(), rng_state.data_ptr<int64_t>(),
                                    rng_state.dim() == 2 ? static_cast<int>(B) : 0, tokens.data_ptr<int64_t>(),
                                    probs_out.has_value() ? probs_out->data_ptr<float>() : nullptr,
                                    static_cast<int>(B), static_cast<int>(V), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sample kernel launch failed: ", cudaGetErrorString(err));
  return tokens;
}

std::tuple<at::Tensor, at::Tensor> verify_cuda(const at::Tensor& draft_tokens, const at::Tensor& draft_lens,
                                               const std::optional<at::Tensor>& draft_probs,
                                               const at::Tensor& target_logits, const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p,
                                               at::Tensor rng_state) {
  validate_verify(draft_tokens, draft_lens, draft_probs, target_logits, temperature, top_k, top_p, rng_state);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const int64_t B = target_logits.size(0), G = draft_tokens.size(1), V = target_logits.size(2);
  auto accepted = at::empty({B}, draft_lens.options());
  auto emitted = at::empty({B, G + 1}, draft_tokens.options());
  auto err = kernels::launch_verify(
      draft_tokens.data_ptr<int64_t>(), draft_lens.data_ptr<int32_t>(),
      draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr, target_logits.data_ptr(),
      logit_dtype(target_logits), temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
      rng_state.data_ptr<int64_t>(), rng_state.dim() == 2 ? static_cast<int>(B) : 0, accepted.data_ptr<int32_t>(), emitted.data_ptr<int64_t>(), static_cast<int>(B),
      static_cast<int>(G), static_cast<int>(V), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "verify kernel launch failed: ", cudaGetErrorString(err));
  return {accepted, emitted};
}

at::Tensor rng_uniform_cuda(const at::Tensor& rng_state, int64_t num_subsequences, int64_t num_draws) {
  validate_rng_uniform(rng_state, num_subsequences, num_draws);
  const c10::cuda::CUDAGuard guard(rng_state.device());
  auto out = at::empty({num_subsequences, num_draws}, rng_state.options().dtype(at::kFloat));
  auto err = kernels::launch_rng_uniform(rng_state.data_ptr<int64_t>(), out.data_ptr<float>(), num_subsequences,
                                         num_draws, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rng_uniform kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem_rt, CUDA, m) {
  m.impl("sample", &sample_cuda);
  m.impl("verify", &verify_cuda);
  m.impl("rng_uniform", &rng_uniform_cuda);
}

}  // namespace tandem_rt
