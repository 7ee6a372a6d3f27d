"""tandem_rt.ops.verify (greedy and rejection-sampling speculative verification) against
plain-PyTorch references and exact output distributions."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, requires_cuda
from sampling_ref import empirical, processed_probs, top_p_between, tv, tv_bound
from tandem_rt import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ref_greedy_verify(draft_tokens, draft_lens, target_logits):
    """Reference loop: accept the longest prefix equal to the target's argmax, emit its argmax."""
    B, G = draft_tokens.shape
    accepted = torch.empty(B, dtype=torch.int32)
    emitted = torch.full((B, G + 1), -1, dtype=torch.int64)
    for b in range(B):
        n = int(draft_lens[b])
        for i in range(n + 1):
            t = int(torch.argmax(target_logits[b, i].float()))
            emitted[b, i] = t
            if i < n and int(draft_tokens[b, i]) == t:
                continue
            accepted[b] = i
            break
    return accepted, emitted


def _poison_allocator(device):
    # Fill soon-to-be-reused allocator blocks with a sentinel so unwritten outputs would show.
    if device != "cpu":
        torch.full((1 << 20,), 777, dtype=torch.int64, device=device)


def _check_structure(accepted, emitted, draft_tokens, draft_lens, V):
    B, G1 = emitted.shape
    for b in range(B):
        a, n = int(accepted[b]), int(draft_lens[b])
        assert 0 <= a <= n
        assert torch.equal(emitted[b, :a], draft_tokens[b, :a])
        assert 0 <= int(emitted[b, a]) < V
        assert (emitted[b, a + 1:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_q", [False, True])
def test_greedy_verify_matches_reference(device, dtype, with_q):
    gen = torch.Generator().manual_seed(7)
    B, G, V = 32, 5, 30
    logits = (torch.randn(B, G + 1, V, generator=gen) * 3).to(dtype)
    logits[-4:] = torch.randint(-2, 2, (4, G + 1, V), generator=gen).to(dtype)  # many ties
    argmax = logits.float().argmax(-1)
    lens = torch.randint(0, G + 1, (B,), generator=gen, dtype=torch.int32)
    lens[:3] = torch.tensor([0, G, G], dtype=torch.int32)
    draft = torch.randint(0, V, (B, G), generator=gen)
    agree = torch.minimum(torch.randint(0, G + 1, (B,), generator=gen), lens.long())  # forced agreement prefix
    agree[2] = G  # a row where every draft is accepted
    for b in range(B):
        draft[b, :agree[b]] = argmax[b, :agree[b]]
        draft[b, lens[b]:] = -1  # padding is ignored
    q = torch.softmax(torch.randn(B, G, V, generator=gen), -1) if with_q else None
    t, k, p = ops.sampling_params(B, 0.0, 3, 0.5, device=device)  # filters are irrelevant to greedy rows
    state = ops.make_rng_state(0, device)
    _poison_allocator(device)
    acc, em = ops.verify(draft.to(device), lens.to(device), None if q is None else q.to(device), logits.to(device),
                         t, k, p, state)
    want_acc, want_em = ref_greedy_verify(draft, lens, logits)
    assert acc.dtype == torch.int32 and em.dtype == torch.int64 and em.shape == (B, G + 1)
    assert torch.equal(acc.cpu(), want_acc)
    assert torch.equal(em.cpu(), want_em)
    assert int(acc[2]) == G and (acc.cpu() >= agree.int()).all()
    assert state.tolist() == [0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_structure_and_determinism(device):
    gen = torch.Generator().manual_seed(8)
    B, G, V = 40, 4, 25
    logits = torch.randn(B, G + 1, V, generator=gen).to(device)
    q = torch.softmax(torch.randn(B, G, V, generator=gen), -1)
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, G).to(device)
    lens = torch.randint(0, G + 1, (B,), generator=gen, dtype=torch.int32).to(device)
    temps = [0.0 if b % 4 == 0 else 1.0 for b in range(B)]
    params = ops.sampling_params(B, temps, [0 if b % 3 else 10 for b in range(B)], 0.95, device=device)
    s1 = ops.make_rng_state(21, device)
    _poison_allocator(device)
    acc, em = ops.verify(draft, lens, q.to(device), logits, *params, s1)
    _check_structure(acc.cpu(), em.cpu(), draft.cpu(), lens.cpu(), V)
    greedy_rows = torch.arange(0, B, 4)
    ga, ge = ref_greedy_verify(draft.cpu()[greedy_rows], lens.cpu()[greedy_rows], logits.cpu()[greedy_rows])
    assert torch.equal(acc.cpu()[greedy_rows], ga) and torch.equal(em.cpu()[greedy_rows], ge)
    assert s1.tolist() == [21, 1]
    acc2, em2 = ops.verify(draft, lens, q.to(device), logits, *params, ops.make_rng_state(21, device))
    assert torch.equal(acc, acc2) and torch.equal(em, em2)
    acc3, em3 = ops.verify(draft, lens, q.to(device), logits, *params, s1)  # advanced state
    assert not torch.equal(em, em3)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_rng_state_verify_depends_on_the_row_only(device):
    """rng_state [B, 2]: each row's verification (sampled rows) is the same alone, inside any batch
    and at any row index; every row's offset advances."""
    gen = torch.Generator().manual_seed(9)
    B, G, V = 12, 4, 25
    logits = torch.randn(B, G + 1, V, generator=gen).to(device)
    q = torch.softmax(torch.randn(B, G, V, generator=gen), -1).to(device)
    draft = torch.multinomial(q.reshape(-1, V).cpu(), 1, generator=gen).reshape(B, G).to(device)
    lens = torch.randint(0, G + 1, (B,), generator=gen, dtype=torch.int32).to(device)
    params = ops.sampling_params(B, 1.0, device=device)
    keys = [[1000 + b, 3 * b] for b in range(B)]
    state = torch.tensor(keys, dtype=torch.int64, device=device)
    acc, em = ops.verify(draft, lens, q, logits, *params, state)
    _check_structure(acc.cpu(), em.cpu(), draft.cpu(), lens.cpu(), V)
    assert state[:, 1].tolist() == [3 * b + 1 for b in range(B)]
    perm = torch.randperm(B, generator=gen)
    acc_p, em_p = ops.verify(draft[perm], lens[perm], q[perm], logits[perm], *params,
                             torch.tensor([keys[i] for i in perm.tolist()], dtype=torch.int64, device=device))
    assert torch.equal(acc_p.cpu(), acc.cpu()[perm]) and torch.equal(em_p.cpu(), em.cpu()[perm])
    for b in (0, 5, B - 1):
        a1, e1 = ops.verify(draft[b:b + 1], lens[b:b + 1], q[b:b + 1], logits[b:b + 1],
                            *ops.sampling_params(1, 1.0, device=device),
                            torch.tensor([keys[b]], dtype=torch.int64, device=device))
        assert torch.equal(a1.cpu(), acc.cpu()[b:b + 1]) and torch.equal(e1.cpu(), em.cpu()[b:b + 1])
    with pytest.raises(ValueError, match="rng_state"):
        ops.verify(draft, lens, q, logits, *params, torch.zeros(B + 1, 2, dtype=torch.int64, device=device))


# ---------------------------------------------------------------- output distributions

N = 20_000  # identical rows per call: one call gives N independent verifications


def _first_token_run(device, p_logits, q, T, k, top_p, G=3, seed=0, fixed_draft=None):
    """N rows with position-independent target logits and drafter q; drafts x_i ~ q (or a fixed
    token with q one-hot, i.e. draft_probs None); ragged lengths in [0, G]."""
    gen = torch.Generator().manual_seed(seed)
    V = p_logits.numel()
    target = p_logits.expand(N, G + 1, V).contiguous()
    if q is None:
        draft = torch.full((N, G), fixed_draft, dtype=torch.int64)
        draft_probs = None
    else:
        draft = torch.multinomial(q.expand(N * G, V), 1, replacement=True, generator=gen).reshape(N, G)
        draft_probs = q.float().expand(N, G, V).contiguous().to(device)
    lens = torch.randint(0, G + 1, (N,), generator=gen, dtype=torch.int32)
    params = ops.sampling_params(N, T, k, top_p, device=device)
    acc, em = ops.verify(draft.to(device), lens.to(device), draft_probs, target.to(device), *params,
                         ops.make_rng_state(seed + 100, device))
    return acc.cpu(), em.cpu(), lens


def _cases(V=10):
    gen = torch.Generator().manual_seed(3)
    skew_p = torch.randn(V, generator=gen) * 2
    skew_q = torch.softmax(torch.randn(V, generator=gen) * 2, 0)
    disjoint_p = torch.cat([torch.randn(V // 2, generator=gen), torch.full((V - V // 2,), float("-inf"))])
    disjoint_q = torch.cat([torch.zeros(V // 2), torch.softmax(torch.randn(V - V // 2, generator=gen), 0)])
    filt_top_p = top_p_between(skew_p, 0.7, 7, 5)
    return {
        "skewed": (skew_p, skew_q, 1.0, 0, 1.0, None),
        "flat_p": (torch.zeros(V), skew_q, 1.0, 0, 1.0, None),
        "flat_q": (skew_p, torch.full((V,), 1.0 / V), 1.0, 0, 1.0, None),
        "disjoint": (disjoint_p, disjoint_q, 1.0, 0, 1.0, None),
        "filtered": (skew_p, skew_q, 0.7, 7, filt_top_p, None),
        "near_equal": (skew_p, torch.softmax(skew_p, 0) * 0.9 + 0.1 / V, 1.0, 0, 1.0, None),
        "greedy_drafter": (skew_p, None, 1.2, 0, 1.0, 4),
        "greedy_drafter_filtered": (skew_p, None, 0.7, 7, filt_top_p, int(torch.argmax(skew_p))),
        # q = 2 p: max(0, p - q) has no mass, so rejected positions fall back to p
        "zero_residual": (skew_p, 2 * processed_probs(skew_p, 1.0, 0, 1.0), 1.0, 0, 1.0, None),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_cases()))
def test_first_emitted_token_follows_target(device, case):
    p_logits, q, T, k, top_p, fixed = _cases()[case]
    V = p_logits.numel()
    q_sample = q if case != "zero_residual" else q / 2  # drafts are drawn from the normalised q
    if q is not None and case == "zero_residual":
        gen = torch.Generator().manual_seed(0)
        draft = torch.multinomial(q_sample.expand(N * 3, V), 1, replacement=True, generator=gen).reshape(N, 3)
        lens = torch.full((N,), 3, dtype=torch.int32)
        params = ops.sampling_params(N, T, k, top_p, device=device)
        acc, em = ops.verify(draft.to(device), lens.to(device), q.float().expand(N, 3, V).contiguous().to(device),
                             p_logits.expand(N, 4, V).contiguous().to(device), *params,
                             ops.make_rng_state(1, device))
        acc, em = acc.cpu(), em.cpu()
        assert 0.4 < float((acc == 0).double().mean()) < 0.6  # accept prob p/q = 1/2 at each position
    else:
        acc, em, lens = _first_token_run(device, p_logits, q, T, k, top_p, fixed_draft=fixed)
    want = processed_probs(p_logits, T, k, top_p)
    got = empirical(em[:, 0], V)
    assert float(got[want == 0].sum()) == 0.0
    assert tv(got, want) < tv_bound(V, N), (case, got, want)
    if case == "disjoint":
        assert (acc == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy_drafter", [False, True])
def test_accepted_count_distribution(device, greedy_drafter):
    # Position-independent p and q with fresh draws: each draft is accepted independently with
    # probability alpha = sum_x min(p(x), q(x)) (alpha = p(x) for a one-hot q at x), so
    # P(accepted = j) = alpha^j (1 - alpha) for j < G and alpha^G for j = G.
    G, V = 3, 8
    gen = torch.Generator().manual_seed(12)
    p_logits = torch.randn(V, generator=gen)
    p = processed_probs(p_logits, 0.9, 6, 1.0)
    if greedy_drafter:
        x = int(torch.argmax(p))
        q, alpha = None, float(p[x])
    else:
        x = None
        q = torch.softmax(torch.randn(V, generator=gen), 0).double()
        alpha = float(torch.minimum(p, q).sum())
    gen = torch.Generator().manual_seed(13)
    draft = (torch.full((N, G), x) if greedy_drafter
             else torch.multinomial(q.expand(N * G, V), 1, replacement=True, generator=gen).reshape(N, G))
    acc, em = ops.verify(draft.to(device), torch.full((N,), G, dtype=torch.int32, device=device),
                         None if q is None else q.float().expand(N, G, V).contiguous().to(device),
                         p_logits.expand(N, G + 1, V).contiguous().to(device),
                         *ops.sampling_params(N, 0.9, 6, 1.0, device=device), ops.make_rng_state(5, device))
    want = torch.tensor([alpha ** j * (1 - alpha) for j in range(G)] + [alpha ** G], dtype=torch.float64)
    got = empirical(acc, G + 1)
    assert tv(got, want) < tv_bound(G + 1, N), (got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_joint_first_two_tokens_follow_target(device):
    # Target and drafter condition on the previous token: p1 = P1[x0], q1 = Q1[x0]. The first two
    # tokens of the output stream (taking the second from a next verify round when the first round
    # ended after one token) must be distributed as P0(a) * P1[a](b).
    V, G = 6, 2
    gen = torch.Generator().manual_seed(17)
    T, k = 0.9, 4
    P0 = torch.randn(V, generator=gen) * 1.5
    P1 = torch.randn(V, V, generator=gen) * 1.5
    P2 = torch.randn(V, generator=gen)
    Q0 = torch.softmax(torch.randn(V, generator=gen) * 1.5, 0)
    Q1 = torch.softmax(torch.randn(V, V, generator=gen) * 1.5, -1)

    def draw(probs):  # one sample per row of probs [n, V]
        return torch.multinomial(probs, 1, replacement=True, generator=gen)[:, 0]

    params = ops.sampling_params(N, T, k, 1.0, device=device)
    x0 = draw(Q0.expand(N, V))
    x1 = draw(Q1[x0])
    target = torch.stack([P0.expand(N, V), P1[x0], P2.expand(N, V)], 1).contiguous()
    q = torch.stack([Q0.expand(N, V), Q1[x0]], 1).contiguous()
    acc, em = ops.verify(torch.stack([x0, x1], 1).to(device), torch.full((N,), G, dtype=torch.int32, device=device),
                         q.to(device), target.to(device), *params, ops.make_rng_state(8, device))
    acc, em = acc.cpu(), em.cpu()
    t0, t1 = em[:, 0], em[:, 1].clone()
    # next round for rows that emitted a single token: target P1[t0], drafter Q1[t0]
    y0 = draw(Q1[t0])
    target2 = torch.stack([P1[t0], P2.expand(N, V), P2.expand(N, V)], 1).contiguous()
    q2 = torch.stack([Q1[t0], Q1[y0]], 1).contiguous()
    _, em2 = ops.verify(torch.stack([y0, draw(Q1[y0])], 1).to(device),
                        torch.full((N,), G, dtype=torch.int32, device=device), q2.to(device), target2.to(device),
                        *params, ops.make_rng_state(9, device))
    single = acc == 0
    t1[single] = em2.cpu()[single, 0]
    assert 0.05 < float(single.double().mean()) < 0.95  # both paths exercised
    p0 = processed_probs(P0, T, k, 1.0)
    want = torch.stack([p0[a] * processed_probs(P1[a], T, k, 1.0) for a in range(V)]).reshape(-1)
    got = empirical(t0 * V + t1, V * V)
    assert tv(got, want) < tv_bound(V * V, N), (got, want)


# ---------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_verify_cpu_cuda_identical(dtype):
    gen = torch.Generator().manual_seed(30)
    B, G, V = 500, 4, 40
    logits = (torch.randn(B, G + 1, V, generator=gen) * 2).to(dtype)
    q = torch.softmax(torch.randn(B, G, V, generator=gen), -1)
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, G)
    lens = torch.randint(0, G + 1, (B,), generator=gen, dtype=torch.int32)
    args = ([0.0 if b % 5 == 0 else 0.8 for b in range(B)], [0 if b % 2 else 12 for b in range(B)], 1.0)
    for with_q in (True, False):
        cs, gs = ops.make_rng_state(77), ops.make_rng_state(77, "cuda")
        a = ops.verify(draft, lens, q if with_q else None, logits, *ops.sampling_params(B, *args), cs)
        b = ops.verify(draft.cuda(), lens.cuda(), q.cuda() if with_q else None, logits.cuda(),
                       *ops.sampling_params(B, *args, device="cuda"), gs)
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
        assert torch.equal(cs, gs.cpu())


@requires_cuda
def test_verify_large_vocab_cuda():
    gen = torch.Generator().manual_seed(31)
    B, G, V = 3, 3, 151_936
    logits = torch.randn(B, G + 1, V, generator=gen) * 3
    argmax = logits.argmax(-1)
    draft = argmax[:, :G].clone()
    draft[1, 1] = (draft[1, 1] + 1) % V
    lens = torch.tensor([3, 3, 1], dtype=torch.int32)
    t, k, p = ops.sampling_params(B, 0.0, device="cuda")
    acc, em = ops.verify(draft.cuda(), lens.cuda(), None, logits.cuda(), t, k, p, ops.make_rng_state(0, "cuda"))
    want_acc, want_em = ref_greedy_verify(draft, lens, logits)
    assert torch.equal(acc.cpu(), want_acc) and torch.equal(em.cpu(), want_em)
    t, k, p = ops.sampling_params(B, 1.0, [0, 40, 0], [1.0, 1.0, 0.9], device="cuda")
    acc, em = ops.verify(draft.cuda(), lens.cuda(), None, logits.cuda(), t, k, p, ops.make_rng_state(0, "cuda"))
    _check_structure(acc.cpu(), em.cpu(), draft, lens, V)


# ---------------------------------------------------------------- validation


def test_verify_validation_errors():
    B, G, V = 2, 3, 9
    draft = torch.zeros(B, G, dtype=torch.int64)
    lens = torch.full((B,), G, dtype=torch.int32)
    q = torch.full((B, G, V), 1.0 / V)
    logits = torch.randn(B, G + 1, V)
    t, k, p = ops.sampling_params(B, 1.0)
    s = ops.make_rng_state(0)

    def call(**kw):
        args = dict(draft_tokens=draft, draft_lens=lens, draft_probs=q, target_logits=logits, temperature=t,
                    top_k=k, top_p=p, rng_state=s)
        args.update(kw)
        return ops.verify(**args)

    with pytest.raises(ValueError, match="draft_tokens"):
        call(draft_tokens=draft.int())
    with pytest.raises(ValueError, match="draft_tokens"):
        call(draft_tokens=torch.zeros(B + 1, G, dtype=torch.int64))
    with pytest.raises(ValueError, match="target_logits"):
        call(target_logits=torch.randn(B, G, V))
    with pytest.raises(ValueError, match="target_logits"):
        call(target_logits=logits.double())
    with pytest.raises(ValueError, match="target_logits"):
        call(target_logits=logits[:, :, :0])
    with pytest.raises(ValueError, match="draft_probs"):
        call(draft_probs=q[:, :, :-1].contiguous())
    with pytest.raises(ValueError, match="draft_probs"):
        call(draft_probs=q.half())
    with pytest.raises(ValueError, match="draft_lens"):
        call(draft_lens=lens.long())
    with pytest.raises(ValueError, match="draft_lens"):
        call(draft_lens=torch.tensor([G + 1, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="draft_lens"):
        call(draft_lens=torch.tensor([-1, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="draft_tokens"):
        call(draft_tokens=torch.tensor([[0, V, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="top_p"):
        call(top_p=torch.tensor([1.0, 1.5]))
    with pytest.raises(ValueError, match="top_k"):
        call(top_k=torch.tensor([-3, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="rng_state"):
        call(rng_state=s.to("meta"))
    with pytest.raises(ValueError, match="draft_lens"):
        torch.ops.tandem_rt.verify(draft, torch.tensor([0, 4], dtype=torch.int32), q, logits, t, k, p, s)
    with pytest.raises(ValueError, match="draft_tokens"):
        torch.ops.tandem_rt.verify(torch.full((B, G), -1), lens, q, logits, t, k, p, s)
    # padding past draft_lens may hold anything
    call(draft_tokens=torch.tensor([[0, -1, -1], [0, 0, 5]]), draft_lens=torch.tensor([1, 3], dtype=torch.int32))
    assert s.tolist() == [0, 1]
