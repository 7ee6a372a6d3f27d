// Declarations shared by the sampling ops' CPU file and their CUDA glue.
#pragma once

#include "common/torch_headers.h"

#include <optional>

namespace tandem_rt {

// Shapes/dtypes/devices of sample(); see ops/sampling.cpp for the schema.
//   logits: [B, V] fp32/fp16/bf16; temperature fp32 [B]; top_k int32 [B]; top_p fp32 [B];
//   rng_state int64 [2]; probs_out fp32 [B, V] or none. All on logits' device, contiguous.
void validate_sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                     const at::Tensor& top_p, const at::Tensor& rng_state,
                     const std::optional<at::Tensor>& probs_out);

// draft_tokens int64 [B, G]; draft_lens int32 [B]; draft_probs fp32 [B, G, V] or none;
// target_logits [B, G+1, V] fp32/fp16/bf16; temperature/top_k/top_p as in sample; rng_state int64 [2].
void validate_verify(const at::Tensor& draft_tokens, const at::Tensor& draft_lens,
                     const std::optional<at::Tensor>& draft_probs, const at::Tensor& target_logits,
                     const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                     const at::Tensor& rng_state);

// rng_state int64 [2]; num_subsequences, num_draws >= 0.
void validate_rng_uniform(const at::Tensor& rng_state, int64_t num_subsequences, int64_t num_draws);

}  // namespace tandem_rt
