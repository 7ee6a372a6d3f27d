"""tandem_rt.ops.sample (and the Philox random state it shares with verify) against plain-PyTorch
and plain-Python references."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, requires_cuda
from sampling_ref import empirical, philox4x32_10, philox_uniform, processed_probs, top_p_between, tv, tv_bound
from tandem_rt import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- random state


def test_philox_reference_known_answers():
    # Random123 known-answer vectors for philox4x32-10: they validate the Python reference.
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 7), (-5, 2**33 + 3), (2**62 + 11, 2**40)])
def test_rng_uniform_matches_reference(device, seed, offset):
    state = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    got = ops.rng_uniform(state, 5, 7).cpu()
    want = torch.tensor([[philox_uniform(seed, offset, s, d) for d in range(7)] for s in range(5)],
                        dtype=torch.float32)
    assert torch.equal(got, want)
    assert state.tolist() == [seed, offset]  # not advanced


@requires_cuda
def test_rng_uniform_cpu_cuda_identical():
    state = ops.make_rng_state(987654321)
    state[1] = 12345
    assert torch.equal(ops.rng_uniform(state, 300, 40), ops.rng_uniform(state.cuda(), 300, 40).cpu())


# ---------------------------------------------------------------- processed distribution


def _rows(V, gen):
    """Per-row (logits, temperature, top_k, top_p) covering greedy, plain, top-k, top-p, both, ties."""
    rows = []
    for kind in ["greedy", "plain", "topk", "topp", "both", "ties_topk", "ties_topp", "greedy_ties", "k_ge_v"]:
        if kind.startswith("ties") or kind == "greedy_ties":
            logits = torch.randint(-3, 3, (V,), generator=gen).float()
        else:
            logits = torch.randn(V, generator=gen) * 2.0
        T = 0.0 if kind.startswith("greedy") else float(torch.empty(()).uniform_(0.4, 1.6, generator=gen))
        k = int(torch.randint(1, max(V, 2), (), generator=gen)) if kind in ("topk", "both", "ties_topk") else 0
        k = V + 3 if kind == "k_ge_v" else k
        p = 1.0
        if kind in ("topp", "both", "ties_topp"):
            K = k if 0 < k < V else V
            p = top_p_between(logits, T, k, int(torch.randint(1, K + 1, (), generator=gen)))
        rows.append((logits, T, k, p))
    return rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 50, 1000])
def test_probs_out_is_processed_distribution(device, dtype, V):
    gen = torch.Generator().manual_seed(V)
    rows = _rows(V, gen) * 2
    logits = torch.stack([r[0] for r in rows]).to(dtype)
    # round-trip through dtype so the reference sees the same values as the op
    rows = [(logits[i].float(), T, k, p) for i, (_, T, k, p) in enumerate(rows)]
    t, k, p = ops.sampling_params(len(rows), [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                                  device=device)
    probs_out = torch.full((len(rows), V), float("nan"), device=device)
    state = ops.make_rng_state(3, device)
    tokens = ops.sample(logits.to(device), t, k, p, state, probs_out=probs_out)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(rows),)
    got = probs_out.cpu().double()
    assert not torch.isnan(got).any()
    for i, (l, T, kk, pp) in enumerate(rows):
        want = processed_probs(l, T, kk, pp)
        assert torch.equal(got[i] > 0, want > 0), f"row {i}: kept set differs"
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
        assert want[int(tokens[i])] > 0, f"row {i}: sampled token {int(tokens[i])} outside the kept set"
        if T == 0:
            assert int(tokens[i]) == int(torch.argmax(l))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_without_probs_out_matches_with(device):
    gen = torch.Generator().manual_seed(1)
    rows = _rows(40, gen)
    logits = torch.stack([r[0] for r in rows]).to(device)
    t, k, p = ops.sampling_params(len(rows), [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                                  device=device)
    a = ops.sample(logits, t, k, p, ops.make_rng_state(9, device))
    b = ops.sample(logits, t, k, p, ops.make_rng_state(9, device), probs_out=torch.empty(len(rows), 40, device=device))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- sampling statistics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [(1.0, 0, 1.0), (0.7, 6, 1.0), (1.3, 0, 0.8), (0.8, 9, 0.9)])
def test_empirical_distribution_matches_processed(device, params):
    T, k, _ = params
    V, N = 12, 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 1.5
    top_p = params[2] if params[2] == 1.0 else top_p_between(logits, T, k, (k or V) - 2)
    want = processed_probs(logits, T, k, top_p)
    t, kk, p = ops.sampling_params(N, T, k, top_p, device=device)
    tokens = ops.sample(logits.expand(N, V).contiguous().to(device), t, kk, p, ops.make_rng_state(11, device))
    got = empirical(tokens, V)
    assert float(got[want == 0].sum()) == 0.0
    assert tv(got, want) < tv_bound(V, N), (got, want)


# ---------------------------------------------------------------- random state behaviour


@pytest.mark.parametrize("device", DEVICES)
def test_rng_state_advances_and_determines_draws(device):
    V, N = 16, 256
    logits = torch.zeros(N, V, device=device)  # flat: every draw is informative
    t, k, p = ops.sampling_params(N, 1.0, device=device)
    s1 = ops.make_rng_state(42, device)
    a = ops.sample(logits, t, k, p, s1)
    assert s1.tolist() == [42, 1]
    b = ops.sample(logits, t, k, p, s1)
    assert s1.tolist() == [42, 2]
    assert not torch.equal(a, b)  # fresh numbers after the advance
    again = ops.sample(logits, t, k, p, ops.make_rng_state(42, device))
    assert torch.equal(a, again)  # same state, same draws
    other = ops.sample(logits, t, k, p, ops.make_rng_state(43, device))
    assert not torch.equal(a, other)
    # the draw is the inverse CDF of the documented uniform: flat V -> floor(u * V)
    u = torch.tensor([philox_uniform(42, 0, r, 0) for r in range(N)], dtype=torch.float64)
    assert torch.equal(a.cpu(), (u * V).floor().long())


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_rng_state_draws_depend_on_the_row_only(device):
    """rng_state [B, 2]: row b draws philox(seed_b, offset_b, subsequence 0), whatever the other
    rows are and wherever the row sits in the batch; every row's offset advances."""
    V, N = 16, 9
    logits = torch.zeros(N, V, device=device)  # flat: token = floor(u * V)
    t, k, p = ops.sampling_params(N, 1.0, device=device)
    state = torch.tensor([[100 + r, 7 * r] for r in range(N)], dtype=torch.int64, device=device)
    got = ops.sample(logits, t, k, p, state)
    u = torch.tensor([philox_uniform(100 + r, 7 * r, 0, 0) for r in range(N)], dtype=torch.float64)
    assert torch.equal(got.cpu(), (u * V).floor().long())
    assert state[:, 1].tolist() == [7 * r + 1 for r in range(N)] and state[:, 0].tolist() == list(range(100, 109))
    # row 4 alone (one-row batch) and at another index of a reversed batch: same token
    alone = ops.sample(logits[:1], *ops.sampling_params(1, 1.0, device=device),
                       torch.tensor([[104, 28]], dtype=torch.int64, device=device))
    rev = ops.sample(logits, t, k, p, torch.tensor([[100 + r, 7 * r] for r in reversed(range(N))],
                                                   dtype=torch.int64, device=device))
    assert alone.item() == got[4].item() == rev[N - 1 - 4].item()


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_cpu_cuda_identical(dtype):
    gen = torch.Generator().manual_seed(2)
    rows = _rows(300, gen) * 20
    logits = torch.stack([r[0] for r in rows]).to(dtype)
    args = ([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    cpu_state, cuda_state = ops.make_rng_state(5), ops.make_rng_state(5, "cuda")
    a = ops.sample(logits, *ops.sampling_params(len(rows), *args), cpu_state)
    b = ops.sample(logits.cuda(), *ops.sampling_params(len(rows), *args, device="cuda"), cuda_state)
    assert torch.equal(a, b.cpu())
    assert torch.equal(cpu_state, cuda_state.cpu())


@requires_cuda
def test_sample_large_vocab_cuda():
    V = 151_936
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, V, generator=gen) * 3
    k = [0, 50, 0, 1000]
    top_p = [1.0, 1.0, top_p_between(logits[2], 1.0, 0, 300), top_p_between(logits[3], 0.8, 1000, 123)]
    T = [1.0, 0.6, 1.0, 0.8]
    out = torch.full((4, V), float("nan"), device="cuda")
    ops.sample(logits.cuda(), *ops.sampling_params(4, T, k, top_p, device="cuda"), ops.make_rng_state(0, "cuda"), out)
    for i in range(4):
        want = processed_probs(logits[i], T[i], k[i], top_p[i])
        assert torch.equal(out[i].cpu() > 0, want > 0)
        torch.testing.assert_close(out[i].cpu().double(), want, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- validation


def test_sample_validation_errors():
    logits = torch.randn(3, 8)
    t, k, p = ops.sampling_params(3, 1.0)
    s = ops.make_rng_state(0)
    with pytest.raises(ValueError, match="logits"):
        ops.sample(logits.long(), t, k, p, s)
    with pytest.raises(ValueError, match="logits"):
        ops.sample(logits[0], t, k, p, s)
    with pytest.raises(ValueError, match="logits"):
        ops.sample(logits.t(), t, k, p, s)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(logits, t[:2], k, p, s)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(logits, t.double(), k, p, s)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(logits, torch.tensor([1.0, -0.5, 1.0]), k, p, s)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample(logits, t, k.long(), p, s)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample(logits, t, torch.tensor([0, -1, 0], dtype=torch.int32), p, s)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            ops.sample(logits, t, k, torch.tensor([1.0, bad, 1.0]), s)
    with pytest.raises(ValueError, match="rng_state"):
        ops.sample(logits, t, k, p, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="rng_state"):
        ops.sample(logits, t, k, p, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="probs_out"):
        ops.sample(logits, t, k, p, s, probs_out=torch.empty(3, 7))
    with pytest.raises(ValueError, match="probs_out"):
        ops.sample(logits, t, k, p, s, probs_out=torch.empty(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(logits, t.to("meta"), k, p, s)
    # the op itself validates too (direct torch.ops calls)
    with pytest.raises(ValueError, match="top_p"):
        torch.ops.tandem_rt.sample(logits, t, k, torch.tensor([1.0, 2.0, 1.0]), s, None)
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.tandem_rt.sample(logits, t, k[:1], p, s, None)
    assert s.tolist() == [0, 0]  # failed calls leave the state alone


def test_sampling_params_and_make_rng_state():
    t, k, p = ops.sampling_params(2, [0.0, 0.5], 3, torch.tensor([0.9, 1.0]))
    assert t.dtype == torch.float32 and k.dtype == torch.int32 and p.dtype == torch.float32
    assert t.tolist() == [0.0, 0.5] and k.tolist() == [3, 3] and p.tolist() == [pytest.approx(0.9), 1.0]
    with pytest.raises(ValueError, match="temperature"):
        ops.sampling_params(2, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        ops.sampling_params(2, 1.0, -2)
    with pytest.raises(ValueError, match="top_k"):
        ops.sampling_params(2, 1.0, 2.5)
    with pytest.raises(ValueError, match="top_p"):
        ops.sampling_params(2, 1.0, 0, 0.0)
    with pytest.raises(ValueError, match="top_p"):
        ops.sampling_params(2, 1.0, 0, [0.5, 1.01])
    with pytest.raises(ValueError, match="temperature"):
        ops.sampling_params(3, [1.0, 1.0])
    assert ops.make_rng_state(-7).tolist() == [-7, 0]
    with pytest.raises(ValueError, match="seed"):
        ops.make_rng_state(2**63)
    with pytest.raises(ValueError, match="seed"):
        ops.make_rng_state(1.5)


# ---------------------------------------------------------------- greedy argmax (CPU variants)


def ref_greedy_token(row: torch.Tensor) -> int:
    """Lowest index of the largest logit after sanitising (NaN -> lowest float, +-inf -> +-largest
    float), -0.0 below +0.0: plain-Python loop over the row."""
    import math
    import struct

    big = 3.4028234663852886e38

    def key(v):
        v = -big if math.isnan(v) else max(-big, min(big, v))
        return (v, math.copysign(1.0, v) if v == 0 else 0.0)

    vals = [struct.unpack("f", struct.pack("f", v))[0] for v in row.tolist()]
    best = 0
    for j, v in enumerate(vals):
        if key(v) > key(vals[best]):
            best = j
    return best


def greedy_rows(V: int, seed: int) -> torch.Tensor:
    """Rows that exercise the argmax: random, ties of the maximum, maxima in the tail and the first
    lane, NaN / +-inf, all-NaN, all -inf, a maximum of +-0.0."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(V, generator=g) for _ in range(3)]
    r = torch.randn(V, generator=g)
    r[torch.randint(0, V, (3,), generator=g)] = 9.0          # ties of the maximum
    rows.append(r)
    r = torch.randn(V, generator=g)
    r[-1] = 9.0                                                # the maximum in the tail
    rows.append(r)
    r = torch.randn(V, generator=g)
    r[0] = 9.0
    rows.append(r)
    r = torch.randn(V, generator=g)
    r[torch.randint(0, V, (max(1, V // 7),), generator=g)] = float("nan")
    rows.append(r)
    r = torch.randn(V, generator=g)
    r[torch.randint(0, V, (2,), generator=g)] = float("inf")   # +inf ties the largest float
    r[V // 2] = 3.4028234663852886e38
    rows.append(r)
    rows.append(torch.full((V,), float("nan")))
    rows.append(torch.full((V,), float("-inf")))
    r = -torch.rand(V, generator=g) - 1
    r[torch.randint(0, V, (2,), generator=g)] = -0.0
    r[V - 1] = 0.0                                              # +0.0 beats the earlier -0.0
    rows.append(r)
    r = -torch.rand(V, generator=g) - 1
    r[V // 3] = -0.0
    rows.append(r)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["", "avx512", "avx2", "base"])
@pytest.mark.parametrize("V", [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130, 1000, 8192 + 5])
def test_greedy_argmax_matches_reference(V, variant, dtype, monkeypatch):
    """Temperature 0 in sample and verify: every CPU variant picks the reference's token, on fp32
    logits and on bf16 / fp16 ones (bf16 rows are read as they are when every row is greedy)."""
    monkeypatch.setenv("TANDEM_RT_CPU_KERNELS", variant)
    logits = greedy_rows(V, V).to(dtype)
    B = logits.shape[0]
    want = [ref_greedy_token(r) for r in logits.float()]
    t, k, p = ops.sampling_params(B, 0.0)
    try:
        got = torch.ops.tandem_rt.sample(logits, t, k, p, ops.make_rng_state(0), None)
    except ValueError as e:
        pytest.skip(f"this CPU cannot run the {variant} variant: {e}")
    assert got.tolist() == want
    # verify with zero drafts emits the target's greedy token; with the token as its draft, accepts it
    none = torch.empty(B, 0, dtype=torch.int64)
    _, em = torch.ops.tandem_rt.verify(none, torch.zeros(B, dtype=torch.int32), None, logits.view(B, 1, V),
                                       t, k, p, ops.make_rng_state(0))
    assert em[:, 0].tolist() == want
    acc, em = torch.ops.tandem_rt.verify(torch.tensor(want).view(B, 1), torch.ones(B, dtype=torch.int32), None,
                                         torch.stack([logits, logits], 1), t, k, p, ops.make_rng_state(0))
    assert acc.tolist() == [1] * B and em[:, 0].tolist() == want
