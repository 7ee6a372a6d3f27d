// Raw-pointer launchers for the sampling ops (no ATen: included by .cu and .cpp).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tandem_rt::kernels {

enum class LogitDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Samples one token per row from the processed distribution, then advances the random state.
//   logits:      [B, V] of `dtype`
//   temperature: [B] fp32 (<= 0: greedy argmax)
//   top_k:       [B] int32 (<= 0 or >= V: off)
//   top_p:       [B] fp32 (>= 1: off)
//   rng_state:   [2] int64 (seed, offset) shared by the rows (rng_rows = 0), or [B, 2] per row
//                (rng_rows = B; see row_rng_key); every offset += kRngOffsetStep on the device
//   tokens:      [B] int64 out
//   probs_out:   [B, V] fp32 out, or nullptr
cudaError_t launch_sample(const void* logits, LogitDtype dtype, const float* temperature, const int32_t* top_k,
                          const float* top_p, int64_t* rng_state, int rng_rows, int64_t* tokens, float* probs_out,
                          int B, int V, cudaStream_t stream);

// Speculative verification (greedy rows: temperature <= 0; others: rejection sampling), one CTA
// per row, then advances the random state.
//   draft_tokens:  [B, G] int64
//   draft_lens:    [B] int32 (clamped to [0, G])
//   draft_probs:   [B, G, V] fp32, or nullptr (greedy drafter: q one-hot at the draft token)
//   target_logits: [B, G + 1, V] of `dtype`
//   temperature, top_k, top_p: [B] as in launch_sample
//   rng_state:     [2] int64, or [B, 2] per row (rng_rows = B), as in launch_sample
//   accepted:      [B] int32 out
//   emitted:       [B, G + 1] int64 out (accepted drafts, one correction/bonus token, -1 padding)
cudaError_t launch_verify(const int64_t* draft_tokens, const int32_t* draft_lens, const float* draft_probs,
                          const void* target_logits, LogitDtype dtype, const float* temperature,
                          const int32_t* top_k, const float* top_p, int64_t* rng_state, int rng_rows,
                          int32_t* accepted, int64_t* emitted, int B, int G, int V, cudaStream_t stream);

// out[s, d] = philox_uniform(seed, offset, s, d); rng_state is not advanced.
//   rng_state: [2] int64; out: [num_subsequences, num_draws] fp32
cudaError_t launch_rng_uniform(const int64_t* rng_state, float* out, int64_t num_subsequences, int64_t num_draws,
                               cudaStream_t stream);

}  // namespace tandem_rt::kernels
