"""CPU fused layer math (``tandem_rt.ops.rms_norm`` / ``silu_and_mul``) against plain PyTorch
written as the reference model computes it, on random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from tandem_rt.ops import linear_rows, rms_norm, silu_and_mul

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ref_rms_norm(x, w, eps):
    """tandem_rt.models.llama.RMSNorm: fp32 statistics, x / rms rounded to the dtype, times weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def use_variant(name: str, monkeypatch) -> str:
    """Force a kernel variant (TANDEM_RT_CPU_KERNELS); skip where this CPU cannot run it."""
    monkeypatch.setenv("TANDEM_RT_CPU_KERNELS", name)
    try:
        rms_norm(torch.ones(1, 2), torch.ones(2), 1e-6)
    except ValueError as e:
        pytest.skip(f"this CPU cannot run the {name} variant: {e}")
    return name


@pytest.fixture(params=["", "avx512", "avx2", "base"])
def variant(request, monkeypatch):
    """Each compiled variant of the row loops (TANDEM_RT_CPU_KERNELS; "" = the best this CPU runs)."""
    return use_variant(request.param, monkeypatch)


def ulps(dtype):
    return {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, d", [(1, 256), (5, 48), (300, 64), (0, 16), (3, 1)])
def test_rms_norm_matches_reference(dtype, rows, d, variant):
    g = torch.Generator().manual_seed(rows * 1000 + d)
    x = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == (rows, d)
    # one rounding step of the dtype apart at most (fp32 sums in a different order)
    torch.testing.assert_close(got.float(), ref_rms_norm(x, w, 1e-6).float(), rtol=2 * ulps(dtype), atol=1e-6)


def test_rms_norm_strided_rows_and_eps():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(7, 100, generator=g)
    x = wide[:, 10:74]                      # rows strided by 100
    w = torch.rand(64, generator=g) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 0.5), ref_rms_norm(x, w, 0.5), rtol=4e-6, atol=1e-6)
    zeros = torch.zeros(2, 64)
    assert torch.equal(rms_norm(zeros, w, 1e-6), torch.zeros(2, 64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inter", [(1, 704), (4, 352), (200, 96), (0, 8)])
def test_silu_and_mul_matches_reference(dtype, rows, inter, variant):
    g = torch.Generator().manual_seed(rows * 7 + inter)
    gu = (torch.randn(rows, 2 * inter, generator=g) * 6).to(dtype)   # both tails of the sigmoid
    got = silu_and_mul(gu)
    ref = F.silu(gu[:, :inter]) * gu[:, inter:]
    assert got.dtype == dtype and got.shape == (rows, inter)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 * ulps(dtype), atol=1e-6)


def test_nan_and_inf_propagate_as_in_torch():
    """bf16 rounding keeps NaN a NaN (not inf) and inf an inf."""
    x = torch.tensor([[1.0, float("nan"), 2.0, 3.0], [1.0, 2.0, float("inf"), 3.0]], dtype=torch.bfloat16)
    w = torch.ones(4, dtype=torch.bfloat16)
    got = rms_norm(x, w, 1e-6)
    assert torch.isnan(got[0]).all()       # a NaN row normalises to NaN, an inf row to [0, 0, NaN, 0]
    torch.testing.assert_close(got, ref_rms_norm(x, w, 1e-6), equal_nan=True, rtol=0, atol=0)
    gu = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    out = silu_and_mul(gu)
    assert torch.isnan(out[0, 0]) and out[0, 1].item() == pytest.approx(F.silu(torch.tensor(1.0)).item() * 3, rel=1e-2)


def test_silu_and_mul_extremes_and_strided_rows():
    x = torch.tensor([[-200.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 200.0, 88.0,
                       1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    got = silu_and_mul(x)
    ref = F.silu(x[:, :8]) * x[:, 8:]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=4e-6, atol=1e-6)
    wide = torch.randn(5, 40)
    torch.testing.assert_close(silu_and_mul(wide[:, 4:36]), F.silu(wide[:, 4:20]) * wide[:, 20:36],
                               rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-6), "x must be float32, float16 or bfloat16, got Double"),
    (lambda: rms_norm(torch.randn(2, 3, 8), torch.ones(8), 1e-6), "x must have 2 dimensions"),
    (lambda: rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6), r"weight\.shape\[0\] must be 8, got 7"),
    (lambda: rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6), "weight must have dtype"),
    (lambda: rms_norm(torch.randn(2, 8), torch.ones(8), float("nan")), "eps"),
    (lambda: rms_norm(torch.randn(8, 2).t(), torch.ones(8), 1e-6), "contiguous last dim"),
    (lambda: silu_and_mul(torch.randn(2, 7)), "must be even"),
    (lambda: silu_and_mul(torch.randn(2, 8, 2)), "gate_up must have 2 dimensions"),
])
def test_layer_math_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cpp_ops_validate_too():
    """The engine calls the raw ops: their own checks name the argument."""
    with pytest.raises(ValueError, match="weight.shape\\[0\\] must be 8"):
        torch.ops.tandem_rt.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="gate_up.shape\\[1\\] must be even"):
        torch.ops.tandem_rt.silu_and_mul(torch.randn(2, 7))


# ---- linear_rows: bf16 / fp32 products of a few rows with an [out, in] weight (CPU) --------------

def ref_linear_rows(x, w, add):
    """fp64 product of the inputs, rounded once to their dtype (what one fp32-accumulated GEMM gives)."""
    out = x.double() @ w.double().t()
    if add is not None:
        out = out + add.double()
    return out.to(x.dtype)


@pytest.fixture(params=["", "avx512", "avx512f", "avx2", "base"])
def rows_variant(request, monkeypatch):
    """Each variant of linear_rows / linear_rows_q: "avx512" (vdpbf16ps / VNNI where the CPU has
    them), "avx512f" (AVX-512 FMAs on fp32), "avx2", "base"; "" = the best this CPU runs."""
    return use_variant(request.param, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11, 17])
@pytest.mark.parametrize("k, n", [(256, 384), (72, 300), (704, 257), (32, 8192), (17, 9), (1, 3)])
@pytest.mark.parametrize("add_kind", [None, "bias", "residual"])
def test_linear_rows_matches_reference(dtype, rows, k, n, add_kind, rows_variant):
    g = torch.Generator().manual_seed(rows * 100 + k + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    add = {None: None, "bias": torch.randn(n, generator=g).to(dtype),
           "residual": torch.randn(rows, n, generator=g).to(dtype)}[add_kind]
    got = torch.ops.tandem_rt.linear_rows(x, w, add)
    ref = ref_linear_rows(x, w, add)
    assert got.dtype == dtype and got.shape == (rows, n)
    # fp32 accumulation in another order: within one rounding step of the exact product (bf16), or
    # the fp32 accumulation error of a K-term sum (fp32)
    tol = dict(rtol=2 ** -7, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_rows_row_results_do_not_depend_on_the_other_rows(dtype, rows_variant):
    """The engine relies on this for lossless speculation: a row's logits in a verify block are
    bit-identical to the same row's decode."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 200, generator=g).to(dtype)
    w = torch.randn(70, 200, generator=g).to(dtype)
    add = torch.randn(13, 70, generator=g).to(dtype)
    full = torch.ops.tandem_rt.linear_rows(x, w, add)
    for m in (1, 3, 8):
        assert torch.equal(torch.ops.tandem_rt.linear_rows(x[:m], w, add[:m]), full[:m])
    assert torch.equal(torch.ops.tandem_rt.linear_rows(x[12:], w, add[12:]), full[12:])


def test_linear_rows_strided_rows_and_empty():
    x = torch.randn(4, 100).bfloat16()[:, 10:74]          # rows strided by 100
    w = torch.randn(40, 64).bfloat16()
    torch.testing.assert_close(linear_rows(x, w).float(),
                               ref_linear_rows(x, w, None).float(), rtol=2 ** -7, atol=1e-3)
    assert torch.ops.tandem_rt.linear_rows(torch.zeros(0, 64).bfloat16(), w, None).shape == (0, 40)


@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randn(2, 8), torch.randn(4, 8).bfloat16(), None), "w must have dtype"),
    (lambda: (torch.randn(2, 8).half(), torch.randn(4, 8).half(), None), "x must be bfloat16 or float32"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(4)), "add must have dtype"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(4, 7).bfloat16(), None), "w.shape\\[1\\] must be 8"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(8, 4).bfloat16().t(), None), "w must be contiguous"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(5).bfloat16()), "add must have N"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(3, 4).bfloat16()),
     "add.shape\\[0\\] must be 2"),
])
def test_linear_rows_validation(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.tandem_rt.linear_rows(*args())


@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randn(2, 8), torch.randn(4, 8).bfloat16(), None), "w must have dtype"),
    (lambda: (torch.randn(2, 8).half(), torch.randn(4, 8).half(), None), "x must be bfloat16 or float32, got Half"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(4, 7).bfloat16(), None), r"w\.shape\[1\] must be 8, got 7"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(3, 4).bfloat16()),
     r"add\.shape\[0\] must be 2, got 3"),
])
def test_linear_rows_wrapper_validation(args, match):
    with pytest.raises(ValueError, match=match):
        linear_rows(*args())


# ---- linear_rows_q: few-row products with GGUF block-quantized weights (CPU) ----------------------

def gguf_blocks(w: torch.Tensor, qtype: str):
    """(uint8 blocks [N, K/32 * bytes], the float64 weights they stand for) by the gguf package's
    own quantize / dequantize (an independent reference)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    t = getattr(GGMLQuantizationType, qtype)
    q = quants.quantize(w.numpy().astype(np.float32), t)
    return torch.from_numpy(q.copy()), torch.from_numpy(quants.dequantize(q, t).astype(np.float64))


def int8_kernel(variant: str) -> bool:
    """Whether linear_rows_q runs its AVX-512 VNNI int8-activation kernel in this variant."""
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    return variant in ("", "avx512") and "avx512_vnni" in flags


def parse_blocks(blocks: torch.Tensor, qtype: str):
    """GGUF blocks [N, nb * bytes] -> (d [N, nb], additive coefficient a [N, nb] (Q4_1: m, Q4_0:
    -8 d, Q8_0: 0), q [N, nb, 32] stored integers) in float64, read from the documented format."""
    import numpy as np

    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
    b = blocks.numpy().reshape(blocks.shape[0], -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype == "Q8_0":
        q = b[..., 2:34].copy().view(np.int8).astype(np.float64)
        a = np.zeros_like(d)
    else:
        qs = b[..., (4 if qtype == "Q4_1" else 2):]
        q = np.concatenate([qs & 15, qs >> 4], -1).astype(np.float64)
        a = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64) if qtype == "Q4_1" else -8 * d
    return torch.from_numpy(d), torch.from_numpy(a), torch.from_numpy(q)


def ref_int8_activations(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """float64 reference of the documented int8-activation scheme: per block of 32, dx = max|x| / 127
    and xq = round-half-even(x / dx) clamped to [-127, 127] in fp32, sx = sum x; output
    sum_j d_j dx_j sum(q xq) + a_j sx_j."""
    M, K = x.shape
    xb = x.float().reshape(M, K // 32, 32)
    dx = xb.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    xq = torch.round(xb * inv[..., None]).clamp(-127, 127).double()
    sx = xb.double().sum(-1)
    d, a, q = parse_blocks(blocks, qtype)
    dots = torch.einsum("mjk,njk->mnj", xq, q)
    return (dots * d[None] * dx.double()[:, None]).sum(-1) + (sx[:, None] * a[None]).sum(-1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("k, n", [(576, 37), (32, 9), (1536, 12), (96, 5)])
@pytest.mark.parametrize("add_kind", [None, "bias", "residual"])
def test_linear_rows_q_matches_dequantized_reference(qtype, dtype, rows, k, n, add_kind, rows_variant):
    """fp32 variants: against the float64 product with the gguf package's dequantized weights.
    The VNNI variant (int8 activations): against the float64 reference of its documented scheme,
    and within the int8 rounding of the exact product."""
    from tandem_rt.ops import linear_rows_q

    g = torch.Generator().manual_seed(rows * 31 + k + n)
    w = torch.randn(n, k, generator=g) * 0.05 + 0.01 * torch.randn(n, 1, generator=g)  # offsets: Q4_1's min
    blocks, w_ref = gguf_blocks(w, qtype)
    x = torch.randn(rows, k, generator=g).to(dtype)
    add = {None: None, "bias": torch.randn(n, generator=g).to(dtype),
           "residual": torch.randn(rows, n, generator=g).to(dtype)}[add_kind]
    got = linear_rows_q(x, blocks, qtype, add)
    exact = x.double() @ w_ref.t() + (add.double() if add is not None else 0)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = dict(rtol=2 ** -7, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    if int8_kernel(rows_variant):
        ref = ref_int8_activations(x, blocks, qtype) + (add.double() if add is not None else 0)
        torch.testing.assert_close(got.double(), ref.to(dtype).double(), **tol)
        # int8 activations: each x element off by at most max|x| / 254 of its block
        scale = (x.double().abs() @ w_ref.abs().t()).clamp_min(1e-6)
        assert float(((got.double() - exact).abs() / scale).max()) < 0.05
    else:
        torch.testing.assert_close(got.double(), exact.to(dtype).double(), **tol)
    # a row's result does not depend on the other rows
    assert torch.equal(linear_rows_q(x[-1:], blocks, qtype, add[-1:] if add_kind == "residual" else add), got[-1:])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_linear_rows_q_non_finite_rows_reach_the_output(qtype, bad, rows_variant):
    """A NaN or inf in one row of x makes that row's outputs non-finite in every variant (the int8
    activations must not quantize it away) and leaves the other rows as they are computed alone."""
    from tandem_rt.ops import linear_rows_q

    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 96, generator=g) * 0.05
    blocks, _ = gguf_blocks(w, qtype)
    x = torch.randn(3, 96, generator=g)
    x[1, 40] = bad
    got = linear_rows_q(x, blocks, qtype)
    assert not torch.isfinite(got[1]).any()
    for r in (0, 2):
        assert torch.equal(got[r], linear_rows_q(x[r:r + 1], blocks, qtype)[0])
        assert torch.isfinite(got[r]).all()


def test_linear_rows_q_fp16_scales_subnormal_and_extreme(rows_variant):
    """Block scales that are fp16 subnormals, zeros and large values decode exactly as gguf does."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from tandem_rt.ops import linear_rows_q

    n, k = 6, 64
    blocks = np.zeros((n, k // 32 * 34), dtype=np.uint8)
    rng = np.random.default_rng(0)
    scales = np.array([6e-8, 3e-5, 0.0, 1.0, 60000.0, -2.5, 1e-7, 0.125, 7.0, -6e-5, 0.5, 1e-3], dtype=np.float16)
    for r in range(n):
        for b in range(k // 32):
            off = b * 34
            blocks[r, off:off + 2] = np.frombuffer(scales[(r * 2 + b) % len(scales)].tobytes(), dtype=np.uint8)
            blocks[r, off + 2:off + 34] = rng.integers(-128, 128, 32).astype(np.int8).view(np.uint8)
    w_ref = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType.Q8_0).astype(np.float64))
    x = torch.randn(3, k, dtype=torch.float64).float()
    got = linear_rows_q(x, torch.from_numpy(blocks), "Q8_0")
    if int8_kernel(rows_variant):
        torch.testing.assert_close(got.double(), ref_int8_activations(x, torch.from_numpy(blocks), "Q8_0"),
                                   rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(got.double(), (x.double() @ w_ref.t()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randn(2, 64), torch.zeros(3, 68, dtype=torch.uint8), "Q5_K"), "qtype must be one of"),
    (lambda: (torch.randn(2, 48), torch.zeros(3, 51, dtype=torch.uint8), "Q8_0"), "multiple of the block size"),
    (lambda: (torch.randn(2, 64), torch.zeros(3, 40, dtype=torch.uint8), "Q8_0"), r"w\.shape\[1\] must be 68, got 40"),
    (lambda: (torch.randn(2, 64), torch.zeros(3, 68, dtype=torch.int8), "Q8_0"), "w must have dtype"),
    (lambda: (torch.randn(2, 64).half(), torch.zeros(3, 68, dtype=torch.uint8), "Q8_0"), "x must be bfloat16 or float32, got Half"),
])
def test_linear_rows_q_validation(args, match):
    from tandem_rt.ops import linear_rows_q

    with pytest.raises(ValueError, match=match):
        linear_rows_q(*args())


@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randn(2, 64), torch.zeros(3, 68, dtype=torch.uint8), 7), "qtype must be 0"),
    (lambda: (torch.randn(2, 48), torch.zeros(3, 51, dtype=torch.uint8), 0), "multiple of the block size"),
    (lambda: (torch.randn(2, 64), torch.zeros(3, 40, dtype=torch.uint8), 0), "w.shape\\[1\\] must be 68"),
])
def test_linear_rows_q_op_validation(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.tandem_rt.linear_rows_q(*args())


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 32])
@pytest.mark.parametrize("k, n", [(576, 37), (1536, 12), (32, 5)])
@pytest.mark.parametrize("add_kind", [None, "bias", "residual"])
def test_linear_rows_q_cuda_matches_dequantized_reference(qtype, dtype, rows, k, n, add_kind):
    """The CUDA kernel (kernels/linear_rows_q.cuh) against the float64 product with the gguf
    package's dequantized weights; strided x rows."""
    from tandem_rt.ops import linear_rows_q

    g = torch.Generator().manual_seed(rows * 31 + k + n)
    w = torch.randn(n, k, generator=g) * 0.05 + 0.01 * torch.randn(n, 1, generator=g)
    blocks, w_ref = gguf_blocks(w, qtype)
    x = torch.randn(rows, k + 8, generator=g).to(dtype)[:, :k]
    add = {None: None, "bias": torch.randn(n, generator=g).to(dtype),
           "residual": torch.randn(rows, n, generator=g).to(dtype)}[add_kind]
    got = linear_rows_q(x.cuda(), blocks.cuda(), qtype, None if add is None else add.cuda())
    exact = x.double() @ w_ref.t() + (add.double() if add is not None else 0)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == (rows, n)
    tol = dict(rtol=2 ** -7, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu().double(), exact.to(dtype).double(), **tol)


# ---- linear_rows_q16: the same products on weights repacked 16 outputs at a time ----------------

@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 8, 11])   # every register tile of the kernels (AVX2: 1-2 rows
@pytest.mark.parametrize("k, n", [(576, 48), (32, 16), (96, 80)])   # both halves, 3-4 one half at a time,
@pytest.mark.parametrize("add_kind", [None, "bias", "residual"])    # chunks of 4 in passes of 8)
def test_linear_rows_q16_matches_the_block_scheme(qtype, dtype, rows, k, n, add_kind, rows_variant):
    """pack_rows16 + linear_rows_q16: VNNI and AVX2 variants against the float64 reference of the documented
    int8-activation scheme (read from the unpacked GGUF blocks), portable loops against the float64
    product with the gguf package's dequantized weights; a row's result independent of the others."""
    from tandem_rt.quantized import pack_rows16

    g = torch.Generator().manual_seed(rows * 17 + k + n)
    w = torch.randn(n, k, generator=g) * 0.05 + 0.01 * torch.randn(n, 1, generator=g)
    blocks, w_ref = gguf_blocks(w, qtype)
    packed = pack_rows16(blocks, qtype)
    assert packed.shape == (n // 16, k // 32 * (544 if qtype == "Q8_0" else 320))
    from tandem_rt.quantized import unpack_rows16
    assert torch.equal(unpack_rows16(packed, qtype), blocks)
    x = torch.randn(rows, k, generator=g).to(dtype)
    add = {None: None, "bias": torch.randn(n, generator=g).to(dtype),
           "residual": torch.randn(rows, n, generator=g).to(dtype)}[add_kind]
    code = {"Q8_0": 0, "Q4_1": 2}[qtype]
    got = torch.ops.tandem_rt.linear_rows_q16(x, packed, code, add)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = dict(rtol=2 ** -7, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    extra = add.double() if add is not None else 0
    from tandem_rt._ext import _C

    if _C.cpu_kernels()["int8_packed_rows"]:   # VNNI, or the AVX2 kernel (also under avx512f): one int8 scheme
        ref = ref_int8_activations(x, blocks, qtype) + extra
    else:
        ref = x.double() @ w_ref.t() + extra
    torch.testing.assert_close(got.double(), ref.to(dtype).double(), **tol)
    one = torch.ops.tandem_rt.linear_rows_q16(x[-1:], packed, code, add[-1:] if add_kind == "residual" else add)
    assert torch.equal(one, got[-1:])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_linear_rows_q16_non_finite_rows_reach_the_output(qtype, bad, rows_variant):
    """A NaN or inf in one row of x makes that row's outputs non-finite (the int8 kernels must not
    quantize it away) and leaves the other rows as they are computed alone."""
    from tandem_rt.quantized import pack_rows16

    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 96, generator=g) * 0.05
    blocks, _ = gguf_blocks(w, qtype)
    packed = pack_rows16(blocks, qtype)
    code = {"Q8_0": 0, "Q4_1": 2}[qtype]
    x = torch.randn(3, 96, generator=g)
    x[1, 40] = bad
    got = torch.ops.tandem_rt.linear_rows_q16(x, packed, code, None)
    assert not torch.isfinite(got[1]).any()
    for r in (0, 2):
        assert torch.equal(got[r], torch.ops.tandem_rt.linear_rows_q16(x[r:r + 1], packed, code, None)[0])
        assert torch.isfinite(got[r]).all()


def test_pack_rows16_and_linear_rows_q16_validation():
    from tandem_rt.quantized import pack_rows16

    with pytest.raises(ValueError, match="packs Q8_0, Q4_1"):
        pack_rows16(torch.zeros(16, 18, dtype=torch.uint8), "Q4_0")
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_rows16(torch.zeros(12, 20, dtype=torch.uint8), "Q4_1")
    with pytest.raises(ValueError, match="qtype must be 0"):
        torch.ops.tandem_rt.linear_rows_q16(torch.randn(2, 64), torch.zeros(1, 640, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match=r"w.shape\[1\] must be 640"):
        torch.ops.tandem_rt.linear_rows_q16(torch.randn(2, 64), torch.zeros(1, 600, dtype=torch.uint8), 2)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_packed_only_matrix_serves_every_path(qtype):
    """A QuantMatrix that keeps only its packed layout: few-row products by linear_rows_q16, more
    rows (dequantised from the unpacked blocks), row slices (packed on groups of 16, else block rows)
    and embedding lookups all equal those of the block rows."""
    from tandem_rt.quantized import QUANT_ROWS_MAX, embedding_rows, make_quant_matrix, quant_mm, with_packed

    g = torch.Generator().manual_seed(3)
    blocks, _ = gguf_blocks(torch.randn(48, 96, generator=g) * 0.05, qtype)
    full = make_quant_matrix(blocks, qtype, 96)
    packed = with_packed(full, keep_blocks=False)
    assert packed.blocks is None and packed.out_features == 48 and packed.nbytes == blocks.nbytes
    many = torch.randn(QUANT_ROWS_MAX + 6, 96, generator=g)
    assert torch.equal(quant_mm(many, packed), quant_mm(many, full))
    few = many[:3]
    assert torch.equal(quant_mm(few, packed), torch.ops.tandem_rt.linear_rows_q16(few, packed.packed, {"Q8_0": 0, "Q4_1": 2}[qtype], None))
    part = packed.rows(16, 32)     # on groups of 16: a slice of the packed layout
    assert part.blocks is None and torch.equal(part.block_rows(), blocks[16:32])
    assert torch.equal(packed.rows(8, 24).blocks, blocks[8:24])
    ids = torch.tensor([0, 47, 5])
    assert torch.equal(embedding_rows(packed, ids, torch.float32), embedding_rows(full, ids, torch.float32))


# ---- embedding_rows_q: rows of a quantized embedding table (CPU) ----------------------------------

@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [32, 96, 576])
def test_embedding_rows_q_matches_gguf_dequantize(qtype, dtype, k):
    """The op's rows equal the gguf package's dequantisation (numpy fp32, Q4_1 as d * q + m) of the
    selected rows, rounded once to the dtype; the engine's embedding_rows calls it on the CPU."""
    import tandem_rt.ops
    from tandem_rt.ops.layer_math import QUANT_TYPES
    from tandem_rt.quantized import QuantMatrix, embedding_rows

    g = torch.Generator().manual_seed(k)
    w = torch.randn(41, k, generator=g) * torch.logspace(-3, 1, 41).unsqueeze(1)
    blocks, ref = gguf_blocks(w, qtype)
    ids = torch.tensor([0, 40, 7, 7, 13, 0, 39], dtype=torch.int64)
    want = ref.index_select(0, ids).float().to(dtype)
    got = torch.ops.tandem_rt.embedding_rows_q(blocks, ids, QUANT_TYPES[qtype][0], dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(tandem_rt.ops.embedding_rows_q(blocks, ids, qtype, dtype), want)
    assert torch.equal(embedding_rows(QuantMatrix(blocks, qtype, k), ids, dtype), want)
    empty = torch.ops.tandem_rt.embedding_rows_q(blocks, ids[:0], QUANT_TYPES[qtype][0], dtype)
    assert empty.shape == (0, k)


def test_embedding_rows_q_validation():
    from tandem_rt._ext import _C
    from tandem_rt.ops import embedding_rows_q

    blocks = torch.zeros(4, 68, dtype=torch.uint8)   # 4 rows of 2 Q8_0 blocks (64 weights)
    ids = torch.tensor([0, 3])
    assert _C.cpu.embedding_rows_q(blocks, ids, 0, torch.float32).shape == (2, 64)
    for args, match in [((blocks, torch.tensor([4]), 0, torch.float32), r"ids\[0\] = 4"),
                        ((blocks, torch.tensor([-1]), 0, torch.float32), r"ids\[0\] = -1"),
                        ((blocks, ids.int(), 0, torch.float32), "ids"),
                        ((blocks, ids.view(2, 1), 0, torch.float32), "ids"),
                        ((blocks, ids, 3, torch.float32), "qtype"),
                        ((blocks, ids, 2, torch.float32), "blocks"),     # 68 bytes is not whole Q4_1 blocks
                        ((blocks.to(torch.int8), ids, 0, torch.float32), "table"),
                        ((blocks[:, :67], ids, 0, torch.float32), "table"),
                        ((blocks, ids, 0, torch.int32), "dtype")]:
        with pytest.raises(ValueError, match=match):
            _C.cpu.embedding_rows_q(*args)
        with pytest.raises(ValueError, match=match):
            torch.ops.tandem_rt.embedding_rows_q(*args)
    with pytest.raises(ValueError, match="qtype"):
        embedding_rows_q(blocks, ids, "Q5_K", torch.float32)
