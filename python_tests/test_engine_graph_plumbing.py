"""The CUDA-graph runner's static-buffer plumbing, on the CPU: with ``EagerCapture`` standing in
for graph capture (a replay re-runs the step and copies its results into the captured outputs),
every mode emits exactly the tokens of the engine without graphs, for ragged batches padded to a
bucket, and the Tandem refresh and the verification run inside the captured step. (The capture itself needs a GPU:
python_tests/test_engine_cuda.py.)"""
from __future__ import annotations

import copy

import pytest

from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams
from tandem_rt.engine.cuda_graphs import CudaGraphRunner, EagerCapture


@pytest.mark.parametrize("seed", [5, 6])
def test_graph_runner_matches_eager_engine(seed):
    model = agreeing_tandem_model(seed=seed, layer_scale=0.2)
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15]]      # 3 sequences -> bucket 4
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    plain = Engine(copy.deepcopy(model), num_pages=64, page_size=8, max_batch_size=4)
    graphed = Engine(copy.deepcopy(model), num_pages=64, page_size=8, max_batch_size=4)
    graphed.cuda_graphs = CudaGraphRunner(graphed.runner, capture=EagerCapture())
    runs = [("primary", 1), ("speed", 3), ("tandem-speed", 2), ("tandem-speed", "auto"), ("tandem", 3)]
    for mode, gamma in runs:
        want = [r.token_ids for r in plain.generate(prompts, params, mode=mode, gamma=gamma)]
        got = [r.token_ids for r in graphed.generate(prompts, params, mode=mode, gamma=gamma)]
        assert got == want, (mode, gamma)
    sampled = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.8, seed=seed)
    want = [r.token_ids for r in plain.generate(prompts, sampled, mode="tandem-speed", gamma=3)]
    got = [r.token_ids for r in graphed.generate(prompts, sampled, mode="tandem-speed", gamma=3)]
    assert got == want
    keys = graphed.cuda_graphs.graphs.keys()
    assert any(k[1] == 4 for k in keys), "the batch of 3 was padded to the bucket of 4"
    assert any(k[6] for k in keys), "a primary block with the Tandem refresh inside was captured"   # key: (..., refresh, offset)
    assert any(not k[6] and k[2] == 1 for k in keys), "decode / draft steps were captured"
    kinds = {k[5] for k in keys}
    assert {"greedy", "probs"} <= kinds, "verify blocks captured with their verification (greedy, sampled)"
    assert graphed.num_free_pages == graphed.page_manager.num_pages
