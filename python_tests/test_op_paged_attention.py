"""paged_attention against a plain-PyTorch float64 reference on gathered, contiguous K/V."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICES, requires_cuda
from tandem_rt.ops import paged_attention

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
CPU_HEAD_DIMS = [8, 16, 64, 128]
CUDA_HEAD_DIMS = [32, 64, 128]


def reference_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """float64 ``[Ntok, Hq, D]``: per sequence, gather its K/V pages into contiguous tensors and run
    softmax attention with an explicit causal mask (query t at position seq_len - q_len + t)."""
    q, k_cache, v_cache = q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double()
    block_tables, seq_lens, qsl = block_tables.cpu(), seq_lens.cpu().tolist(), query_start_loc.cpu().tolist()
    _, page_size, hkv, d = k_cache.shape
    group = q.shape[1] // hkv
    out = torch.zeros_like(q)
    for b, L in enumerate(seq_lens):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        pages = block_tables[b, : math.ceil(L / page_size)].long()
        k = k_cache[pages].reshape(-1, hkv, d)[:L].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[pages].reshape(-1, hkv, d)[:L].repeat_interleave(group, dim=1)
        qb = q[q0:q1]  # [T, Hq, D]
        scores = torch.einsum("thd,shd->hts", qb, k) * scale
        pos = L - (q1 - q0) + torch.arange(q1 - q0)
        mask = torch.arange(L)[None, :] <= pos[:, None]  # [T, L]
        scores = scores.masked_fill(~mask, float("-inf"))
        out[q0:q1] = torch.einsum("hts,shd->thd", scores.softmax(-1), v)
    return out


def make_batch(seq_lens, q_lens, hq, hkv, d, page_size, dtype, device, extra_pages=3, gen=None):
    """Random caches with a random page permutation; unused slots and pages are NaN so that any read
    beyond a sequence's length shows up in the output."""
    pages_per_seq = [math.ceil(L / page_size) for L in seq_lens]
    num_pages = sum(pages_per_seq) + extra_pages
    perm = torch.randperm(num_pages, generator=gen)
    max_pages = max(pages_per_seq + [1]) + 1
    block_tables = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
    k_cache = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for b, (L, n) in enumerate(zip(seq_lens, pages_per_seq)):
        pages = perm[used:used + n]
        used += n
        block_tables[b, :n] = pages.int()
        flat_k = torch.randn(n * page_size, hkv, d, generator=gen).to(dtype)
        flat_v = torch.randn(n * page_size, hkv, d, generator=gen).to(dtype)
        flat_k[L:] = float("nan")
        flat_v[L:] = float("nan")
        k_cache[pages] = flat_k.view(n, page_size, hkv, d)
        v_cache[pages] = flat_v.view(n, page_size, hkv, d)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, generator=gen).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(q), to(k_cache), to(v_cache), to(block_tables), to(torch.tensor(seq_lens, dtype=torch.int32)),
            to(qsl))


def run_and_check(seq_lens, q_lens, hq, hkv, d, page_size, dtype, device, scale=None, q_view=False):
    q, k_cache, v_cache, bt, sl, qsl = make_batch(seq_lens, q_lens, hq, hkv, d, page_size, dtype, device)
    if q_view:  # q as a strided slice of a wider projection output
        wide = torch.randn(q.shape[0], hq * d + 24, dtype=dtype, device=device)
        wide[:, : hq * d] = q.reshape(q.shape[0], -1)
        q = wide[:, : hq * d].view(q.shape[0], hq, d)
    scale = d ** -0.5 if scale is None else scale
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    res = paged_attention(q, k_cache, v_cache, bt, sl, qsl, scale, max(q_lens + [0]), max(seq_lens + [0]), out=out)
    assert res is out
    assert torch.isfinite(out).all(), "output not fully written (NaN left) or padding read"
    ref = reference_attention(q, k_cache, v_cache, bt, sl, qsl, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1e-6))


def head_dims(device):
    return CUDA_HEAD_DIMS if device == "cuda" else CPU_HEAD_DIMS


def _params():
    """Every head_dim x dtype of the device; page sizes 8/16/32 rotate across the cases."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for device in DEVICES:
        name = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        for i, d in enumerate(head_dims(name)):
            for j, dtype in enumerate(dtypes):
                page_size = (8, 16, 32)[(i + j) % 3]
                yield pytest.param(name, d, dtype, page_size, marks=marks,
                                   id=f"{name}-d{d}-{str(dtype)[6:]}-p{page_size}")


@pytest.mark.parametrize("device, head_dim, dtype, page_size", list(_params()))
def test_paged_attention_matches_reference(device, head_dim, dtype, page_size):
    """Lengths at and across page boundaries, GQA ratios 1/2/4/8, decode and ragged verify blocks."""
    check_reference_cases(device, head_dim, dtype, page_size)


def check_reference_cases(device, head_dim, dtype, page_size):
    P = page_size
    seq_lens = [1, P - 1, P, P + 1, 2 * P + 3]
    for group in (1, 2, 4, 8):
        hkv = 2 if group <= 2 else 1
        hq = hkv * group
        # decode: one query per sequence
        run_and_check(seq_lens, [1] * len(seq_lens), hq, hkv, head_dim, P, dtype, device)
        # verify blocks, ragged across the batch (q_len <= seq_len), one empty block
        q_lens = [1, min(P - 1, 5), 0, 8, 2 * P + 3 if group == 1 else 7]
        run_and_check(seq_lens, q_lens, hq, hkv, head_dim, P, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_long_context_and_split(device, dtype):
    """Contexts spanning many key chunks (CPU) and several KV splits (CUDA: one sequence, long context)."""
    check_long_context_and_split(device, dtype)


def check_long_context_and_split(device, dtype):
    run_and_check([1500], [1], 8, 2, 64, 16, dtype, device)
    run_and_check([900, 37, 300], [8, 3, 32], 8, 2, 64, 16, dtype, device)
    run_and_check([1101], [32], 16, 4, 128, 32, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_strided_q_scale_and_empty(device):
    run_and_check([40, 9], [3, 1], 4, 2, 64, 8, torch.float32, device, scale=0.37, q_view=True)
    # every sequence with q_len 0: nothing to do, output has no rows
    q, k, v, bt, sl, qsl = make_batch([5, 9], [0, 0], 4, 2, 64, 8, torch.float32, device)
    out = paged_attention(q, k, v, bt, sl, qsl, 0.125, 0, 9)
    assert out.shape == (0, 4, 64)
    # an empty batch
    empty = torch.empty(0, dtype=torch.int32, device=device)
    out = paged_attention(q, k, v, torch.empty(0, 3, dtype=torch.int32, device=device), empty,
                          torch.zeros(1, dtype=torch.int32, device=device), 0.125, 0, 0)
    assert out.shape == (0, 4, 64)


def _valid(device="cpu"):
    q, k, v, bt, sl, qsl = make_batch([10, 20], [2, 3], 4, 2, 32, 8, torch.float32, device)
    return dict(q=q, k_cache=k, v_cache=v, block_tables=bt, seq_lens=sl, query_start_loc=qsl, scale=0.1,
                max_q_len=3, max_seq_len=20)


def _set(key, fn):
    return lambda a: a.update({key: fn(a[key])})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutate, match", [
    (_set("q", lambda t: t.double()), r"q must be float32, float16 or bfloat16, got Double"),
    (_set("q", lambda t: t[0]), "q must have 3 dimensions"),
    (_set("q", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), "q must have packed heads"),
    (_set("k_cache", lambda t: t.bfloat16()), "k_cache must have dtype"),
    (_set("k_cache", lambda t: t.transpose(0, 1)), "k_cache must be contiguous"),
    (_set("k_cache", lambda t: t[..., :16].contiguous()), "k_cache"),
    (_set("v_cache", lambda t: t[:, :4].contiguous()), "v_cache"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :1].repeat(1, 1, 3, 1), v_cache=a["v_cache"][:, :, :1].repeat(1, 1, 3, 1)),
     "heads"),
    (_set("block_tables", lambda t: t.long()), "block_tables must have dtype"),
    (_set("block_tables", lambda t: t[0]), "block_tables must have 2 dimensions"),
    (_set("seq_lens", lambda t: t[:1]), r"seq_lens\.shape\[0\] must be 2, got 1"),
    (_set("seq_lens", lambda t: t.long()), "seq_lens must have dtype"),
    (_set("query_start_loc", lambda t: t[:2]), r"query_start_loc\.shape\[0\] must be 3, got 2"),
    (_set("scale", lambda s: float("nan")), "scale"),
    (_set("max_q_len", lambda s: -1), "max_q_len"),
    (lambda a: a.update(out=torch.empty(1, 4, 32, device=a["q"].device)), r"out must have the shape of q \[5, 4, 32\], got \[1, 4, 32\]"),
    (lambda a: a.update(out=torch.empty(5, 32, 4, device=a["q"].device).transpose(1, 2)), "out must be contiguous"),
])
def test_paged_attention_validation(device, mutate, match):
    args = _valid(device)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        paged_attention(**args)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a["block_tables"].__setitem__((1, 2), 999), r"block_tables\[1, 2\]"),
    (lambda a: a["block_tables"].__setitem__((0, 0), -1), r"block_tables\[0, 0\]"),
    (lambda a: a["seq_lens"].__setitem__(0, 1), r"seq_lens\[0\]"),
    (lambda a: (a["seq_lens"].__setitem__(1, 40), a.update(max_seq_len=40)), "block_tables has"),
    (lambda a: a["query_start_loc"].__setitem__(2, 4), "query_start_loc"),
    (lambda a: (a["query_start_loc"].__setitem__(1, 6), a.update(max_q_len=8)), "query_start_loc must be non-decreasing"),
    (lambda a: a.update(max_q_len=2), "max_q_len"),
    (lambda a: a.update(max_seq_len=19), "max_seq_len"),
])
def test_paged_attention_index_validation_on_cpu(mutate, match):
    args = _valid("cpu")
    mutate(args)
    with pytest.raises(ValueError, match=match):
        paged_attention(**args)


def test_cpu_head_dim_any_even_cuda_head_dim_checked():
    run_and_check([13, 30], [2, 5], 6, 3, 48, 8, torch.float32, "cpu")
    if torch.cuda.is_available():
        args = _valid("cuda")
        for key in ("q", "k_cache", "v_cache"):
            args[key] = torch.cat([args[key], args[key][..., :16]], -1).contiguous()
        with pytest.raises(ValueError, match="head_dim"):
            paged_attention(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_long_contexts(device, dtype):
    """Contexts long enough for the CPU's GEMM path (rows x keys >= 4096), ragged, mixed with short ones."""
    check_long_contexts(device, dtype)


def check_long_contexts(device, dtype):
    d = 64 if device == "cuda" else 32
    run_and_check([700, 517, 40, 1100], [1, 8, 3, 32], 8, 2, d, 16, dtype, device)


@pytest.mark.parametrize("variant", ["avx512", "avx512f", "avx2", "base"])
def test_cpu_kernel_variants(variant, monkeypatch):
    """Each CPU kernel variant (forced with TANDEM_RT_CPU_KERNELS): the AVX-512 register-blocked
    kernel (head_dim % 16 == 0; bf16 via vdpbf16ps where the CPU has it, or with avx512f converted
    to fp32 on load for decode), the portable per-key loops and
    the GEMM path for long verify blocks that the non-AVX-512 variants use."""
    monkeypatch.setenv("TANDEM_RT_CPU_KERNELS", variant)
    try:
        run_and_check([5], [1], 2, 1, 16, 8, torch.float32, "cpu")
    except ValueError as e:
        pytest.skip(f"this CPU cannot run the {variant} kernels: {e}")
    for d, dtype, P in ((16, torch.float32, 8), (48, torch.bfloat16, 16), (128, torch.float16, 32),
                        (128, torch.bfloat16, 16), (8, torch.float32, 16)):
        seq_lens = [1, P - 1, P + 1, 2 * P + 3, 131]
        for hq, hkv in ((4, 4), (8, 2), (8, 1)):
            run_and_check(seq_lens, [1] * 5, hq, hkv, d, P, dtype, "cpu")
            run_and_check(seq_lens, [1, 3, 0, 8, 17], hq, hkv, d, P, dtype, "cpu")
    run_and_check([700, 517, 40, 1100], [1, 8, 3, 32], 8, 2, 32, 16, torch.bfloat16, "cpu")


def test_cpu_kernel_variant_unknown(monkeypatch):
    monkeypatch.setenv("TANDEM_RT_CPU_KERNELS", "sse9")
    with pytest.raises(ValueError, match="TANDEM_RT_CPU_KERNELS"):
        run_and_check([5], [1], 2, 1, 16, 8, torch.float32, "cpu")



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_result_independent_of_thread_count(dtype):
    """Work items run in parallel on torch's threads (each item owns its output rows): 1, 2 and
    3 threads give bitwise the same output, decode and verify rows (lanes kernel) alike."""
    q, k_cache, v_cache, bt, sl, qsl = make_batch([300, 17, 129, 64], [1, 8, 3, 0], 8, 2, 64, 16, dtype, "cpu")
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(paged_attention(q, k_cache, v_cache, bt, sl, qsl, 0.125, 8, 300))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    ref = reference_attention(q, k_cache, v_cache, bt, sl, qsl, 0.125)
    tol = TOL[dtype]
    torch.testing.assert_close(outs[0].double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1e-6))

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_invariant_key_segments(dtype):
    """row_invariant=True splits sequences longer than 512 keys into 512-key segments merged in
    order: against the float64 reference (NaN pages beyond each length, a sequence of exactly one
    segment, one of 513 keys, decode and verify rows, an empty row block), bitwise the same on 1, 2
    and 3 threads, and each verify row equal to its decode."""
    from tandem_rt import ops

    seq_lens, q_lens = [1100, 512, 513, 2000, 700], [1, 4, 2, 6, 0]
    q, k_cache, v_cache, bt, sl, qsl = make_batch(seq_lens, q_lens, 9, 3, 64, 16, dtype, "cpu",
                                                  gen=torch.Generator().manual_seed(3))
    outs, old = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(ops.paged_attention(q, k_cache, v_cache, bt, sl, qsl, 0.125, 6, 2000, row_invariant=True))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert torch.isfinite(outs[0]).all()
    ref = reference_attention(q, k_cache, v_cache, bt, sl, qsl, 0.125)
    tol = TOL[dtype]
    torch.testing.assert_close(outs[0].double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1e-6))
    b, first = 3, int(qsl[3])   # the 2000-key sequence's verify rows, each decoded alone
    for t in range(q_lens[b]):
        pos = seq_lens[b] - q_lens[b] + t
        one = ops.paged_attention(q[first + t:first + t + 1].contiguous(), k_cache, v_cache, bt[b:b + 1],
                                  torch.tensor([pos + 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                                  0.125, 1, pos + 1, row_invariant=True)
        assert torch.equal(one[0], outs[0][first + t]), t


# ---- tensor-core kernel (kernel="mma"), CUDA only ------------------------------------------------
# paged_attention(kernel="mma") selects the mma.sync / cp.async kernel of
# csrc/kernels/paged_attention_mma.cu for fp16 / bf16 (fp32 keeps the SIMT kernel). The cases below
# rerun the reference comparisons above with it: the fixture makes this module's helpers call
# paged_attention with kernel="mma".
MMA_DTYPES = (torch.bfloat16, torch.float16)
mma_case = pytest.mark.usefixtures("mma_kernel")


@pytest.fixture
def mma_kernel(monkeypatch):
    import functools
    import sys

    monkeypatch.setattr(sys.modules[__name__], "paged_attention", functools.partial(paged_attention, kernel="mma"))


def _mma_params():
    """Every CUDA head_dim x {bf16, fp16} x page size 8/16/32."""
    for d in CUDA_HEAD_DIMS:
        for dtype in MMA_DTYPES:
            for page_size in (8, 16, 32):
                yield pytest.param(d, dtype, page_size, id=f"cuda-mma-d{d}-{str(dtype)[6:]}-p{page_size}")


@pytest.mark.cuda
@requires_cuda
@mma_case
@pytest.mark.parametrize("head_dim, dtype, page_size", list(_mma_params()))
def test_paged_attention_mma_matches_reference(head_dim, dtype, page_size):
    """As test_paged_attention_matches_reference: GQA 1/2/4/8, decode (one 16-row tile) and ragged
    verify blocks up to 2 * page_size + 3 queries (rows per KV head up to 67, several 32-row tiles)."""
    check_reference_cases("cuda", head_dim, dtype, page_size)


@pytest.mark.cuda
@requires_cuda
@mma_case
@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=["bf16", "fp16"])
def test_paged_attention_mma_long_context_and_split(dtype):
    """Several KV splits (fp32 partials + the SIMT combine kernel), decode and 32-row tiles."""
    check_long_context_and_split("cuda", dtype)


@pytest.mark.cuda
@requires_cuda
@mma_case
@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=["bf16", "fp16"])
def test_paged_attention_mma_long_contexts(dtype):
    check_long_contexts("cuda", dtype)


@pytest.mark.cuda
@requires_cuda
@mma_case
@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
def test_paged_attention_mma_ragged_gqa(head_dim, group, dtype):
    """Ragged verify blocks with q_len up to 32 for each GQA ratio, rows per KV head (q_len x group)
    at the kernel's tile boundaries: <= 16 (one m16 tile), exactly 16, in (16, 32] (one 32-row
    tile), > 32 (several row tiles); keys not a multiple of the 64-key tile; one empty block."""
    hkv = 2
    hq = hkv * group
    page_size = (8, 16, 32)[CUDA_HEAD_DIMS.index(head_dim)]
    seq_lens = [1, 17, 64, 65, 100, 129]
    for max_rows in (16, 32, 256):
        q_max = max(1, min(32, max_rows // group))
        q_lens = [1, min(17, q_max), 0, q_max, max(1, q_max // 3), q_max]
        run_and_check(seq_lens, q_lens, hq, hkv, head_dim, page_size, dtype, "cuda")
    run_and_check([3, 40], [1, 1], hq, hkv, head_dim, page_size, dtype, "cuda")  # decode only


@pytest.mark.cuda
@requires_cuda
@mma_case
@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=["bf16", "fp16"])
def test_paged_attention_mma_strided_q_and_scale(dtype):
    run_and_check([40, 9], [3, 1], 4, 2, 64, 8, dtype, "cuda", scale=0.37, q_view=True)
    run_and_check([300, 77], [20, 32], 16, 2, 128, 16, dtype, "cuda", scale=0.05, q_view=True)


@pytest.mark.cuda
@requires_cuda
@mma_case
def test_paged_attention_mma_fp32_uses_simt():
    """fp32 has no tensor-core kernel: with kernel="mma" it keeps the SIMT kernel."""
    run_and_check([40, 9], [3, 1], 4, 2, 64, 8, torch.float32, "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_kernel_and_waves_options(device, monkeypatch):
    """kernel / waves are explicit arguments, checked on every device (used on CUDA): the accepted
    values give the reference result (on CUDA several waves change the KV split), others raise
    ValueError naming the option, at the wrapper and at the op."""
    import functools
    import sys

    module = sys.modules[__name__]
    for kernel in ("simt", "mma"):
        for waves in (0, 1, 64):
            monkeypatch.setattr(module, "paged_attention",
                                functools.partial(paged_attention, kernel=kernel, waves=waves))
            run_and_check([300, 9], [4, 1], 8, 2, 64, 16, torch.bfloat16, device)
    monkeypatch.undo()
    args = _valid(device)
    with pytest.raises(ValueError, match="kernel must be one of"):
        paged_attention(**args, kernel="tensor")
    for bad in (-1, 1025, 2.0, True):
        with pytest.raises(ValueError, match="waves must be"):
            paged_attention(**args, waves=bad)
    out = torch.empty_like(args["q"])
    pos = [out, args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["seq_lens"],
           args["query_start_loc"], 0.1, 3, 20, False]
    with pytest.raises(ValueError, match="kernel must be 0"):
        torch.ops.tandem_rt.paged_attention(*pos, 2, 0)
    with pytest.raises(ValueError, match="waves must be in"):
        torch.ops.tandem_rt.paged_attention(*pos, 0, -3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (8, 8, 32), (4, 1, 24)])
@pytest.mark.parametrize("context", [40, 700])
def test_row_invariant_verify_rows_equal_their_decode(dtype, hq, hkv, d, context):
    """row_invariant=True (what the CPU engine passes): each row of a verify block is bit-identical to
    the same query decoded alone at its position, whatever kernel the block would otherwise take
    (rows in lanes, GEMM over long contexts); and it still matches the float64 reference."""
    from tandem_rt import ops

    g = torch.Generator().manual_seed(hq * 100 + d + context)
    P, S, q_len = (context + 15) // 16 + 1, 16, 6
    kc = torch.randn(P, S, hkv, d, generator=g).to(dtype)
    vc = torch.randn(P, S, hkv, d, generator=g).to(dtype)
    bt = torch.randperm(P, generator=g).to(torch.int32).view(1, P)
    q = torch.randn(q_len, hq, d, generator=g).to(dtype)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    block = ops.paged_attention(q, kc, vc, bt, i32(context), i32(0, q_len), d ** -0.5, q_len, context,
                                row_invariant=True)
    for t in range(q_len):
        pos = context - q_len + t
        one = ops.paged_attention(q[t:t + 1].contiguous(), kc, vc, bt, i32(pos + 1), i32(0, 1), d ** -0.5, 1,
                                  pos + 1, row_invariant=True)
        assert torch.equal(one[0], block[t]), t
    fast = ops.paged_attention(q, kc, vc, bt, i32(context), i32(0, q_len), d ** -0.5, q_len, context)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(block.float(), fast.float(), rtol=tol, atol=tol)
