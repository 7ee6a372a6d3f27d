// Python module tandem_rt._C: build information and host-side helpers.
// The torch ops themselves (torch.ops.tandem_rt.*) are registered by static
// initialisers in csrc/ops/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA) when this
// library is loaded.
#include <pybind11/pybind11.h>

#include <string>

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
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tandem_rt native extension: paged KV cache ops (CPU and CUDA)";
  m.def("build_info", &build_info,
        "Dict: package version, torch version built against, whether CUDA kernels are "
        "linked, CUDA architectures compiled, compiler versions.");
}
