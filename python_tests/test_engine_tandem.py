"""``tandem`` mode (the Tandem model as a generator) equals a block-mode generation written here
with the reference ``TandemModel`` (full recomputation, Eq. (2) boundaries), both free-token
settings; ``secondary`` mode equals the reference secondary as a plain LM."""
from __future__ import annotations

import pytest
import torch

from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams


@torch.no_grad()
def reference_tandem(model, prompt, gamma, max_new, free_token):
    """Greedy Tandem generation by recomputation.

    The secondary's query at position i reads primary-derived K/V for p < min(plen, i + 1) and
    its own for the rest, ``plen`` = positions the primary has processed when i was generated.
    free_token: the primary predicts the first token after the prompt and after each block of
    γ secondary tokens (it processes [last token, γ secondary tokens]). Without it the secondary
    generates every token; the primary processes each block of γ secondary tokens.
    """
    toks = list(prompt)
    limit = len(prompt) + max_new

    def primary_next():
        return int(model.primary(torch.tensor([toks]))[0, -1].argmax())

    def secondary_next(plen):
        _, hidden = model.primary(torch.tensor([toks]), hidden_layers=model.layer_map)
        T = len(toks)
        boundary = torch.minimum(torch.full((T,), plen), torch.arange(T) + 1)
        return int(model.secondary_forward(torch.tensor([toks]), hidden, boundary)[0, -1].argmax())

    plen = len(toks)
    if free_token:
        toks.append(primary_next())
    while len(toks) < limit:
        if free_token:
            plen = len(toks) - 1
            for _ in range(min(gamma, limit - len(toks) - 1)):
                toks.append(secondary_next(plen))
            toks.append(primary_next())
        else:
            plen = len(toks)
            for _ in range(min(gamma, limit - len(toks))):
                toks.append(secondary_next(plen))
    return toks[len(prompt):]


@pytest.mark.parametrize("feature", [False, True, "output", "mlp-output", "embed"])
@pytest.mark.parametrize("free_token", [True, False])
def test_tandem_mode_matches_reference(free_token, feature):
    """``feature="embed"``: token-anchored projections instead of a feature input."""
    embed = feature == "embed"
    model = agreeing_tandem_model(seed=4, layer_scale=0.45, feature=False if embed else feature,
                                  projection_embed=embed)
    engine = Engine(model, num_pages=64, page_size=8, max_batch_size=4)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 10, 17)]
    params = SamplingParams(max_new_tokens=13, ignore_eos=True)
    for gamma in (1, 3, 4):
        out = engine.generate(prompts, params, mode="tandem", gamma=gamma, free_token=free_token)
        for p, o in zip(prompts, out):
            assert o.token_ids == reference_tandem(model, p, gamma, 13, free_token), gamma
            assert len(o.token_ids) == 13
    assert engine.num_free_pages == engine.page_manager.num_pages


def test_secondary_mode_matches_plain_secondary():
    model = agreeing_tandem_model(seed=5, layer_scale=0.45)
    engine = Engine(model, num_pages=64, page_size=16)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True), mode="secondary")
    for p, o in zip(prompts, out):
        toks = list(p)
        with torch.no_grad():
            for _ in range(10):
                toks.append(int(model.secondary(torch.tensor([toks]))[0, -1].argmax()))
        assert o.token_ids == toks[len(p):]


def drafts_of(model, seed: int, engine=None) -> list:
    """``tandem``-mode tokens (γ = 4, 16 new) of four random prompts (lengths 5, 9, 12, 16) of seed
    ``seed``, by ``engine`` or a fresh one."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (5, 9, 12, 16)]
    engine = engine or Engine(model, num_pages=64, page_size=8)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params, mode="tandem", gamma=4)]


@pytest.mark.parametrize("feature", [True, "output", "mlp-output"])
def test_feature_input_changes_the_drafts(feature):
    """The feature input is read by the engine's drafts: with W_f zeroed the secondary drafts
    differently (so the reference comparison above cannot pass by ignoring it)."""
    model = agreeing_tandem_model(seed=4, layer_scale=0.45, feature=feature)
    with_f = drafts_of(model, 7)
    with torch.no_grad():
        model.tandem.feature.proj.weight.zero_()
    assert with_f != drafts_of(model, 7)


@pytest.mark.parametrize("mode,feature", [("tandem-speed", True), ("tandem", True), ("tandem", "output"),
                                          ("tandem-speed", "mlp-output")])
def test_feature_input_through_graph_plumbing(mode, feature):
    """Draft steps with the feature input through the CUDA-graph static buffers (EagerCapture on
    the CPU) give the tokens of the eager engine."""
    from tandem_rt.engine.cuda_graphs import CudaGraphRunner, EagerCapture

    model = agreeing_tandem_model(seed=6, layer_scale=0.45, feature=feature)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (4, 11, 7)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eager = Engine(model, num_pages=64, page_size=8, max_batch_size=4)
    want = [o.token_ids for o in eager.generate(prompts, params, mode=mode, gamma=3)]
    graphed = Engine(model, num_pages=64, page_size=8, max_batch_size=4)
    graphed.runner.cuda_graphs = CudaGraphRunner(graphed.runner, EagerCapture())
    got = [o.token_ids for o in graphed.generate(prompts, params, mode=mode, gamma=3)]
    assert got == want
    assert any(key[-1] for key in graphed.runner.cuda_graphs.graphs)   # a graph with the input offset ran


def test_token_anchored_projections_change_the_drafts_and_graph_plumbing():
    """The engine's refresh adds the token embeddings (drafts differ from the same weights without
    them), through the CUDA-graph static buffers (EagerCapture) too."""
    from tandem_rt.engine.cuda_graphs import CudaGraphRunner, EagerCapture

    model = agreeing_tandem_model(seed=6, layer_scale=0.45, projection_embed=True)
    eager = drafts_of(model, 9)
    graphed = Engine(model, num_pages=64, page_size=8, max_batch_size=4)
    graphed.runner.cuda_graphs = CudaGraphRunner(graphed.runner, EagerCapture())
    assert drafts_of(model, 9, graphed) == eager
    model.config.projection_embed = False
    assert drafts_of(model, 9) != eager
