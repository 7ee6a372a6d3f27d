// Python module tandem_rt._C: build information and host-side helpers.
// The torch ops themselves (torch.ops.tandem_rt.*) are registered by static
// initialisers in csrc/ops/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA) when this
// library is loaded.
#include <torch/csrc/utils/pybind.h>  // at::Tensor / optional type casters (needs libtorch_python)
#include <ATen/Parallel.h>

#include "common/cpu_isa.h"
#include "ops/direct.h"

#include <mutex>
#include <set>
#include <string>
#include <thread>

namespace tandem_rt {
void bind_decoder_plan(pybind11::module_& cpu);  // ops/decoder_plan.cpp: tandem_rt._C.cpu.DecoderPlan
}  // namespace tandem_rt

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = std::string(TANDEM_RT_VERSION);
  info["torch_version"] = std::string(TANDEM_TORCH_VERSION);
#ifdef TANDEM_WITH_CUDA
  info["cuda_linked"] = true;
#else
  info["cuda_linked"] = false;
#endif
  std::string archs = TANDEM_CUDA_ARCHS;
  pybind11::list arch_list;
  size_t start = 0;
  while (start < archs.size()) {
    size_t end = archs.find(',', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) arch_list.append(archs.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = arch_list;
  info["cuda_mode"] = std::string(TANDEM_CUDA_MODE);
  info["cxx_compiler"] = std::string(TANDEM_CXX_COMPILER);
  info["cuda_compiler"] = std::string(TANDEM_CUDA_COMPILER);
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  info["cpu_parallel"] = std::string(TANDEM_CPU_PARALLEL);  // at::parallel_for backend compiled in
  return info;
}

// Distinct OS threads that ran the bodies of one at::parallel_for over n_items (grain 1), the way the
// CPU kernels call it. More than one when torch has several threads: proves the extension's
// at::parallel_for really forks (it needs -fopenmp with torch's OpenMP backend).
long parallel_threads_used(long n_items) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    volatile double sink = 0;  // a little work per item so that every thread gets some
    for (int64_t i = begin; i < end; ++i)
      for (int k = 0; k < 200000; ++k) sink = sink + k;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<long>(ids.size());
}

// The CPU kernel variants this process runs (after TANDEM_RT_CPU_KERNELS).
pybind11::dict cpu_kernels() {
  pybind11::dict info;
  const auto isa = tandem_rt::cpu_isa::best();
  info["isa"] = std::string(isa == tandem_rt::cpu_isa::Isa::kAvx512 ? "avx512"
                            : isa == tandem_rt::cpu_isa::Isa::kAvx2 ? "avx2" : "base");
  info["bf16_dot_products"] = tandem_rt::cpu_isa::bf16_dot_products();
  info["int8_dot_products"] = tandem_rt::cpu_isa::int8_dot_products();
  // linear_rows_q16 runs an int8 kernel (VNNI, or its AVX2 variant) rather than the portable loops
  info["int8_packed_rows"] = isa != tandem_rt::cpu_isa::Isa::kBase;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tandem_rt native extension: paged KV cache ops (CPU and CUDA)";
  m.def("build_info", &build_info,
        "Dict: package version, torch version built against, whether CUDA kernels are "
        "linked, CUDA architectures compiled, compiler versions, CPU parallel backend.");
  m.def("cpu_kernels", &cpu_kernels,
        "Dict: the CPU kernel variant this process runs (isa: avx512 / avx2 / base) and whether its "
        "bf16 (vdpbf16ps) and int8 (VNNI vpdpbusd) dot-product kernels run, and whether linear_rows_q16 "
        "runs an int8 kernel (VNNI or AVX2: int8_packed_rows).");
  // The hot CPU ops of a step without the torch dispatcher (ops/direct.h): same arguments and
  // checks as torch.ops.tandem_rt.<op> on CPU tensors; the GIL is released while they run.
  namespace d = tandem_rt::direct;
  auto cpu = m.def_submodule("cpu", "direct CPU entry points of the step ops (no dispatcher, no autograd)");
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  using pybind11::arg;
  cpu.def("linear_rows", &d::linear_rows, arg("x"), arg("w"), arg("add") = pybind11::none(), nogil);
  cpu.def("linear_rows_q", &d::linear_rows_q, arg("x"), arg("w"), arg("qtype"), arg("add") = pybind11::none(), nogil);
  cpu.def("linear_rows_q16", &d::linear_rows_q16, arg("x"), arg("w"), arg("qtype"), arg("add") = pybind11::none(),
          nogil);
  cpu.def("embedding_rows_q", &d::embedding_rows_q, arg("table"), arg("ids"), arg("qtype"), arg("dtype"), nogil);
  cpu.def("rms_norm", &d::rms_norm, arg("x"), arg("weight"), arg("eps"), nogil);
  cpu.def("silu_and_mul", &d::silu_and_mul, arg("gate_up"), nogil);
  cpu.def("rope_cache_write", &d::rope_cache_write, arg("k"), arg("v"), arg("positions"), arg("slot_mapping"),
          arg("k_cache"), arg("v_cache"), arg("rope_theta"), arg("q") = pybind11::none(), nogil);
  // scratch: paged_attention_scratch(...) of the call's rows, shared by the layers of one forward
  // (the op leaves it reusable); None: the op allocates its own when it needs one.
  cpu.def("paged_attention", &d::paged_attention, arg("out"), arg("q"), arg("k_cache"), arg("v_cache"),
          arg("block_tables"), arg("seq_lens"), arg("query_start_loc"), arg("scale"), arg("max_q_len"),
          arg("max_seq_len"), arg("row_invariant"), arg("scratch") = pybind11::none(), nogil);
  cpu.def("paged_attention_scratch", &d::paged_attention_scratch, arg("num_tokens"), arg("num_seqs"),
          arg("num_heads"), arg("head_dim"), arg("max_seq_len"), nogil,
          "The key-segment scratch of a row-invariant CPU paged_attention call over num_tokens query rows of "
          "num_seqs sequences (fp32 1-D, its completion counts zero), or None when max_seq_len needs none.");
  tandem_rt::bind_decoder_plan(cpu);
  m.def("parallel_threads_used", &parallel_threads_used, pybind11::arg("n_items"),
        "Threads that ran one at::parallel_for over n_items work items (diagnostic: the CPU kernels' "
        "parallelism).", pybind11::call_guard<pybind11::gil_scoped_release>());
}
