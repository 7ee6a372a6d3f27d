// Sampling and speculative-verification kernels: one CTA per batch row, block-wide reductions
// over the vocabulary (see processed_dist.cuh), random numbers from counter-based Philox read
// from a device-side (seed, offset) state that a follow-up single-thread kernel advances, so the
// launches never synchronise with the host and replay correctly inside a CUDA graph.
#include "kernels/processed_dist.cuh"
#include "kernels/sampling.h"

namespace tandem_rt::kernels {
namespace {

constexpr int kBlock = 512;

template <typename T>
struct KeptWeight {  // unnormalised processed distribution
  const T* row;      // [V]
  ProcessedDist d;
  __device__ float operator()(int j) const { return d.weight(load_float(row, j), j); }
};

template <typename T>
struct ResidualWeight {  // max(0, p - q)
  const T* row;          // [V]
  ProcessedDist d;
  const float* q;        // [V], or nullptr: one-hot at x
  int x;
  __device__ float operator()(int j) const {
    const float qj = q ? q[j] : (j == x ? 1.0f : 0.0f);
    return fmaxf(0.0f, d.prob(load_float(row, j), j) - qj);
  }
};

// grid: 1; block: 1. offset += kRngOffsetStep of the shared state (rng_rows == 0) or of every row.
__global__ void advance_rng_kernel(int64_t* __restrict__ rng_state,  // [2] or [rng_rows, 2]
                                   int rng_rows) {
  if (rng_rows == 0) rng_state[1] += kRngOffsetStep;
  for (int b = 0; b < rng_rows; ++b) rng_state[2 * b + 1] += kRngOffsetStep;
}

// grid: B; block: kBlock.
template <typename T>
__global__ void __launch_bounds__(kBlock) sample_kernel(const T* __restrict__ logits,          // [B, V]
                                                        const float* __restrict__ temperature,  // [B]
                                                        const int32_t* __restrict__ top_k,      // [B]
                                                        const float* __restrict__ top_p,        // [B]
                                                        const int64_t* __restrict__ rng_state,  // [2] or [B, 2]
                                                        int64_t* __restrict__ tokens,           // [B]
                                                        float* __restrict__ probs_out,          // [B, V] or null
                                                        int V, int rng_rows) {
  __shared__ SamplingSmem sm;
  const int b = blockIdx.x;
  const T* row = logits + static_cast<int64_t>(b) * V;
  float* out = probs_out ? probs_out + static_cast<int64_t>(b) * V : nullptr;
  const float t = temperature[b];
  if (!(t > 0.0f)) {
    const int a = block_argmax<kBlock>(row, V, sm);
    if (threadIdx.x == 0) tokens[b] = a;
    if (out)
      for (int j = threadIdx.x; j < V; j += kBlock) out[j] = j == a ? 1.0f : 0.0f;
    return;
  }
  const ProcessedDist d = processed_dist<kBlock>(row, V, t, top_k[b], top_p[b], sm);
  const float u = row_uniform(row_rng_key(rng_state, rng_rows, b), sample_draw_index());
  const int tok = block_draw<kBlock>(KeptWeight<T>{row, d}, V, u * d.sum, sm);
  if (threadIdx.x == 0) tokens[b] = tok;
  if (out)
    for (int j = threadIdx.x; j < V; j += kBlock) out[j] = d.prob(load_float(row, j), j);
}

// grid: B; block: kBlock.
template <typename T>
__global__ void __launch_bounds__(kBlock) verify_kernel(const int64_t* __restrict__ draft_tokens,  // [B, G]
                                                        const int32_t* __restrict__ draft_lens,    // [B]
                                                        const float* __restrict__ draft_probs,     // [B, G, V] or null
                                                        const T* __restrict__ target_logits,       // [B, G+1, V]
                                                        const float* __restrict__ temperature,     // [B]
                                                        const int32_t* __restrict__ top_k,         // [B]
                                                        const float* __restrict__ top_p,           // [B]
                                                        const int64_t* __restrict__ rng_state,     // [2] or [B, 2]
                                                        int32_t* __restrict__ accepted,            // [B]
                                                        int64_t* __restrict__ emitted,             // [B, G+1]
                                                        int G, int V, int rng_rows) {
  __shared__ SamplingSmem sm;
  const int b = blockIdx.x;
  const int len = min(max(draft_lens[b], 0), G);
  const int64_t* draft = draft_tokens + static_cast<int64_t>(b) * G;
  int64_t* out = emitted + static_cast<int64_t>(b) * (G + 1);
  for (int i = threadIdx.x; i <= G; i += kBlock) out[i] = -1;
  __syncthreads();
  const RowRngKey key = row_rng_key(rng_state, rng_rows, b);
  const float t = temperature[b];
  int acc = len;
  for (int i = 0; i <= len; ++i) {
    const T* row = target_logits + (static_cast<int64_t>(b) * (G + 1) + i) * V;
    if (!(t > 0.0f)) {  // greedy: longest prefix equal to the target's argmax, then its argmax
      const int a = block_argmax<kBlock>(row, V, sm);
      if (threadIdx.x == 0) out[i] = a;
      if (i < len && draft[i] == a) continue;
      acc = i;
      break;
    }
    const ProcessedDist d = processed_dist<kBlock>(row, V, t, top_k[b], top_p[b], sm);
    if (i == len) {  // every draft accepted: bonus token from p
      const float u = row_uniform(key, verify_emit_draw_index(i));
      const int tok = block_draw<kBlock>(KeptWeight<T>{row, d}, V, u * d.sum, sm);
      if (threadIdx.x == 0) out[i] = tok;
      acc = len;
      break;
    }
    const int64_t x = draft[i];
    const bool valid = x >= 0 && x < V;
    const float* q = draft_probs ? draft_probs + (static_cast<int64_t>(b) * G + i) * V : nullptr;
    const float px = valid ? d.prob(load_float(row, x), static_cast<int>(x)) : 0.0f;
    const float qx = q ? (valid ? q[x] : 0.0f) : 1.0f;
    if (valid && accept_draft(row_uniform(key, verify_accept_draw_index(i)), px, qx)) {
      if (threadIdx.x == 0) out[i] = x;
      continue;
    }
    // rejected: sample from normalise(max(0, p - q)), or from p if that has no mass
    const ResidualWeight<T> rw{row, d, q, valid ? static_cast<int>(x) : -1};
    float s = 0.0f;
    for (int j = threadIdx.x; j < V; j += kBlock) s += rw(j);
    const float residual = block_sum<kBlock>(s, sm);
    const float u = row_uniform(key, verify_emit_draw_index(i));
    const int tok = residual >= kResidualMinMass ? block_draw<kBlock>(rw, V, u * residual, sm)
                                                 : block_draw<kBlock>(KeptWeight<T>{row, d}, V, u * d.sum, sm);
    if (threadIdx.x == 0) out[i] = tok;
    acc = i;
    break;
  }
  if (threadIdx.x == 0) accepted[b] = acc;
}

// grid: ceil(num_subsequences * num_draws / 256); block: 256.
__global__ void rng_uniform_kernel(const int64_t* __restrict__ rng_state,  // [2]
                                   float* __restrict__ out,                 // [S, D]
                                   int64_t num_subsequences, int64_t num_draws) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= num_subsequences * num_draws) return;
  out[n] = philox_uniform(rng_state[0], rng_state[1], static_cast<uint32_t>(n / num_draws),
                          static_cast<uint32_t>(n % num_draws));
}

template <typename T>
cudaError_t sample_typed(const void* logits, const float* temperature, const int32_t* top_k, const float* top_p,
                         int64_t* rng_state, int rng_rows, int64_t* tokens, float* probs_out, int B, int V,
                         cudaStream_t stream) {
  if (B > 0) {
    sample_kernel<T><<<B, kBlock, 0, stream>>>(static_cast<const T*>(logits), temperature, top_k, top_p, rng_state,
                                               tokens, probs_out, V, rng_rows);
  }
  advance_rng_kernel<<<1, 1, 0, stream>>>(rng_state, rng_rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t verify_typed(const int64_t* draft_tokens, const int32_t* draft_lens, const float* draft_probs,
                         const void* target_logits, const float* temperature, const int32_t* top_k,
                         const float* top_p, int64_t* rng_state, int rng_rows, int32_t* accepted, int64_t* emitted,
                         int B, int G, int V, cudaStream_t stream) {
  if (B > 0) {
    verify_kernel<T><<<B, kBlock, 0, stream>>>(draft_tokens, draft_lens, draft_probs,
                                               static_cast<const T*>(target_logits), temperature, top_k, top_p,
                                               rng_state, accepted, emitted, G, V, rng_rows);
  }
  advance_rng_kernel<<<1, 1, 0, stream>>>(rng_state, rng_rows);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sample(const void* logits, LogitDtype dtype, const float* temperature, const int32_t* top_k,
                          const float* top_p, int64_t* rng_state, int rng_rows, int64_t* tokens, float* probs_out,
                          int B, int V, cudaStream_t stream) {
  switch (dtype) {
    case LogitDtype::kFloat32:
      return sample_typed<float>(logits, temperature, top_k, top_p, rng_state, rng_rows, tokens, probs_out, B, V, stream);
    case LogitDtype::kFloat16:
      return sample_typed<__half>(logits, temperature, top_k, top_p, rng_state, rng_rows, tokens, probs_out, B, V, stream);
    case LogitDtype::kBFloat16:
      return sample_typed<__nv_bfloat16>(logits, temperature, top_k, top_p, rng_state, rng_rows, tokens, probs_out,
                                         B, V, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_verify(const int64_t* draft_tokens, const int32_t* draft_lens, const float* draft_probs,
                          const void* target_logits, LogitDtype dtype, const float* temperature,
                          const int32_t* top_k, const float* top_p, int64_t* rng_state, int rng_rows,
                          int32_t* accepted, int64_t* emitted, int B, int G, int V, cudaStream_t stream) {
  switch (dtype) {
    case LogitDtype::kFloat32:
      return verify_typed<float>(draft_tokens, draft_lens, draft_probs, target_logits, temperature, top_k, top_p,
                                 rng_state, rng_rows, accepted, emitted, B, G, V, stream);
    case LogitDtype::kFloat16:
      return verify_typed<__half>(draft_tokens, draft_lens, draft_probs, target_logits, temperature, top_k, top_p,
                                  rng_state, rng_rows, accepted, emitted, B, G, V, stream);
    case LogitDtype::kBFloat16:
      return verify_typed<__nv_bfloat16>(draft_tokens, draft_lens, draft_probs, target_logits, temperature, top_k,
                                         top_p, rng_state, rng_rows, accepted, emitted, B, G, V, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_rng_uniform(const int64_t* rng_state, float* out, int64_t num_subsequences, int64_t num_draws,
                               cudaStream_t stream) {
  const int64_t n = num_subsequences * num_draws;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256;
  rng_uniform_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(rng_state, out, num_subsequences, num_draws);
  return cudaGetLastError();
}

}  // namespace tandem_rt::kernels
