// Element type tag passed from the ATen glue to the raw kernels (no ATen in .cu files).
#pragma once

namespace tandem_rt::kernels {

enum class KvDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace tandem_rt::kernels
