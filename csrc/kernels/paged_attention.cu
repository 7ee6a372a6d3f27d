// Paged attention over the NHD cache: one kernel for decode (q_len 1) and verify blocks (ragged
// q_len up to 32, causal inside the block), GQA, optional split along the KV sequence with a
// second reduction pass.
//
// Work decomposition: one CTA (128 threads) per (KV head, row tile, sequence, KV split). Its query
// rows are the q_len x group (query token, query head of this KV head's GQA group) pairs, up to
// kRows per tile, so each K/V row is read from memory once per (sequence, KV head, split) whatever
// q_len and the group size are. Keys are processed in tiles of kTileKeys:
//   A. scores: lanes split head_dim into 16-byte vectors (kLanesPerKey lanes per key); every warp
//      scores kKeysPerWarp keys per step against all rows (Q in shared memory, fp32, pre-scaled by
//      scale * log2 e), shuffle-reduces, masks causally, stores S [rows, tile] in shared memory;
//   B. online softmax: one warp per row (exp2), rescale factor per row;
//   C. P V: each thread owns one 16-byte slice of head_dim for kRowsPerThread rows, streams the
//      V rows of the tile (16-byte loads) and accumulates in fp32 registers.
// With one split the CTA normalises and writes `out`; otherwise it writes unnormalised partials and
// (max, sum) per row, which paged_attention_combine_kernel merges.
// launch_paged_attention runs this kernel unless p.kernel selects the tensor-core kernel of
// paged_attention_mma.cu (fp16/bf16 only); the split choice and the combine are shared by both.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>

#include "kernels/paged_attention.h"
#include "kernels/kv_dtype_dispatch.cuh"
#include "kernels/paged_attention_cta.cuh"

namespace tandem_rt::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 32;       // query rows (q token x group head) per CTA
constexpr int kTileKeys = 64;   // keys per online-softmax step
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

// 16 bytes of T <-> fp32.
__device__ __forceinline__ void to_float(const uint4& raw, float (&f)[4]) {
  f[0] = __uint_as_float(raw.x);
  f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z);
  f[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void to_float(const uint4& raw, float (&f)[8], __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void to_float(const uint4& raw, float (&f)[8], __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

template <typename T>
struct VecTraits {
  static constexpr int kVec = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const uint4& raw, float (&f)[kVec]) { to_float(raw, f, T()); }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]);
};
template <>
struct VecTraits<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static void load(const uint4& raw, float (&f)[4]) { to_float(raw, f); }
  __device__ __forceinline__ static uint4 pack(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};
template <>
__device__ __forceinline__ uint4 VecTraits<__half>::pack(const float (&f)[8]) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  return raw;
}
template <>
__device__ __forceinline__ uint4 VecTraits<__nv_bfloat16>::pack(const float (&f)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return raw;
}

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// grid: (hkv * row_tiles, num_seqs, num_splits); block: kThreads.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(const PagedAttentionParams p) {
  using V = VecTraits<T>;
  constexpr int kVec = V::kVec;                        // elements per 16-byte vector
  constexpr int kLanesPerKey = D / kVec;               // lanes covering one key row
  static_assert(kLanesPerKey >= 1 && kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "head_dim/dtype unsupported");
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kKeysPerStep = kWarps * kKeysPerWarp;
  constexpr int kSteps = kTileKeys / kKeysPerStep;     // phase A steps per tile
  static_assert(kTileKeys % kKeysPerStep == 0, "tile must be a multiple of the keys per step");
  constexpr int kRowGroups = kThreads / kLanesPerKey;  // phase C: row groups
  constexpr int kRowsPerThread = (kRows + kRowGroups - 1) / kRowGroups;
  constexpr int kValueBatch = 8;                       // V rows loaded before use in phase C

  __shared__ __align__(16) float q_s[kRows][D];        // query rows, fp32, scaled by scale*log2(e)
  __shared__ float s_s[kRows][kTileKeys];              // scores, then probabilities
  __shared__ float m_s[kRows], l_s[kRows], alpha_s[kRows];
  __shared__ int limit_s[kRows];                       // exclusive key bound per row (causal)

  const CtaWork w = cta_work<kRows, D, T>(p);
  if (w.rows == 0) return;
  const int kvh = w.kvh, split = w.split, group = w.group, q0 = w.q0, q_len = w.q_len;
  const int r0 = w.r0, rows = w.rows, seq = w.seq, k_begin = w.k_begin, k_end = w.k_end;
  const int32_t* bt = w.bt;  // [max_pages]
  const int64_t slot_bytes = w.slot_bytes, head_bytes = w.head_bytes;
  const T* q = static_cast<const T*>(p.q);
  const char* k_cache = static_cast<const char*>(p.k_cache);
  const char* v_cache = static_cast<const char*>(p.v_cache);
  const float qscale = p.scale * kLog2e;

  // Query rows -> shared memory (row r = t * group + g within the sequence).
  for (int idx = threadIdx.x; idx < rows * kLanesPerKey; idx += kThreads) {
    const int r = idx / kLanesPerKey, c = idx % kLanesPerKey;
    const int gr = r0 + r;
    const int t = gr / group, g = gr % group;
    const T* src = q + static_cast<int64_t>(q0 + t) * p.q_stride + static_cast<int64_t>(kvh * group + g) * D + c * kVec;
    float f[kVec];
    V::load(load16(src), f);
#pragma unroll
    for (int e = 0; e < kVec; ++e) q_s[r][c * kVec + e] = f[e] * qscale;
  }
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    m_s[r] = kNegInf;
    l_s[r] = 0.f;
    limit_s[r] = r < rows ? seq - q_len + (r0 + r) / group + 1 : 0;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int key_in_warp = lane / kLanesPerKey, dl = lane % kLanesPerKey;  // phase A mapping
  const int rg = threadIdx.x / kLanesPerKey, dc = threadIdx.x % kLanesPerKey;  // phase C mapping

  float acc[kRowsPerThread][kVec];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[i][e] = 0.f;

  for (int t0 = k_begin; t0 < k_end; t0 += kTileKeys) {
    const int n = min(kTileKeys, k_end - t0);
    // ---- A: scores -------------------------------------------------------------------------
    uint4 kraw[kSteps];
    bool kvalid[kSteps];  // key inside the tile and on a valid page (others are masked)
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int j = s * kKeysPerStep + warp * kKeysPerWarp + key_in_warp;
      kraw[s] = make_uint4(0u, 0u, 0u, 0u);
      kvalid[s] = false;
      if (j < n) {
        const int key = t0 + j;
        const int page = bt[key / p.page_size];
        if (page >= 0 && page < p.num_pages) {
          const int64_t off = (static_cast<int64_t>(page) * p.page_size + key % p.page_size) * slot_bytes + head_bytes;
          kraw[s] = load16(k_cache + off + dl * 16);
          kvalid[s] = true;
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int j = s * kKeysPerStep + warp * kKeysPerWarp + key_in_warp;
      float kf[kVec];
      V::load(kraw[s], kf);
      for (int r = 0; r < rows; ++r) {
        const float4* qv = reinterpret_cast<const float4*>(&q_s[r][dl * kVec]);
        float dot = 0.f;
#pragma unroll
        for (int e4 = 0; e4 < kVec / 4; ++e4) {
          const float4 qq = qv[e4];
          dot += qq.x * kf[4 * e4] + qq.y * kf[4 * e4 + 1] + qq.z * kf[4 * e4 + 2] + qq.w * kf[4 * e4 + 3];
        }
#pragma unroll
        for (int off = kLanesPerKey / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (dl == 0) s_s[r][j] = (kvalid[s] && t0 + j < limit_s[r]) ? dot : kNegInf;
      }
    }
    __syncthreads();
    // ---- B: online softmax, one warp per row ------------------------------------------------
    for (int r = warp; r < rows; r += kWarps) {
      float mx = kNegInf;
      for (int j = lane; j < kTileKeys; j += 32) mx = fmaxf(mx, s_s[r][j]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      float sum = 0.f;
      for (int j = lane; j < kTileKeys; j += 32) {
        const float pj = exp2f(s_s[r][j] - m_use);
        s_s[r][j] = pj;
        sum += pj;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
    // ---- C: acc = acc * alpha + P V ----------------------------------------------------------
    if (rg < rows) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = rg + i * kRowGroups;
        if (r < rows) {
          const float alpha = alpha_s[r];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[i][e] *= alpha;
        }
      }
      for (int j0 = 0; j0 < n; j0 += kValueBatch) {
        uint4 vraw[kValueBatch];
#pragma unroll
        for (int u = 0; u < kValueBatch; ++u) {
          const int j = j0 + u;
          vraw[u] = make_uint4(0u, 0u, 0u, 0u);
          if (j < n) {
            const int key = t0 + j;
            const int page = bt[key / p.page_size];
            if (page >= 0 && page < p.num_pages) {
              const int64_t off =
                  (static_cast<int64_t>(page) * p.page_size + key % p.page_size) * slot_bytes + head_bytes;
              vraw[u] = load16(v_cache + off + dc * 16);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kValueBatch; ++u) {
          const int j = j0 + u;
          if (j < n) {
            float vf[kVec];
            V::load(vraw[u], vf);
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i) {
              const int r = rg + i * kRowGroups;
              if (r < rows) {
                const float pj = s_s[r][j];
#pragma unroll
                for (int e = 0; e < kVec; ++e) acc[i][e] = fmaf(pj, vf[e], acc[i][e]);
              }
            }
          }
        }
      }
    }
    __syncthreads();
  }

  // ---- epilogue ------------------------------------------------------------------------------
  if (rg >= rows) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = rg + i * kRowGroups;
    if (r >= rows) continue;
    const int gr = r0 + r;
    const int64_t row = static_cast<int64_t>(q0 + gr / group) * p.hq + kvh * group + gr % group;
    if (p.num_splits == 1) {
      const float l = l_s[r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float o[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) o[e] = acc[i][e] * inv;
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row * D + dc * kVec) = V::pack(o);
    } else {
      const int64_t prow = static_cast<int64_t>(split) * p.ntok * p.hq + row;
      float4* dst = reinterpret_cast<float4*>(p.part_out + prow * D + dc * kVec);
#pragma unroll
      for (int e4 = 0; e4 < kVec / 4; ++e4)
        dst[e4] = make_float4(acc[i][4 * e4], acc[i][4 * e4 + 1], acc[i][4 * e4 + 2], acc[i][4 * e4 + 3]);
      if (dc == 0) {
        p.part_ml[prow * 2] = m_s[r];
        p.part_ml[prow * 2 + 1] = l_s[r];
      }
    }
  }
}

// grid: (ntok, hq); block: D threads. Merges the per-split partials of one output row.
template <typename T, int D>
__global__ void __launch_bounds__(D) paged_attention_combine_kernel(const PagedAttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * p.hq + blockIdx.y;
  const int64_t split_stride = static_cast<int64_t>(p.ntok) * p.hq;
  float m_max = kNegInf;
  for (int s = 0; s < p.num_splits; ++s) m_max = fmaxf(m_max, p.part_ml[(s * split_stride + row) * 2]);
  const float m_use = m_max == kNegInf ? 0.f : m_max;
  float denom = 0.f, o = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t prow = s * split_stride + row;
    const float w = exp2f(p.part_ml[prow * 2] - m_use);  // 0 for an empty split (max = -inf)
    denom += w * p.part_ml[prow * 2 + 1];
    o += w * p.part_out[prow * D + threadIdx.x];
  }
  const float v = denom > 0.f ? o / denom : 0.f;
  T* out = static_cast<T*>(p.out) + row * D + threadIdx.x;
  if constexpr (std::is_same_v<T, float>) {
    *out = v;
  } else if constexpr (std::is_same_v<T, __half>) {
    *out = __float2half_rn(v);
  } else {
    *out = __float2bfloat16_rn(v);
  }
}

template <typename T, int D>
cudaError_t launch_dim(const PagedAttentionParams& p, cudaStream_t stream) {
  cudaError_t err;
  if (!std::is_same_v<T, float> && p.kernel == kPagedAttentionMma) {
    err = launch_paged_attention_mma(p, stream);  // tensor-core kernel (paged_attention_mma.cu)
  } else {
    const int group = p.hq / p.hkv;
    const int row_tiles = (p.max_q_len * group + kRows - 1) / kRows;
    const dim3 grid(p.hkv * row_tiles, p.num_seqs, p.num_splits);
    paged_attention_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  paged_attention_combine_kernel<T, D><<<dim3(p.ntok, p.hq), D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const PagedAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch_dim<T, 32>(p, stream);
    case 64: return launch_dim<T, 64>(p, stream);
    case 128: return launch_dim<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) return 132;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 132;
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace

bool paged_attention_head_dim_supported(int head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

// The split aims for `waves` CTA waves (each CTA keeps only a few loads in flight, so the chip needs
// many CTAs resident to cover memory latency).
int paged_attention_splits(int device, int num_seqs, int hq, int hkv, int max_q_len, int max_seq_len, int waves,
                           int* split_len) {
  const int group = hq / hkv;
  const int row_tiles = std::max(1, (max_q_len * group + kRows - 1) / kRows);
  const int64_t ctas = std::max<int64_t>(1, static_cast<int64_t>(num_seqs) * hkv * row_tiles);
  const int target = (waves > 0 ? waves : kPagedAttentionDefaultWaves) * sm_count(device);
  int splits = 1;
  if (ctas < target) splits = static_cast<int>((target + ctas - 1) / ctas);
  splits = std::min({splits, std::max(1, (max_seq_len + 255) / 256), kMaxSplits});  // >= 256 keys per split
  const int keys = std::max(max_seq_len, 1);
  *split_len = ((keys + splits - 1) / splits + kTileKeys - 1) / kTileKeys * kTileKeys;
  return (keys + *split_len - 1) / *split_len;
}

cudaError_t launch_paged_attention(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.ntok == 0 || p.num_seqs == 0 || p.max_q_len == 0) return cudaSuccess;
  return dispatch_kv_dtype(p.dtype, [&](auto tag) { return launch_typed<decltype(tag)>(p, stream); });
}

}  // namespace tandem_rt::kernels
