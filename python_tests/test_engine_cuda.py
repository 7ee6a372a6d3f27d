"""CUDA: the engine on the GPU (with and without CUDA graphs) emits the CPU engine's greedy tokens."""
from __future__ import annotations

import copy

import pytest

from conftest import requires_cuda
from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams


@requires_cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_engine_matches_cpu(graphs):
    model = agreeing_tandem_model(seed=31, layer_scale=0.2, head_dim=32)   # CUDA kernels: head_dim 32/64/128
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15]]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    cpu = Engine(copy.deepcopy(model), num_pages=64, page_size=16)
    gpu = Engine(copy.deepcopy(model), device="cuda", num_pages=64, page_size=16, use_cuda_graphs=graphs)
    for mode, gamma in [("primary", 1), ("speed", 3), ("tandem-speed", 3), ("tandem-speed", "auto")]:
        want = [r.token_ids for r in cpu.generate(prompts, params, mode=mode, gamma=gamma)]
        got = [r.token_ids for r in gpu.generate(prompts, params, mode=mode, gamma=gamma)]
        assert got == want, (mode, gamma)
    assert gpu.num_free_pages == gpu.page_manager.num_pages
