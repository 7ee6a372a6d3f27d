// Host replacements, written from the PTX ISA specification, for the inline-PTX helpers of
// csrc/kernels/mma_ptx.cuh (same names and signatures), so that csrc/kernels/paged_attention_mma.cuh
// can run unchanged on the CPU. Shared-memory "addresses" are byte offsets into the emulated CTA's
// shared memory. Every access is bounds- and alignment-checked and traps (abort) on a violation;
// global reads of cp.async must fall inside a buffer that the driver registered (emu::global_ok).
//
// cp.async: with emu::cp_async_defer (the default) a copy lands only when the issuing thread calls
// cp_async_wait_all(), the latest moment the PTX memory model allows, so a read that is not covered
// by a wait (plus __syncthreads() for other threads' copies) sees stale data; with it false a copy
// lands at issue, the earliest moment, so an overwrite of a buffer that is still being read shows.
// Include after cuda_host_prelude.h and before the kernel header (which then skips mma_ptx.cuh).
#pragma once

#include <cstring>
#include <utility>

#include "cuda_host_prelude.h"

#ifndef TANDEM_RT_MMA_EMULATION
#error "define TANDEM_RT_MMA_EMULATION before including the emulated PTX helpers"
#endif

// The kernel's dynamic shared memory: the emulated CTA's byte vector.
#define TANDEM_RT_MMA_DYNAMIC_SMEM(name) unsigned char* name = emu::tls.cta->smem.data()

namespace emu {

inline bool cp_async_defer = true;  // true: copies land at cp_async_wait_all(); false: at issue
inline bool skip_first_wait = false;  // planted fault (driver self-check): first wait lands nothing
bool global_ok(const void* p, size_t bytes);  // defined by the driver: [p, p + bytes) readable

struct PendingCopy {
  uint32_t dst;     // shared-memory byte offset
  const void* src;  // global source (unused when !fill)
  bool fill;        // false: zero the 16 bytes
};
inline thread_local std::vector<PendingCopy> pending_copies;
inline thread_local bool waited = false;  // this thread has called cp_async_wait_all() before

inline unsigned char* smem_at(uint32_t addr, uint32_t bytes) {
  if (static_cast<uint64_t>(addr) + bytes > static_cast<uint64_t>(tls.cta->smem_bytes))
    trap("shared-memory access out of bounds");
  return tls.cta->smem.data() + addr;
}

inline void land_copy(const PendingCopy& c) {
  if (c.dst % 16 != 0) trap("cp.async destination not 16-byte aligned");
  unsigned char* dst = smem_at(c.dst, 16);
  if (!c.fill) {
    std::memset(dst, 0, 16);
    return;
  }
  if (reinterpret_cast<uintptr_t>(c.src) % 16 != 0) trap("cp.async source not 16-byte aligned");
  if (!global_ok(c.src, 16)) trap("cp.async reads outside every input buffer");
  std::memcpy(dst, c.src, 16);
}

inline uint16_t load_b16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, smem_at(addr, 2), 2);
  return v;
}

// ldmatrix address exchange: every lane publishes its row address; returns after the warp has.
inline void publish_row_addresses(uint32_t addr) {
  if (addr % 16 != 0) trap("ldmatrix row address not 16-byte aligned");
  warp().u[lane()][0] = addr;
  warp().bar.arrive_and_wait();
}

template <typename T>
float b16_to_float(uint16_t bits) {
  T x;
  std::memcpy(static_cast<void*>(&x), &bits, 2);
  return static_cast<float>(x);
}

}  // namespace emu

namespace tandem_rt::kernels {
namespace {

inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::tls.cta->smem.data());
}

inline void cp_async_16(uint32_t dst, const void* src, bool fill) {
  const emu::PendingCopy c{dst, src, fill};
  if (emu::cp_async_defer) {
    emu::pending_copies.push_back(c);
  } else {
    emu::land_copy(c);
  }
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  if (emu::skip_first_wait && !std::exchange(emu::waited, true)) return;
  for (const emu::PendingCopy& c : emu::pending_copies) emu::land_copy(c);
  emu::pending_copies.clear();
}

// Register i of lane l: (row l / 4, elements 2 (l % 4), +1) of matrix i, whose row r lane 8 i + r addressed.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  emu::publish_row_addresses(addr);
  const emu::Warp& w = emu::warp();
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) {
    const uint32_t row = w.u[8 * i + l / 4][0];
    r[i] = emu::load_b16(row + 4 * (l % 4)) | (static_cast<uint32_t>(emu::load_b16(row + 4 * (l % 4) + 2)) << 16);
  }
  emu::warp().bar.arrive_and_wait();
}

// .trans: the same position of the transposed matrix, i.e. elements M[2 (l % 4)][l / 4], M[2 (l % 4) + 1][l / 4].
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  emu::publish_row_addresses(addr);
  const emu::Warp& w = emu::warp();
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = emu::load_b16(w.u[8 * i + 2 * (l % 4)][0] + 2 * (l / 4));
    const uint32_t hi = emu::load_b16(w.u[8 * i + 2 * (l % 4) + 1][0] + 2 * (l / 4));
    r[i] = lo | (hi << 16);
  }
  emu::warp().bar.arrive_and_wait();
}

// mma.m16n8k16.row.col, fp32 accumulate: gathers the warp's A (16 x 16) and B (16 x 8) fragments
// (layouts as in paged_attention_mma.cuh), then each lane computes its 4 C elements in fp32.
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) w.u[l][i] = a[i];
  w.u[l][4] = b0;
  w.u[l][5] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int t = 0; t < emu::kWarpSize; ++t) {
    const int g = t / 4, q = t % 4;
    for (int half = 0; half < 2; ++half) {  // the two b16 of each .b32: columns (or rows of B) 2q, 2q + 1
      const int s = 16 * half;
      A[g][2 * q + half] = emu::b16_to_float<T>(static_cast<uint16_t>(w.u[t][0] >> s));
      A[g + 8][2 * q + half] = emu::b16_to_float<T>(static_cast<uint16_t>(w.u[t][1] >> s));
      A[g][2 * q + 8 + half] = emu::b16_to_float<T>(static_cast<uint16_t>(w.u[t][2] >> s));
      A[g + 8][2 * q + 8 + half] = emu::b16_to_float<T>(static_cast<uint16_t>(w.u[t][3] >> s));
      B[2 * q + half][g] = emu::b16_to_float<T>(static_cast<uint16_t>(w.u[t][4] >> s));
      B[2 * q + 8 + half][g] = emu::b16_to_float<T>(static_cast<uint16_t>(w.u[t][5] >> s));
    }
  }
  w.bar.arrive_and_wait();
  const int g = l / 4, q = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[e] = sum;
  }
}

}  // namespace
}  // namespace tandem_rt::kernels
