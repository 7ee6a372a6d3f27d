"""DDP with 2 gloo processes on CPU: ranks end with identical weights and the loss goes down."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_model_config

STEPS = 12


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from tandem_rt.models.llama import LlamaForCausalLM
    from tandem_rt.train.data import WindowSampler
    from tandem_rt.train.distributed import cleanup, init_distributed
    from tandem_rt.train.loop import TrainConfig, train
    from tandem_rt.train.pretrain import CausalLMObjective, init_weights

    info = init_distributed("cpu")
    torch.manual_seed(0)  # same initial weights on every rank
    model = init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=31, hidden_size=16, layers=1, heads=2,
                                                             kv_heads=1, intermediate_size=24)))
    tokens = np.tile(np.array([3, 7, 1, 9, 4, 12, 5], dtype=np.uint16), 200)
    sampler = WindowSampler(tokens, seq_len=14, seed=0, rank=info.rank)  # different data per rank
    cfg = TrainConfig(total_tokens=STEPS * 4 * 14 * world, batch_size=4, seq_len=14, lr=1e-2, warmup_steps=2,
                      log_every=STEPS, ckpt_every=1000)
    result = train(CausalLMObjective(model), sampler.sample, cfg, os.path.join(out_dir, "run"), info,
                   sampler=sampler, progress=False)
    torch.save({"state": model.state_dict(), "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_gloo_ranks_identical_weights_and_loss_decreases(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["result"]["step"] == STEPS and r0["result"]["tokens"] == STEPS * 4 * 14 * 2
    for name, t in r0["state"].items():
        torch.testing.assert_close(r1["state"][name], t, rtol=0, atol=0)
    # the loss on a fixed batch went down from the common initialisation
    from tandem_rt.models.llama import LlamaForCausalLM
    from tandem_rt.train.pretrain import CausalLMObjective, init_weights

    torch.manual_seed(0)
    init = init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=31, hidden_size=16, layers=1, heads=2,
                                                            kv_heads=1, intermediate_size=24)))
    trained = LlamaForCausalLM(init.config)
    trained.load_state_dict(r0["state"])
    ids = torch.tensor([[3, 7, 1, 9, 4, 12, 5, 3, 7, 1, 9, 4, 12, 5]])
    with torch.no_grad():
        before = CausalLMObjective(init)(ids)[0].item()
        after = CausalLMObjective(trained)(ids)[0].item()
    assert after < 0.7 * before, (before, after)
    # initial weights differed from the trained ones on both ranks (training happened)
    assert not torch.equal(init.model.embed_tokens.weight, trained.model.embed_tokens.weight)
