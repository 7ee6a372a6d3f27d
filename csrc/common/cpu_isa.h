// Which compiled variant of the CPU kernels runs: the best instruction set this CPU has, or the one
// TANDEM_RT_CPU_KERNELS forces (for tests and A/B timing). Shared by paged attention, the layer-math
// ops and linear_rows.
#pragma once

#include "common/torch_headers.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace tandem_rt {
namespace cpu_isa {

enum class Isa { kBase, kAvx2, kAvx512 };

inline Isa detected() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

// The best variant, or the one TANDEM_RT_CPU_KERNELS names ("avx512" / "avx512f", "avx2", "base";
// read on every call, for tests). Throws std::invalid_argument for an
// unknown name or a variant this CPU cannot run.
inline Isa best() {
  const char* env = std::getenv("TANDEM_RT_CPU_KERNELS");
  if (env == nullptr || *env == '\0') return detected();
  const std::string want = env;
  const Isa have = detected();
  if (want == "base") return Isa::kBase;
  if (want == "avx2" && have != Isa::kBase) return Isa::kAvx2;
  if ((want == "avx512" || want == "avx512f") && have == Isa::kAvx512) return Isa::kAvx512;
  throw std::invalid_argument("TANDEM_RT_CPU_KERNELS=" + want +
                              " is not a kernel variant this CPU runs (avx512, avx512f, avx2, base or unset)");
}

// ValueError (naming TANDEM_RT_CPU_KERNELS) when the forced variant is unknown or unsupported.
inline void check_variant() {
  try {
    best();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

// AVX-512 extensions beyond AVX-512F are used unless TANDEM_RT_CPU_KERNELS=avx512f (the
// AVX-512F-only kernels, for tests and A/B timing).
inline bool avx512_extensions() {
  const char* env = std::getenv("TANDEM_RT_CPU_KERNELS");
  return best() == Isa::kAvx512 && !(env != nullptr && std::string(env) == "avx512f");
}

// AVX-512 BF16 dot products (paged attention's and linear_rows' bf16 kernels; without them bf16 is
// converted to fp32).
inline bool bf16_dot_products() {
#if defined(__x86_64__) && defined(__GNUC__)
  return avx512_extensions() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AVX-512 VNNI int8 dot products (linear_rows_q's int8-activation kernel; without them its fp32
// kernels run).
inline bool int8_dot_products() {
#if defined(__x86_64__) && defined(__GNUC__)
  return avx512_extensions() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

}  // namespace cpu_isa
}  // namespace tandem_rt
