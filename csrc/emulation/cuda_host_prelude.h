// CUDA execution model on the host, for the kernel emulator (mma_emulator.cpp): one std::thread per
// CUDA thread, a CTA is 128 of them sharing a byte vector as shared memory, __syncthreads() is a
// std::barrier over the CTA, and warp-collective operations (__shfl_xor_sync here, ldmatrix / mma in
// mma_ptx_emulation.h) exchange values through a per-warp scratch area between two barriers of the
// warp's 32 threads. Include this before any kernel header: it redefines threadIdx / blockIdx and the
// kernel-only keywords that a host compiler would not accept.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
using std::max;
using std::min;

namespace emu {

constexpr int kWarpSize = 32;

// Exchange area of one warp: lane l writes row l, then every lane reads the rows it needs.
struct Warp {
  std::barrier<> bar{kWarpSize};
  uint32_t u[kWarpSize][8];  // .b32 operands (ldmatrix addresses, mma fragments)
  float f[kWarpSize];        // shuffled floats
};

// One CTA of kThreads threads (the kernel's block size).
struct Cta {
  static constexpr int kThreads = 128;
  static constexpr int kSmemGuard = 256;  // bytes after the shared memory, must stay untouched
  explicit Cta(int smem_bytes) : smem_bytes(smem_bytes), smem(smem_bytes + kSmemGuard, 0xFF) {}
  std::barrier<> bar{kThreads};
  Warp warps[kThreads / kWarpSize];
  int smem_bytes;                    // dynamic shared memory the kernel may use
  std::vector<unsigned char> smem;   // [smem_bytes + kSmemGuard], 0xFF = NaN garbage at start
};

// State of the calling emulated thread (set by the launcher before it runs the kernel).
struct ThreadState {
  dim3 tid, bid;
  Cta* cta = nullptr;
};
inline thread_local ThreadState tls;

[[noreturn]] inline void trap(const char* what) {
  std::fprintf(stderr, "EMULATION TRAP: %s (block %u,%u,%u thread %u)\n", what, tls.bid.x, tls.bid.y, tls.bid.z,
               tls.tid.x);
  std::fflush(stderr);
  std::abort();
}

// The emulators' command line: `key=value` arguments, each handed to set(key, value), which throws
// std::invalid_argument for an unknown key.
template <typename F>
void for_each_arg(int argc, char** argv, F&& set) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("expected key=value: " + arg);
    set(arg.substr(0, eq), arg.substr(eq + 1));
  }
}

inline int lane() { return static_cast<int>(tls.tid.x) % kWarpSize; }
inline Warp& warp() { return tls.cta->warps[tls.tid.x / kWarpSize]; }

}  // namespace emu

#define threadIdx (emu::tls.tid)
#define blockIdx (emu::tls.bid)

inline void __syncthreads() { emu::tls.cta->bar.arrive_and_wait(); }

// Full-warp butterfly shuffle (the only kind the kernel uses).
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) emu::trap("__shfl_xor_sync with a partial mask");
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  w.f[l] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[l ^ lane_mask];
  w.bar.arrive_and_wait();
  return r;
}
