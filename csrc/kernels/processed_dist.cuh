// Device side of the processed sampling distribution (temperature, top-k, top-p), shared by the
// sample and verify kernels: one CTA handles one row of V logits with block-wide reductions,
// so V is unbounded (150k vocabularies stream through registers; nothing of size V is stored).
// Same token set as the CPU's ops/processed_dist_cpu.h: tokens ordered by logit descending, then
// index ascending; top-k keeps the first k, top-p the shortest prefix (inside the top-k set) whose
// mass reaches top_p times the top-k mass. The kept set is always an order prefix, represented by
// a pivot (key, idx): token j is kept iff key_j > key or (key_j == key and j <= idx).
// The pivot is found by a 4-pass radix select over the 32-bit order key (8 bits per pass, a
// 256-bin histogram of counts and masses), then the tie group at the pivot key is cut by index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common/sampling_common.h"

namespace tandem_rt::kernels {

// logits are read through sanitize_logit (common/sampling_common.h): non-finite values clamped
__device__ __forceinline__ float load_float(const float* p, int64_t i) { return sanitize_logit(p[i]); }
__device__ __forceinline__ float load_float(const __half* p, int64_t i) { return sanitize_logit(__half2float(p[i])); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, int64_t i) {
  return sanitize_logit(__bfloat162float(p[i]));
}

constexpr int kWarp = 32;

// Scratch shared by every block-wide helper below (one instance per CTA).
struct SamplingSmem {
  int hist_count[256];
  float hist_mass[256];
  float red_f[32];
  int red_i[32];
  unsigned long long red_u64[32];
  int found;
  int last;
  int chosen;
  int crossed;
};

template <int BLOCK>
__device__ float block_sum(float v, SamplingSmem& sm) {
  static_assert(BLOCK % kWarp == 0 && BLOCK <= 1024, "BLOCK must be a multiple of 32, at most 1024");
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % kWarp == 0) sm.red_f[threadIdx.x / kWarp] = v;
  __syncthreads();
  float s = 0.0f;
#pragma unroll
  for (int w = 0; w < BLOCK / kWarp; ++w) s += sm.red_f[w];
  __syncthreads();
  return s;
}

template <int BLOCK>
__device__ float block_max(float v, SamplingSmem& sm) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % kWarp == 0) sm.red_f[threadIdx.x / kWarp] = v;
  __syncthreads();
  float m = sm.red_f[0];
#pragma unroll
  for (int w = 1; w < BLOCK / kWarp; ++w) m = fmaxf(m, sm.red_f[w]);
  __syncthreads();
  return m;
}

template <int BLOCK>
__device__ unsigned long long block_max_u64(unsigned long long v, SamplingSmem& sm) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  if (threadIdx.x % kWarp == 0) sm.red_u64[threadIdx.x / kWarp] = v;
  __syncthreads();
  unsigned long long m = sm.red_u64[0];
#pragma unroll
  for (int w = 1; w < BLOCK / kWarp; ++w) m = sm.red_u64[w] > m ? sm.red_u64[w] : m;
  __syncthreads();
  return m;
}

// Lowest index of the largest logit. row: [V].
template <int BLOCK, typename T>
__device__ int block_argmax(const T* __restrict__ row, int V, SamplingSmem& sm) {
  unsigned long long best = 0;
  for (int j = threadIdx.x; j < V; j += BLOCK) {
    const unsigned long long packed =
        (static_cast<unsigned long long>(float_order_key(load_float(row, j))) << 32) | (~static_cast<uint32_t>(j));
    best = packed > best ? packed : best;
  }
  best = block_max_u64<BLOCK>(best, sm);
  return static_cast<int>(~static_cast<uint32_t>(best & 0xffffffffull));
}

// A prefix of the token order: token j is in it iff key_j > key or (key_j == key and j <= idx).
struct OrderPrefix {
  uint32_t key;
  int idx;
  __device__ __forceinline__ bool contains(uint32_t k, int j) const { return k > key || (k == key && j <= idx); }
};

// The processed distribution of one row (temperature > 0): p_j = kept(j) ? exp((l_j - m) / T) / sum : 0.
struct ProcessedDist {
  float temperature;
  float m;        // max_j l_j (sanitised)
  float sum;      // kept mass: sum over kept j of exp((l_j - m) / T)
  OrderPrefix kept;
  __device__ __forceinline__ float weight(float logit, int j) const {  // unnormalised
    return kept.contains(float_order_key(logit), j) ? __expf((logit - m) / temperature) : 0.0f;
  }
  __device__ __forceinline__ float prob(float logit, int j) const { return weight(logit, j) / sum; }
};

// Radix select of the order prefix inside `within`: by count (the first `target` tokens, target
// an integer >= 1) or by mass (the shortest prefix whose weight reaches `target`).
template <int BLOCK, bool BY_MASS, typename T>
__device__ OrderPrefix select_prefix(const T* __restrict__ row, int V, float temperature, float m, OrderPrefix within,
                                     float target, SamplingSmem& sm) {
  uint32_t prefix = 0, mask = 0;
  int count_above = 0;
  float mass_above = 0.0f;
  bool crossed = true;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += BLOCK) sm.hist_count[d] = 0, sm.hist_mass[d] = 0.0f;
    __syncthreads();
    for (int j = threadIdx.x; j < V; j += BLOCK) {
      const float l = load_float(row, j);
      const uint32_t k = float_order_key(l);
      if ((k & mask) != prefix || !within.contains(k, j)) continue;
      const int d = (k >> shift) & 255;
      atomicAdd(&sm.hist_count[d], 1);
      if (BY_MASS) atomicAdd(&sm.hist_mass[d], __expf((l - m) / temperature));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1, lowest = 0;
      for (int d = 255; d >= 0; --d) {
        const int c = sm.hist_count[d];
        if (c == 0) continue;
        lowest = d;
        const bool hit = crossed && (BY_MASS ? (mass_above + sm.hist_mass[d] >= target)
                                             : (static_cast<float>(count_above + c) >= target));
        if (hit) {
          chosen = d;
          break;
        }
        count_above += c;
        mass_above += sm.hist_mass[d];
      }
      if (chosen < 0) {  // rounding left the target unreached: take everything (lowest bin)
        chosen = lowest;
        count_above -= sm.hist_count[lowest];
        mass_above -= sm.hist_mass[lowest];
        crossed = false;
      }
      sm.chosen = chosen;
      sm.crossed = crossed ? 1 : 0;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sm.chosen) << shift;
    mask |= 255u << shift;
    crossed = sm.crossed != 0;
    __syncthreads();
  }
  // prefix is now the pivot key; thread 0 holds count_above/mass_above, hist_count[chosen] = ties.
  if (threadIdx.x == 0) {
    const int ties = sm.hist_count[sm.chosen];
    int r = ties;
    if (crossed) {
      if (BY_MASS) {
        const float e = __expf((float_from_order_key(prefix) - m) / temperature);
        const float need = (target - mass_above) / e;
        r = (e > 0.0f && need < static_cast<float>(ties)) ? max(1, static_cast<int>(ceilf(need))) : ties;
      } else {
        r = min(ties, max(1, static_cast<int>(target) - count_above));
      }
    }
    sm.found = r;   // tokens to keep from the tie group
    sm.last = ties;
  }
  __syncthreads();
  const int r = sm.found, ties = sm.last;
  __syncthreads();
  if (r >= ties) return OrderPrefix{prefix, prefix == within.key ? within.idx : V};
  // Keep the r lowest-index tokens of the tie group: find the index of its r-th member.
  int running = 0;
  if (threadIdx.x == 0) sm.found = V;
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int base = 0; base < V; base += BLOCK) {
    const int j = base + threadIdx.x;
    bool flag = false;
    if (j < V) {
      const uint32_t k = float_order_key(load_float(row, j));
      flag = k == prefix && within.contains(k, j);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) sm.red_i[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < BLOCK / kWarp; ++w) {
      before += w < warp ? sm.red_i[w] : 0;
      total += sm.red_i[w];
    }
    if (flag && running + before + __popc(ballot & ((1u << lane) - 1u)) + 1 == r) sm.found = j;
    running += total;
    __syncthreads();
    if (running >= r) break;
  }
  const int idx = sm.found;
  __syncthreads();
  return OrderPrefix{prefix, idx};
}

// Processed distribution of one row for temperature > 0 (all threads of the CTA call it).
template <int BLOCK, typename T>
__device__ ProcessedDist processed_dist(const T* __restrict__ row, int V, float temperature, int top_k, float top_p,
                                        SamplingSmem& sm) {
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < V; j += BLOCK) mx = fmaxf(mx, load_float(row, j));
  mx = block_max<BLOCK>(mx, sm);
  ProcessedDist d{temperature, mx, 0.0f, OrderPrefix{0u, V}};
  if (top_k > 0 && top_k < V) {
    d.kept = select_prefix<BLOCK, false>(row, V, temperature, d.m, d.kept, static_cast<float>(top_k), sm);
  }
  float s = 0.0f;
  for (int j = threadIdx.x; j < V; j += BLOCK) s += d.weight(load_float(row, j), j);
  d.sum = block_sum<BLOCK>(s, sm);
  if (top_p < 1.0f) {
    d.kept = select_prefix<BLOCK, true>(row, V, temperature, d.m, d.kept, top_p * d.sum, sm);
    s = 0.0f;
    for (int j = threadIdx.x; j < V; j += BLOCK) s += d.weight(load_float(row, j), j);
    d.sum = block_sum<BLOCK>(s, sm);
  }
  return d;
}

// Inverse-CDF draw over V weights given by w(j) >= 0: the first j whose inclusive running sum
// exceeds target (the last positive weight if rounding leaves target unreached). Same rule as
// cpu::sample_from_weights.
template <int BLOCK, typename WeightFn>
__device__ int block_draw(const WeightFn& w, int V, float target, SamplingSmem& sm) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (threadIdx.x == 0) sm.found = INT_MAX, sm.last = 0;
  __syncthreads();
  float running = 0.0f;
  for (int base = 0; base < V; base += BLOCK) {
    const int j = base + threadIdx.x;
    const float v = j < V ? w(j) : 0.0f;
    float incl = v;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const float up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane == kWarp - 1) sm.red_f[warp] = incl;
    __syncthreads();
    float before = 0.0f, total = 0.0f;
#pragma unroll
    for (int ww = 0; ww < BLOCK / kWarp; ++ww) {
      before += ww < warp ? sm.red_f[ww] : 0.0f;
      total += sm.red_f[ww];
    }
    if (v > 0.0f) {
      atomicMax(&sm.last, j);
      if (running + before + incl > target) atomicMin(&sm.found, j);
    }
    running += total;
    __syncthreads();
    if (sm.found != INT_MAX) break;
  }
  const int result = sm.found != INT_MAX ? sm.found : sm.last;
  __syncthreads();
  return result;
}

}  // namespace tandem_rt::kernels
