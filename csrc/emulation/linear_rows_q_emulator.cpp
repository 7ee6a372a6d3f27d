// Host emulator test of the CUDA few-row quantized product (csrc/kernels/linear_rows_q.cuh): runs
// the real kernel source on the CPU, one std::thread per CUDA thread (cuda_host_prelude.h), on one
// random problem, and compares y with a float64 reference computed from the same blocks. Exit
// status 0 = match, 1 = mismatch or a write outside y (guards), 2 = bad arguments; SIGALRM after
// 120 s catches a deadlock (a barrier not reached by every thread).
//
// What the problem is made of, to make mistakes visible: fp16 scales of both signs and offsets
// (Q4_1) over a wide range, every quant byte random; x rows strided (x_extra padding elements per
// row holding NaN); y starts NaN with guard elements on both sides; shared memory starts as NaN
// bytes (a read of an unstaged element poisons the result).
//
// Build (host only; C++20 for std::barrier):
//   g++ -std=c++20 -O2 -fno-strict-aliasing -pthread -I/usr/local/cuda/include -Icsrc \
//       csrc/emulation/linear_rows_q_emulator.cpp -o lrq_emu
// Run: lrq_emu dtype=bf16 qtype=2 m=3 n=37 k=1088 add=rows x_extra=5 seed=1
//   dtype fp32 | bf16; qtype 0 (Q8_0) | 1 (Q4_0) | 2 (Q4_1); add none | bias | rows
// fault=flip_weight checks the checker: one weight byte is changed after the kernel ran and before
// the reference is computed, so the run must report a mismatch.
#define TANDEM_RT_HOST_EMULATION 1

#include <unistd.h>

#include <cstring>
#include <random>
#include <string>
#include <type_traits>

#include "cuda_host_prelude.h"
#include "kernels/linear_rows_q.cuh"

namespace {

using tandem_rt::kernels::LinearRowsQParams;

struct Case {
  std::string dtype = "fp32";
  int qtype = 2;
  int m = 1, n = 5, k = 64;
  std::string add = "none";
  int x_extra = 0;
  unsigned seed = 1;
  std::string fault = "none";
};

Case parse_case(int argc, char** argv) {
  Case c;
  emu::for_each_arg(argc, argv, [&c](const std::string& key, const std::string& val) {
    if (key == "dtype") c.dtype = val;
    else if (key == "qtype") c.qtype = std::stoi(val);
    else if (key == "m") c.m = std::stoi(val);
    else if (key == "n") c.n = std::stoi(val);
    else if (key == "k") c.k = std::stoi(val);
    else if (key == "add") c.add = val;
    else if (key == "x_extra") c.x_extra = std::stoi(val);
    else if (key == "seed") c.seed = static_cast<unsigned>(std::stoul(val));
    else if (key == "fault") c.fault = val;
    else throw std::invalid_argument("unknown key: " + key);
  });
  if ((c.dtype != "fp32" && c.dtype != "bf16") || c.qtype < 0 || c.qtype > 2 || c.m < 1 || c.n < 1 || c.k < 32 ||
      c.k % 32 != 0 || (c.add != "none" && c.add != "bias" && c.add != "rows") || c.x_extra < 0)
    throw std::invalid_argument("bad case");
  return c;
}

double half_value(const uint8_t* p) {
  __half h;
  std::memcpy(&h, p, 2);
  return static_cast<double>(__half2float(h));
}

void put_half(uint8_t* p, float v) {
  const __half h = __float2half(v);
  std::memcpy(p, &h, 2);
}

// Weight k of a block, in float64 (the formats of kernels/linear_rows_q.h).
double ref_weight(const uint8_t* blk, int qtype, int k) {
  const double d = half_value(blk);
  if (qtype == 0) return d * static_cast<int8_t>(blk[2 + k]);
  const uint8_t byte = blk[(qtype == 1 ? 2 : 4) + (k & 15)];
  const int nib = k < 16 ? (byte & 15) : (byte >> 4);
  return qtype == 1 ? d * (nib - 8) : d * nib + half_value(blk + 2);
}

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __bfloat162float(v);
}

template <typename T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __float2bfloat16(v);
}

template <typename T>
int run(const Case& c) {
  std::mt19937 gen(c.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  const int bb = tandem_rt::kernels::linear_rows_q_block_bytes(c.qtype);
  const int nb = c.k / 32;
  std::vector<uint8_t> w(static_cast<size_t>(c.n) * nb * bb);
  for (int r = 0; r < c.n; ++r)
    for (int b = 0; b < nb; ++b) {
      uint8_t* blk = w.data() + (static_cast<size_t>(r) * nb + b) * bb;
      for (int i = 0; i < bb; ++i) blk[i] = static_cast<uint8_t>(byte(gen));
      const float mag = std::pow(2.f, -10.f + 8.f * unit(gen));  // 2^-10 .. 2^-2
      put_half(blk, unit(gen) < 0.5f ? -mag : mag);
      if (c.qtype == 2) put_half(blk + 2, (unit(gen) - 0.5f) * 16.f * mag);
    }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t xs = c.k + c.x_extra;
  std::vector<T> x(static_cast<size_t>(c.m) * xs, from_float<T>(nan));
  for (int m = 0; m < c.m; ++m)
    for (int k = 0; k < c.k; ++k) x[static_cast<size_t>(m) * xs + k] = from_float<T>(normal(gen));
  const int add_rows = c.add == "rows" ? c.m : c.add == "bias" ? 1 : 0;
  std::vector<T> add(static_cast<size_t>(add_rows) * c.n);
  for (T& v : add) v = from_float<T>(normal(gen));
  constexpr int kGuard = 64;
  std::vector<T> ybuf(static_cast<size_t>(c.m) * c.n + 2 * kGuard, from_float<T>(nan));
  T* y = ybuf.data() + kGuard;

  LinearRowsQParams p{};
  p.y = y;
  p.x = x.data();
  p.w = w.data();
  p.add = add_rows > 0 ? add.data() : nullptr;
  p.x_stride = xs;
  p.add_stride = c.add == "rows" ? c.n : 0;
  p.M = c.m;
  p.N = c.n;
  p.K = c.k;
  p.qtype = c.qtype;
  p.dtype = std::is_same_v<T, float> ? tandem_rt::kernels::KvDType::kFloat32 : tandem_rt::kernels::KvDType::kBFloat16;

  using namespace tandem_rt::kernels;
  const int gx = (c.n + kLrqWarps - 1) / kLrqWarps, gy = (c.m + kLrqRows - 1) / kLrqRows;
  const int smem_bytes = kLrqSmemFloats * static_cast<int>(sizeof(float));
  bool ok = true;
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      emu::Cta cta(smem_bytes);
      std::vector<std::thread> threads;
      for (int t = 0; t < emu::Cta::kThreads; ++t)
        threads.emplace_back([&, t] {
          emu::tls.tid = dim3(t, 0, 0);
          emu::tls.bid = dim3(bx, by, 0);
          emu::tls.cta = &cta;
          switch (c.qtype) {
            case 0: linear_rows_q_kernel<T, 0>(p); break;
            case 1: linear_rows_q_kernel<T, 1>(p); break;
            default: linear_rows_q_kernel<T, 2>(p); break;
          }
        });
      for (std::thread& th : threads) th.join();
      for (int i = 0; i < emu::Cta::kSmemGuard; ++i)
        if (cta.smem[smem_bytes + i] != 0xFF) ok = false;
    }
  if (!ok) std::printf("WRITE PAST THE SHARED MEMORY\n");
  for (int i = 0; i < kGuard; ++i)
    if (!std::isnan(to_float(ybuf[i])) || !std::isnan(to_float(ybuf[kGuard + static_cast<size_t>(c.m) * c.n + i]))) {
      std::printf("WRITE OUTSIDE y\n");
      ok = false;
      break;
    }
  if (c.fault == "flip_weight") w[w.size() / 2] ^= 0x21;

  // float64 reference; tolerance: fp32 accumulation over K terms, plus the output rounding
  const double out_eps = std::is_same_v<T, float> ? 0.0 : 1.0 / 256.0;
  int bad = 0;
  double worst = 0.0;
  for (int m = 0; m < c.m; ++m)
    for (int n = 0; n < c.n; ++n) {
      double ref = 0.0, mag = 0.0;
      for (int k = 0; k < c.k; ++k) {
        const double wv = ref_weight(w.data() + (static_cast<size_t>(n) * nb + k / 32) * bb, c.qtype, k % 32);
        const double xv = to_float(x[static_cast<size_t>(m) * xs + k]);
        ref += wv * xv;
        mag += std::fabs(wv * xv);
      }
      if (add_rows > 0) {
        const double a = to_float(add[static_cast<size_t>(add_rows == 1 ? 0 : m) * c.n + n]);
        ref += a;
        mag += std::fabs(a);
      }
      const double got = to_float(y[static_cast<size_t>(m) * c.n + n]);
      const double tol = 4.0 * (c.k + 8) * 6e-8 * mag + out_eps * std::fabs(ref) + 1e-30;
      const double err = std::fabs(got - ref);
      if (!(err <= tol)) {
        if (bad < 5) std::printf("mismatch at m=%d n=%d: got %.9g want %.9g (tol %.3g)\n", m, n, got, ref, tol);
        ++bad;
      }
      if (err / (mag + 1e-30) > worst) worst = err / (mag + 1e-30);
    }
  std::printf("%s: %d of %d outputs outside tolerance; worst |err| / sum|w x| = %.3g\n", bad == 0 && ok ? "OK" : "FAIL",
              bad, c.m * c.n, worst);
  return bad == 0 && ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  alarm(120);
  Case c;
  try {
    c = parse_case(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return c.dtype == "fp32" ? run<float>(c) : run<__nv_bfloat16>(c);
}
