"""``tandem-rt info``: build information and devices."""
from __future__ import annotations

import json
import platform


def run(args) -> int:
    import torch

    import tandem_rt

    info = {"tandem_rt": tandem_rt.build_info(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                                  for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads(), "cpu_kernels": tandem_rt._C.cpu_kernels()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    b = info["tandem_rt"]
    print(f"tandem_rt {b['version']} (built against torch {b['torch_version']}, {b['cxx_compiler']}, C++{b['cxx_standard'] // 100 % 100})")
    kernels = "linked" if b["cuda_linked"] else ("compile-checked only" if b["cuda_archs"] else "not built")
    print(f"CUDA kernels: {kernels}; archs {','.join(b['cuda_archs']) or '-'}; nvcc {b['cuda_compiler'] or '-'}; mode {b['cuda_mode']}")
    print(f"python {info['python']}, torch {info['torch']} (cuda {info['torch_cuda'] or 'none'}), {info['cpu_threads']} CPU threads")
    k = info["cpu_kernels"]
    blocks = "the GGUF blocks (int8 kernels)" if k["int8_packed_rows"] else "the dense weights (no int8 kernels)"
    print(f"CPU kernels: {k['isa']}; int8 dot products (VNNI) {'yes' if k['int8_dot_products'] else 'no'}, "
          f"bf16 dot products {'yes' if k['bf16_dot_products'] else 'no'}; a GGUF primary is served from {blocks} "
          "by default")
    print("devices: " + ", ".join(info["devices"]))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="build information and available devices")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
