// Paged attention on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate) with cp.async
// double buffering of the K/V tiles. Same semantics, grid, KV split and partial-result layout as the
// SIMT kernel in paged_attention.cu (whose combine kernel merges our split partials); selected with
// PagedAttentionParams::kernel == kPagedAttentionMma (the op's kernel=1: paged_attention(kernel="mma")).
//
// Work decomposition. One CTA of 128 threads (4 warps) per (KV head, row tile, sequence, KV split),
// grid (hkv * row_tiles, num_seqs, num_splits) exactly like the SIMT kernel. The CTA's rows are the
// q_len x group (query token t, GQA head g) pairs of its KV head, row r = t * group + g, starting at
// r0 = tile * 16 * MT. MT (m16 row tiles per CTA) is 1 when max_q_len * group <= 16 (then there is a
// single row tile) and 2 otherwise (32-row tiles, the SIMT kernel's tile, so paged_attention_splits
// sees the same CTA count).
//
// Warps: warp w owns m-tile mt = w / KG and key group kg = w % KG, KG = 4 / MT. Per CTA iteration a
// tile of 64 keys is in shared memory; warp w scores and accumulates its KW = 64 / KG contiguous keys
// of the tile (16 keys for MT = 1, 32 for MT = 2) against its 16 rows, with its own online softmax
// state; the KG partial results of an m-tile are merged once, in the epilogue.
//
//   S = Q K^T : A = Q [16 x 16] per k16 step (ldmatrix.x4 from shared), B = K^T (ldmatrix.x4 of the
//               K rows, not transposed: a K row is a column of B), C = fp32 scores [16 x 8] per n8
//               key tile, scaled by scale * log2(e) (softmax in base 2, exp2f).
//   O += P V  : A = P [16 x 16 keys], built in registers from two adjacent score C tiles (see
//               below), B = V [16 keys x 8 dims] via ldmatrix.x4.trans, C = O [16 x 8] per n8 dim
//               tile, fp32, held in registers for the whole split (D / 8 tiles x 4 floats).
//
// mma.m16n8k16 fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4 * gid + tig
// (gid = lane / 4 in 0..7, tig = lane % 4):
//   A (16 x 16, row major), 4 x .b32 each holding 2 consecutive-column elements:
//       a0 = (row gid,     cols 2 tig, 2 tig + 1)    a1 = (row gid + 8, cols 2 tig, 2 tig + 1)
//       a2 = (row gid, cols 2 tig + 8, 2 tig + 9)    a3 = (row gid + 8, cols 2 tig + 8, 2 tig + 9)
//   B (16 x 8, "col"): b0 = (rows 2 tig, 2 tig + 1; col gid)   b1 = (rows 2 tig + 8, 2 tig + 9; col gid)
//   C (16 x 8 fp32):   c0, c1 = (row gid, cols 2 tig, 2 tig + 1)   c2, c3 = (row gid + 8, same cols)
// ldmatrix.x4: lanes 8i..8i+7 give the addresses of rows 0..7 of 8x8 matrix i (16 bytes each);
//   register i of every lane then holds (row lane / 4, elements 2 (lane % 4), +1) of matrix i, or,
//   with .trans, the same position of the transposed matrix.
//
// Shared memory tiles ([rows][D] of T, D / 8 16-byte chunks per row) are XOR-swizzled so that the
// 8 row addresses of every ldmatrix matrix (8 consecutive rows, same logical chunk) fall in 8
// different 16-byte bank groups (see swizzle_chunk).
//
// Pipeline (2 stages): the prologue issues the Q tile and K/V tile 0 with cp.async; iteration i
// waits for its own copies (cp.async.wait_group 0), __syncthreads() (makes every thread's copies
// visible), then issues tile i + 1 into the other stage and computes tile i. The stage being
// overwritten, (i + 1) % 2, was last read while computing tile i - 1, and every warp has finished
// that computation before it reached the barrier of iteration i, so no read of it is outstanding;
// the 0/1 validity flags of the keys follow the same rule. Loads of tile i + 1 are in flight during
// the compute of tile i (with several CTAs per SM covering the rest of the latency).
//
// Inline PTX (cp.async, ldmatrix, mma.sync, the dynamic shared-memory declaration) is in mma_ptx.cuh. The
// host emulator (csrc/emulation/) defines TANDEM_RT_MMA_EMULATION and provides its own versions of
// those helpers before including this header, so that it runs this very kernel source on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/paged_attention.h"
#include "kernels/paged_attention_cta.cuh"
#ifndef TANDEM_RT_MMA_EMULATION
#include "kernels/mma_ptx.cuh"
#endif

namespace tandem_rt::kernels {
namespace {

constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / 32;
constexpr int kMmaTileKeys = 64;  // keys per CTA iteration (the split length is a multiple of it)
constexpr int kStages = 2;        // K/V shared-memory stages (double buffering)
constexpr int kOPad = 8;          // fp32 padding per row of the epilogue O slices (bank spread)
constexpr float kLog2eMma = 1.4426950408889634f;
constexpr float kNegInfMma = -__builtin_huge_valf();

// Two fp32 -> one .b32 of two T, `lo` in the low half (the lower column index of a fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// 8 fp32 -> 16 bytes of T.
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
}

// ---- shared-memory tile swizzle ----------------------------------------------------------------
// A tile row of D b16 elements is C = D / 8 16-byte chunks; logical chunk c of row j is stored at
// chunk position c ^ ((j / max(1, 8 / C)) & (min(C, 8) - 1)) of the row. ldmatrix reads, per 8x8
// matrix, one chunk c from 8 consecutive rows j0..j0+7 (j0 a multiple of 8); a 128-byte bank line
// holds 8 chunks, and the bank group of (j, c) is (j * C + swizzled c) mod 8:
//   C = 4  (D = 32, 2 rows per line):  4 (j % 2) + (c ^ ((j / 2) % 4))  -> (j % 2, j / 2 % 4) distinct
//   C = 8  (D = 64, 1 row per line):   c ^ (j % 8)                     -> distinct
//   C = 16 (D = 128, 2 lines per row): (c % 8) ^ (j % 8)               -> distinct
// so each matrix is one conflict-free wavefront. The XOR only permutes chunks inside a row (and for
// C = 16 inside its 128-byte half). cp.async writes use the same mapping.
template <int D>
__device__ __forceinline__ int swizzle_chunk(int row, int chunk) {
  constexpr int C = D / 8;
  constexpr int kRowDiv = C >= 8 ? 1 : 8 / C;
  constexpr int kMask = (C < 8 ? C : 8) - 1;
  return chunk ^ ((row / kRowDiv) & kMask);
}
// Byte offset of (row, logical chunk) in a swizzled [rows][D] b16 tile.
template <int D>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * (D / 8) + swizzle_chunk<D>(row, chunk)) * 16u;
}

template <typename T, int D, int MT>
struct MmaConfig {
  static_assert(sizeof(T) == 2, "tensor-core path is fp16/bf16 only");
  static_assert(D == 32 || D == 64 || D == 128, "head_dim must be 32, 64 or 128");
  static_assert(MT == 1 || MT == 2, "MT is 1 or 2 m16 row tiles");
  static constexpr int kChunks = D / 8;                       // 16-byte chunks per row
  static constexpr int kRows = 16 * MT;                       // query rows per CTA
  static constexpr int kKeyGroups = kMmaWarps / MT;           // KG: warps sharing an m-tile
  static constexpr int kWarpKeys = kMmaTileKeys / kKeyGroups; // KW: keys per warp per tile
  static constexpr int kScoreTiles = kWarpKeys / 8;           // NT: n8 score tiles per warp
  static constexpr int kPvSteps = kWarpKeys / 16;             // k16 steps of P V per warp
  static constexpr int kDimTiles = D / 8;                     // n8 output tiles
  static constexpr int kQBytes = kRows * D * 2;               // q_s
  static constexpr int kTileBytes = kMmaTileKeys * D * 2;     // one stage of K (or V)
  static constexpr int kLoadsPerThread = kMmaTileKeys * kChunks / kMmaThreads;  // per tensor per tile
  static constexpr int kKeysPerPass = kMmaThreads / kChunks;  // key rows one loader pass covers
  static constexpr int kOStride = D + kOPad;                  // fp32 row stride of the O slices
  // Dynamic shared memory: q_s | k_s [kStages] | v_s [kStages] | ok_s [kStages][64].
  static constexpr int kKvOffset = kQBytes;
  static constexpr int kOkOffset = kQBytes + 2 * kStages * kTileBytes;
  static constexpr int kSmemBytes = kOkOffset + kStages * kMmaTileKeys;
  // Epilogue, over k_s / v_s: o_s float [4 warps][16][kOStride], ml_s float [4 warps][16][2].
  static constexpr int kEpilogueBytes = (kMmaWarps * 16 * kOStride + kMmaWarps * 16 * 2) * 4;
  static_assert(kEpilogueBytes <= 2 * kStages * kTileBytes, "epilogue must fit in the K/V buffers");
  static_assert(kLoadsPerThread * kMmaThreads == kMmaTileKeys * kChunks, "loader covers the tile exactly");
  static_assert(kScoreTiles % 2 == 0, "score tiles pair up into k16 steps");
};

// grid: (hkv * row_tiles, num_seqs, num_splits); block: kMmaThreads; dynamic shared memory:
// MmaConfig<T, D, MT>::kSmemBytes.
template <typename T, int D, int MT>
__global__ void __launch_bounds__(kMmaThreads) paged_attention_mma_kernel(const PagedAttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async and bf16 mma need sm_80; the launcher refuses older devices.
#else
  using Cfg = MmaConfig<T, D, MT>;
  constexpr int C = Cfg::kChunks;
  constexpr int KG = Cfg::kKeyGroups;
  constexpr int KW = Cfg::kWarpKeys;
  constexpr int NT = Cfg::kScoreTiles;
  constexpr int DT = Cfg::kDimTiles;

  TANDEM_RT_MMA_DYNAMIC_SMEM(smem);  // unsigned char [Cfg::kSmemBytes], 16-byte aligned
  // q_s: T [kRows][D] swizzled (rows past the CTA's real rows are zero)
  const uint32_t q_s = smem_addr(smem);
  // k_s / v_s: T [kStages][64 keys][D] swizzled (keys not loaded are zero)
  const uint32_t k_s = q_s + Cfg::kKvOffset;
  const uint32_t v_s = k_s + kStages * Cfg::kTileBytes;
  // ok_s: uint8 [kStages][64]: 1 = key inside the split's range and on a valid page
  unsigned char* ok_s = smem + Cfg::kOkOffset;

  const CtaWork w = cta_work<Cfg::kRows, D, T>(p);
  if (w.rows == 0) return;  // CTA-uniform: no barrier skipped by only part of the CTA
  const int kvh = w.kvh, split = w.split, group = w.group, q0 = w.q0, q_len = w.q_len;
  const int r0 = w.r0, rows = w.rows, seq = w.seq, k_begin = w.k_begin, k_end = w.k_end;
  const int32_t* bt = w.bt;  // [max_pages]
  const int64_t slot_bytes = w.slot_bytes, head_bytes = w.head_bytes;
  const T* q = static_cast<const T*>(p.q);                        // [ntok, hq, D], row stride q_stride
  const char* k_cache = static_cast<const char*>(p.k_cache);      // [num_pages, page_size, hkv, D]
  const char* v_cache = static_cast<const char*>(p.v_cache);      // [num_pages, page_size, hkv, D]

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int mt = warp / KG, kg = warp % KG;  // this warp's m-tile and key group
  const int gid = lane >> 2, tig = lane & 3;  // fragment row / column-pair index

  // Loader mapping: thread copies chunk ld_c of key rows ld_j + i * kKeysPerPass, K and V.
  const int ld_c = tid % C, ld_j = tid / C;
  auto load_tile = [&](int stage, int t0) {
#pragma unroll
    for (int i = 0; i < Cfg::kLoadsPerThread; ++i) {
      const int j = ld_j + i * Cfg::kKeysPerPass;
      const int key = t0 + j;
      bool ok = false;
      int64_t off = 0;
      if (key < k_end) {
        const int page = bt[key / p.page_size];
        if (page >= 0 && page < p.num_pages) {
          ok = true;
          off = (static_cast<int64_t>(page) * p.page_size + key % p.page_size) * slot_bytes + head_bytes + ld_c * 16;
        }
      }
      const uint32_t dst = stage * Cfg::kTileBytes + tile_offset<D>(j, ld_c);
      cp_async_16(k_s + dst, k_cache + off, ok);
      cp_async_16(v_s + dst, v_cache + off, ok);
      if (ld_c == 0) ok_s[stage * kMmaTileKeys + j] = ok ? 1 : 0;
    }
  };

  // Causal bound (exclusive) of the two fragment rows this thread holds (gid, gid + 8 of its
  // m-tile); 0 for rows beyond the CTA's rows, which masks them completely.
  int limit[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = mt * 16 + gid + 8 * h;
    limit[h] = r < rows ? seq - q_len + (r0 + r) / group + 1 : 0;
  }
  const bool warp_has_rows = mt * 16 < rows;

  float o[DT][4];  // O accumulator: C fragments of the 16 x D output of this warp's m-tile
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  float m_run[2] = {kNegInfMma, kNegInfMma};  // running max (log2 units) of rows gid, gid + 8
  float l_run[2] = {0.f, 0.f};                // this thread's share of the running sums (quad-reduced at the end)
  const float qk_scale = p.scale * kLog2eMma;

  if (k_begin < k_end) {
    // ---- prologue: Q tile and K/V tile 0 ------------------------------------------------------
    for (int idx = tid; idx < Cfg::kRows * C; idx += kMmaThreads) {
      const int r = idx / C, c = idx % C;
      const bool ok = r < rows;
      const T* src = q;
      if (ok) {
        const int gr = r0 + r;
        src = q + static_cast<int64_t>(q0 + gr / group) * p.q_stride + static_cast<int64_t>(kvh * group + gr % group) * D +
              c * 8;
      }
      cp_async_16(q_s + tile_offset<D>(r, c), src, ok);
    }
    load_tile(0, k_begin);
    cp_async_commit();

    int stage = 0;
    for (int t0 = k_begin; t0 < k_end; t0 += kMmaTileKeys, stage ^= 1) {
      cp_async_wait_all();  // this thread's copies of tile t0 (and Q) have landed
      __syncthreads();      // everyone's have; and everyone is done with stage ^ 1 (tile t0 - 64)
      if (t0 + kMmaTileKeys < k_end) load_tile(stage ^ 1, t0 + kMmaTileKeys);
      cp_async_commit();

      // Warp-uniform skip: no real row in this m-tile, or all of this warp's keys past the range.
      if (!warp_has_rows || t0 + kg * KW >= k_end) continue;

      const uint32_t ks = k_s + stage * Cfg::kTileBytes;
      const uint32_t vs = v_s + stage * Cfg::kTileBytes;
      const unsigned char* ok_tile = ok_s + stage * kMmaTileKeys;

      // ---- S = Q K^T over this warp's KW keys: NT n8 tiles of 16 x 8 fp32 ---------------------
      float s[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        // A = Q[mt*16 .. +15][16 kk .. +15]: lane addresses row lane % 16, chunk 2 kk + lane / 16
        // (matrices: rows 0-7 / 8-15 x dims 0-7, then dims 8-15 -> a0, a1, a2, a3).
        uint32_t a[4];
        ldmatrix_x4(a, q_s + tile_offset<D>(mt * 16 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          // B = K^T for keys kg*KW + 16 np .. +15: matrix i = lane / 8 is key rows (i / 2) * 8 .. +7,
          // dim chunk 2 kk + i % 2 -> r0, r1 = b0, b1 of key tile 2 np; r2, r3 = of key tile 2 np + 1.
          const int i = lane >> 3;
          uint32_t kb[4];
          ldmatrix_x4(kb, ks + tile_offset<D>(kg * KW + np * 16 + (i >> 1) * 8 + (lane & 7), 2 * kk + (i & 1)));
          mma_16816<T>(s[2 * np], a, kb[0], kb[1]);
          mma_16816<T>(s[2 * np + 1], a, kb[2], kb[3]);
        }
      }

      // ---- scale, mask, online softmax (rows gid: s[.][0..1], gid + 8: s[.][2..3]) --------------
      float mx[2] = {kNegInfMma, kNegInfMma};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int j = kg * KW + nt * 8 + 2 * tig;  // key (in the tile) of columns c0 / c2
        const uchar2 ok = *reinterpret_cast<const uchar2*>(ok_tile + j);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = t0 + j + e;
          const bool key_ok = (e == 0 ? ok.x : ok.y) != 0;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float v = (key_ok && key < limit[h]) ? s[nt][2 * h + e] * qk_scale : kNegInfMma;
            s[nt][2 * h + e] = v;
            mx[h] = fmaxf(mx[h], v);
          }
        }
      }
      float alpha[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // the quad (4 lanes of one gid) holds the row's 2 * NT columns of this warp
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m_run[h], mx[h]);
        m_use[h] = m_new == kNegInfMma ? 0.f : m_new;  // fully masked row so far: p = 0, alpha = 0, no NaN
        alpha[h] = exp2f(m_run[h] - m_use[h]);
        m_run[h] = m_new;
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = exp2f(s[nt][e] - m_use[e >> 1]);
          s[nt][e] = pe;
          sum[e >> 1] += pe;
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + sum[h];
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
      }

      // ---- O += P V ------------------------------------------------------------------------------
#pragma unroll
      for (int st = 0; st < Cfg::kPvSteps; ++st) {
        // A = P[16 rows][keys 16 st .. +15] from score tiles 2 st (keys 0-7) and 2 st + 1 (keys 8-15):
        // a0 = tile0 (c0, c1), a1 = tile0 (c2, c3), a2 = tile1 (c0, c1), a3 = tile1 (c2, c3).
        const uint32_t a[4] = {pack2<T>(s[2 * st][0], s[2 * st][1]), pack2<T>(s[2 * st][2], s[2 * st][3]),
                               pack2<T>(s[2 * st + 1][0], s[2 * st + 1][1]),
                               pack2<T>(s[2 * st + 1][2], s[2 * st + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          // B = V[keys][dims 16 dp .. +15] with .trans: matrix i = lane / 8 is key rows
          // kg*KW + 16 st + (i % 2) * 8 .. +7, dim chunk 2 dp + i / 2 -> r0, r1 = b0, b1 of dim tile
          // 2 dp; r2, r3 = of dim tile 2 dp + 1.
          const int i = lane >> 3;
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, vs + tile_offset<D>(kg * KW + st * 16 + (i & 1) * 8 + (lane & 7), 2 * dp + (i >> 1)));
          mma_16816<T>(o[2 * dp], a, vb[0], vb[1]);
          mma_16816<T>(o[2 * dp + 1], a, vb[2], vb[3]);
        }
      }
    }
  }

  // ---- epilogue: merge the KG key groups of each m-tile, write the CTA's rows -------------------
  cp_async_wait_all();  // no copy may still target the K/V buffers we are about to reuse
  __syncthreads();      // and no warp still reads them
  // o_s: float [4 warps][16][kOStride] (unnormalised O of each warp); ml_s: float [4 warps][16][2]
  float* o_s = reinterpret_cast<float*>(smem + Cfg::kKvOffset);
  float* ml_s = o_s + kMmaWarps * 16 * Cfg::kOStride;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  float* o_w = o_s + warp * 16 * Cfg::kOStride;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    *reinterpret_cast<float2*>(o_w + gid * Cfg::kOStride + dt * 8 + 2 * tig) = make_float2(o[dt][0], o[dt][1]);
    *reinterpret_cast<float2*>(o_w + (gid + 8) * Cfg::kOStride + dt * 8 + 2 * tig) = make_float2(o[dt][2], o[dt][3]);
  }
  if (tig == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ml_s[(warp * 16 + gid + 8 * h) * 2] = m_run[h];
      ml_s[(warp * 16 + gid + 8 * h) * 2 + 1] = l_run[h];
    }
  }
  __syncthreads();

  for (int idx = tid; idx < rows * C; idx += kMmaThreads) {
    const int r = idx / C, c = idx % C;  // CTA row, 8-element chunk of D
    const int rm = r >> 4, rr = r & 15;  // its m-tile and row inside it
    float m_tot = kNegInfMma;
#pragma unroll
    for (int g = 0; g < KG; ++g) m_tot = fmaxf(m_tot, ml_s[((rm * KG + g) * 16 + rr) * 2]);
    const float m_use = m_tot == kNegInfMma ? 0.f : m_tot;
    float l_tot = 0.f;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
    for (int g = 0; g < KG; ++g) {
      const int w = rm * KG + g;
      const float scale_w = exp2f(ml_s[(w * 16 + rr) * 2] - m_use);  // 0 for a warp that saw no key
      l_tot += scale_w * ml_s[(w * 16 + rr) * 2 + 1];
      const float4* src = reinterpret_cast<const float4*>(o_s + (w * 16 + rr) * Cfg::kOStride + c * 8);
      const float4 x = src[0], y = src[1];
      acc[0] += scale_w * x.x;
      acc[1] += scale_w * x.y;
      acc[2] += scale_w * x.z;
      acc[3] += scale_w * x.w;
      acc[4] += scale_w * y.x;
      acc[5] += scale_w * y.y;
      acc[6] += scale_w * y.z;
      acc[7] += scale_w * y.w;
    }
    const int gr = r0 + r;
    const int64_t row = static_cast<int64_t>(q0 + gr / group) * p.hq + kvh * group + gr % group;
    if (p.num_splits == 1) {
      const float inv = l_tot > 0.f ? 1.f / l_tot : 0.f;  // a row with no key outputs 0
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] *= inv;
      // out: [ntok, hq, D]
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row * D + c * 8) = pack8<T>(acc);
    } else {
      // part_out: [num_splits, ntok, hq, D] unnormalised; part_ml: [num_splits, ntok, hq, 2] (max, sum)
      const int64_t prow = static_cast<int64_t>(split) * p.ntok * p.hq + row;
      float4* dst = reinterpret_cast<float4*>(p.part_out + prow * D + c * 8);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (c == 0) {
        p.part_ml[prow * 2] = m_tot;
        p.part_ml[prow * 2 + 1] = l_tot;
      }
    }
  }
#endif
}

}  // namespace
}  // namespace tandem_rt::kernels
