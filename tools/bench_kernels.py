#!/usr/bin/env python
"""Time the paged-KV-cache ops on the current device over realistic shapes.

Every benchmark is a function in ``BENCHMARKS`` that yields result rows; add new ops (sampling,
verification, ...) by writing another ``@benchmark`` function. Each row records the op's median
time, the bytes it must move, the achieved GB/s next to the device-to-device copy bandwidth
measured in the same run, and, where one exists, the time of an outside reference on the same
shapes (``torch.nn.functional.scaled_dot_product_attention`` on contiguous K/V).

    python tools/bench_kernels.py                 # CUDA if present, else CPU
    python tools/bench_kernels.py --device cpu --quick --out runs/bench_kernels-cpu.json

Timing: medians over repetitions after warm-up; CUDA events on the GPU, perf_counter on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tandem_rt.ops import (copy_pages, make_rng_state, paged_attention, rms_norm, rope_cache_write, sample,  # noqa: E402
                           sampling_params, silu_and_mul, verify)

HQ, HKV, HEAD_DIM, PAGE_SIZE, ROPE_THETA = 32, 8, 128, 16, 10000.0


@dataclass
class Context:
    device: torch.device
    dtypes: list
    batches: list
    contexts: list
    q_lens: list
    min_time: float
    copy_gbps: float = 0.0
    last_min: float = 0.0
    quick: bool = False
    pa_kernel: str = "simt"      # paged_attention(kernel=...) on CUDA
    pa_waves: int = 0            # paged_attention(waves=...) on CUDA (0: the default)
    row_invariant: bool = False  # paged_attention(row_invariant=...)
    rows: list = field(default_factory=list)


BENCHMARKS = []


def benchmark(fn):
    BENCHMARKS.append(fn)
    return fn


def time_fn(fn, ctx: Context) -> float:
    """Median seconds per call (the minimum is kept in ctx.last_min: robust on a shared machine)."""
    fn()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 1e3, 1e-6)
        reps = int(min(200, max(5, ctx.min_time / est)))
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        ctx.last_min = min(times)
        return statistics.median(times)
    times, total = [], 0.0
    while (total < ctx.min_time or len(times) < 3) and len(times) < 200:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        total += times[-1]
    ctx.last_min = min(times)
    return statistics.median(times)


def measure_copy_bandwidth(ctx: Context) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    nbytes = (512 << 20) if ctx.device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), ctx)
    return 2 * nbytes / t / 1e9


def measure_read_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 5) -> float:
    """GB/s of a streaming read (``torch.sum`` of an fp32 buffer larger than the caches: 1 GiB on
    the CPU, whose last-level cache may be hundreds of MB; 4 GiB on CUDA), median of ``reps`` after
    one warm-up, with torch's current thread count. The bound a weight-streaming decode step is
    measured against (bytes of weights per step / step time)."""
    nbytes = nbytes or ((4 << 30) if device.type == "cuda" else (1 << 30))
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    buf.sum()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        buf.sum()
        sync()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def make_paged(batch, context, dtype, device, q_len, gen):
    pages_per_seq = math.ceil(context / PAGE_SIZE)
    num_pages = batch * pages_per_seq
    # generated on the device itself: a 64 x 16k context is gigabytes of K/V
    k_cache = torch.randn(num_pages, PAGE_SIZE, HKV, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.randn(num_pages, PAGE_SIZE, HKV, HEAD_DIM, device=device, dtype=dtype)
    block_tables = torch.randperm(num_pages, generator=gen).view(batch, pages_per_seq).int().to(device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    qsl = (torch.arange(batch + 1, dtype=torch.int32) * q_len).to(device)
    q = torch.randn(batch * q_len, HQ, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    return q, k_cache, v_cache, block_tables, seq_lens, qsl


def contiguous_kv(k_cache, block_tables, batch, context):
    """[B, Hkv, S, D] contiguous copy of the paged cache (what SDPA gets)."""
    pages = k_cache[block_tables.long()]  # [B, pages, P, Hkv, D]
    return pages.reshape(batch, -1, HKV, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()


def add_row(ctx, op, dtype, shape, seconds, nbytes, ref_seconds=None, ref_name=None, min_s=None, ref_min_s=None):
    gbps = nbytes / seconds / 1e9
    row = dict(op=op, dtype=str(dtype).replace("torch.", ""), **shape, time_us=seconds * 1e6, bytes=nbytes,
               gbps=gbps, pct_copy=100 * gbps / ctx.copy_gbps if ctx.copy_gbps else None,
               min_time_us=(min_s or ctx.last_min) * 1e6)
    if ref_seconds is not None:
        row.update(ref=ref_name, ref_time_us=ref_seconds * 1e6, ratio_vs_ref=seconds / ref_seconds,
                   ref_min_time_us=ref_min_s * 1e6, min_ratio_vs_ref=min_s / ref_min_s)
    ctx.rows.append(row)
    return row


@benchmark
def bench_paged_attention(ctx: Context):
    gen = torch.Generator().manual_seed(0)
    for dtype in ctx.dtypes:
        for batch in ctx.batches:
            for context in ctx.contexts:
                for q_len in ctx.q_lens:
                    q, kc, vc, bt, sl, qsl = make_paged(batch, context, dtype, ctx.device, q_len, gen)
                    out = torch.empty_like(q)
                    scale = HEAD_DIM ** -0.5
                    t = time_fn(lambda: paged_attention(q, kc, vc, bt, sl, qsl, scale, q_len, context, out=out,
                                                        row_invariant=ctx.row_invariant, kernel=ctx.pa_kernel,
                                                        waves=ctx.pa_waves), ctx)
                    t_min = ctx.last_min
                    kv_bytes = 2 * batch * context * HKV * HEAD_DIM * kc.element_size()
                    nbytes = kv_bytes + 2 * q.numel() * q.element_size() + bt.numel() * 4
                    k_ref, v_ref = contiguous_kv(kc, bt, batch, context), contiguous_kv(vc, bt, batch, context)
                    q_ref = q.view(batch, q_len, HQ, HEAD_DIM).transpose(1, 2).contiguous()
                    mask = None
                    if q_len > 1:  # query t at position context - q_len + t (bottom-right causal)
                        pos = context - q_len + torch.arange(q_len, device=ctx.device)
                        mask = torch.arange(context, device=ctx.device)[None, :] <= pos[:, None]
                    t_ref = time_fn(lambda: F.scaled_dot_product_attention(q_ref, k_ref, v_ref, attn_mask=mask,
                                                                           scale=scale, enable_gqa=True), ctx)
                    op = "paged_attention" if ctx.pa_kernel == "simt" else f"paged_attention {ctx.pa_kernel}"
                    op += " row_invariant" if ctx.row_invariant else ""
                    yield add_row(ctx, op, dtype, dict(batch=batch, context=context, q_len=q_len),
                                  t, nbytes, t_ref, "sdpa_contiguous", t_min, ctx.last_min)
                    del q, kc, vc, k_ref, v_ref, q_ref


@benchmark
def bench_rope_cache_write(ctx: Context):
    gen = torch.Generator().manual_seed(1)
    for dtype in ctx.dtypes:
        for batch in ctx.batches:
            for q_len in ctx.q_lens:
                n = batch * q_len
                k = torch.randn(n, HKV, HEAD_DIM, generator=gen).to(ctx.device, dtype)
                v = torch.randn(n, HKV, HEAD_DIM, generator=gen).to(ctx.device, dtype)
                q = torch.randn(n, HQ, HEAD_DIM, generator=gen).to(ctx.device, dtype)
                kc = torch.zeros(max(1, n // PAGE_SIZE + 1), PAGE_SIZE, HKV, HEAD_DIM, device=ctx.device, dtype=dtype)
                vc = torch.zeros_like(kc)
                pos = torch.arange(n, device=ctx.device) + 1000
                slots = torch.arange(n, device=ctx.device)
                t = time_fn(lambda: rope_cache_write(k, v, pos, slots, kc, vc, ROPE_THETA, q=q), ctx)
                nbytes = (2 * (q.numel() + k.numel()) + 2 * v.numel() + k.numel()) * k.element_size()
                yield add_row(ctx, "rope_cache_write", dtype, dict(batch=batch, context=0, q_len=q_len), t, nbytes)


@benchmark
def bench_copy_pages(ctx: Context):
    """Copy-on-write of a few pages in every layer of two pools (e.g. 32 + 4 layers, K and V)."""
    layers = 2 * (32 + 4)
    num_pages = 64
    for dtype in ctx.dtypes:
        for pairs in (1, 16):
            caches = [torch.zeros(num_pages, PAGE_SIZE, HKV, HEAD_DIM, device=ctx.device, dtype=dtype)
                      for _ in range(layers)]
            src = torch.arange(pairs, device=ctx.device, dtype=torch.int64)
            dst = src + num_pages // 2
            t = time_fn(lambda: copy_pages(caches, src, dst), ctx)
            page_bytes = PAGE_SIZE * HKV * HEAD_DIM * caches[0].element_size()
            yield add_row(ctx, "copy_pages", dtype, dict(batch=pairs, context=layers, q_len=0), t,
                          2 * pairs * layers * page_bytes)
            del caches


@benchmark
def bench_layer_math(ctx: Context):
    """CPU only: rms_norm and silu_and_mul against torch's ops (F.rms_norm; F.silu(g) * u) on the
    shapes of a decode / verify step and a prefill chunk of a 4096-wide model (hot cache), and
    linear_rows against torch's bf16 addmm (context column = out * 10000 + in)."""
    if ctx.device.type != "cpu":
        return
    d, inter = 4096, 11008
    for dtype in ctx.dtypes:
        for rows in (1, 8, 512):
            x = torch.randn(rows, d, dtype=dtype)
            w = torch.rand(d, dtype=dtype) + 0.5
            t = time_fn(lambda: rms_norm(x, w, 1e-6), ctx)
            t_min = ctx.last_min
            r = time_fn(lambda: F.rms_norm(x, (d,), w, 1e-6), ctx)
            yield add_row(ctx, "rms_norm", dtype, dict(batch=rows, context=d, q_len=0), t, 2 * x.nbytes,
                          r, "F.rms_norm", t_min, ctx.last_min)
            gu = torch.randn(rows, 2 * inter, dtype=dtype)
            t = time_fn(lambda: silu_and_mul(gu), ctx)
            t_min = ctx.last_min
            r = time_fn(lambda: F.silu(gu[:, :inter]) * gu[:, inter:], ctx)
            yield add_row(ctx, "silu_and_mul", dtype, dict(batch=rows, context=inter, q_len=0), t,
                          gu.nbytes * 3 // 2, r, "F.silu*mul", t_min, ctx.last_min)

    # linear_rows (bf16 and fp32): the default model's (SmolLM2-135M) weight shapes ([out, in]), 30
    # copies of each (one per layer: larger than the caches, as in a forward); reference torch's
    # addmm on the same weights stored contiguous [in, out] (its best layout for few rows: what the
    # engine used before linear_rows). context column = out * 10000 + in.
    for dtype in ctx.dtypes:
        shapes = ((3072, 576), (576, 1536), (960, 576)) if not ctx.quick else ((3072, 576),)
        for n, k in shapes:
            ws = [torch.randn(n, k).to(dtype) for _ in range(30)]
            wts = [w.t().contiguous() for w in ws]
            for rows in ((1, 4, 8, 16, 32) if not ctx.quick else (1, 8, 32)):
                x = torch.randn(rows, k).to(dtype)
                add = torch.randn(rows, n).to(dtype)
                t = time_fn(lambda: [torch.ops.tandem_rt.linear_rows(x, w, add) for w in ws], ctx)
                t_min = ctx.last_min
                r = time_fn(lambda: [torch.addmm(add, x, wt) for wt in wts], ctx)
                yield add_row(ctx, "linear_rows x30", dtype, dict(batch=rows, context=n * 10000 + k, q_len=0),
                              t, 30 * ws[0].nbytes, r, "torch.addmm", t_min, ctx.last_min)


@benchmark
def bench_linear_rows_q(ctx: Context):
    """CPU: linear_rows_q on GGUF Q4_1 / Q8_0 blocks of the default model's gate/up weight
    shape (3072 x 576, 150 copies: larger than the caches) against linear_rows on the same weights
    in bf16 (the dequantised copy the engine streams otherwise), and linear_rows_q16 on the same
    blocks repacked 16 outputs at a time against linear_rows_q. CUDA: linear_rows_q on an 8B-class
    MLP weight (14336 x 4096, copies beyond the L2 cache) against torch.mm on the same weights in
    bf16. GB/s = the quantized bytes read."""
    if ctx.device.type == "cuda":
        yield from _bench_linear_rows_q_cuda(ctx)
        return
    if ctx.device.type != "cpu":
        return
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from tandem_rt.ops import linear_rows_q
    from tandem_rt.quantized import QUANT_TYPES, pack_rows16

    n, k, copies = 3072, 576, 150   # 530 MB of bf16 weights: beyond a last-level cache of hundreds of MB
    dense = torch.randn(n, k) * 0.05
    bf16 = [dense.bfloat16() for _ in range(copies)]
    for qtype in ("Q4_1", "Q8_0"):
        t = getattr(GGMLQuantizationType, qtype)
        one = torch.from_numpy(quants.quantize(dense.numpy().astype(np.float32), t).copy())
        blocks = [one.clone() for _ in range(copies)]
        for rows in ((1, 4, 8) if ctx.quick else (1, 2, 3, 4, 8, 16)):
            x = torch.randn(rows, k).bfloat16()
            tq = time_fn(lambda: [linear_rows_q(x, b, qtype) for b in blocks], ctx)
            tq_min = ctx.last_min
            r = time_fn(lambda: [torch.ops.tandem_rt.linear_rows(x, w, None) for w in bf16], ctx)
            yield add_row(ctx, f"linear_rows_q {qtype}", torch.bfloat16, dict(batch=rows, context=n * 10000 + k, q_len=0),
                          tq, copies * one.nbytes, r, "linear_rows bf16", tq_min, ctx.last_min)
            code = QUANT_TYPES[qtype][0]
            packed = [pack_rows16(b, qtype) for b in blocks]
            t16 = time_fn(lambda: [torch.ops.tandem_rt.linear_rows_q16(x, p, code, None) for p in packed], ctx)
            t16_min = ctx.last_min
            del packed
            yield add_row(ctx, f"linear_rows_q16 {qtype}", torch.bfloat16, dict(batch=rows, context=n * 10000 + k, q_len=0),
                          t16, copies * one.nbytes, tq, "linear_rows_q", t16_min, tq_min)


def _bench_linear_rows_q_cuda(ctx: Context):
    from tandem_rt.ops import linear_rows_q
    from tandem_rt.quantized import QUANT_TYPES

    n, k, copies = 14336, 4096, 6   # Q4_1: 37 MB a copy, bf16: 117 MB a copy; beyond a 50-60 MB L2
    dense = (torch.randn(n, k, device=ctx.device) * 0.05).bfloat16()
    for qtype in ("Q4_1", "Q8_0"):
        block = QUANT_TYPES[qtype][1]
        # random block bytes with sane fp16 scales: timing does not depend on the values
        one = torch.randint(0, 256, (n, k // 32, block), dtype=torch.uint8, device=ctx.device)
        one[..., 0:2] = torch.tensor([0x00, 0x20], dtype=torch.uint8, device=ctx.device)   # d = 2^-7
        one = one.view(n, -1)
        blocks = [one.clone() for _ in range(copies)]
        weights = [dense.clone() for _ in range(2)]    # the reference streams 2 x 117 MB
        for rows in ((1, 8, 32) if ctx.quick else (1, 2, 4, 8, 16, 32)):
            x = torch.randn(rows, k, device=ctx.device).bfloat16()
            tq = time_fn(lambda: [linear_rows_q(x, b, qtype) for b in blocks], ctx) / copies
            tq_min = ctx.last_min / copies
            r = time_fn(lambda: [torch.mm(x, w.t()) for w in weights], ctx) / 2
            yield add_row(ctx, f"linear_rows_q {qtype}", torch.bfloat16, dict(batch=rows, context=n * 10000 + k, q_len=0),
                          tq, one.nbytes, r, "torch.mm bf16", tq_min, ctx.last_min / 2)
        del blocks


VOCAB, GAMMA = 32000, 5


@benchmark
def bench_sample(ctx: Context):
    """Temperature + top-k + top-p sampling of one token per row from [B, V] logits."""
    gen = torch.Generator().manual_seed(2)
    rng = make_rng_state(0, ctx.device)
    for dtype in ctx.dtypes:
        for batch in ctx.batches:
            logits = torch.randn(batch, VOCAB, generator=gen).mul_(3).to(ctx.device, dtype)
            temp, top_k, top_p = sampling_params(batch, 0.8, 50, 0.9, device=ctx.device)
            t = time_fn(lambda: sample(logits, temp, top_k, top_p, rng), ctx)
            yield add_row(ctx, "sample", dtype, dict(batch=batch, context=VOCAB, q_len=1), t,
                          logits.numel() * logits.element_size())
            # greedy through the op itself, as the engine calls it (the wrapper adds type / device checks)
            temp, top_k, top_p = sampling_params(batch, 0.0, 0, 1.0, device=ctx.device)
            t = time_fn(lambda: torch.ops.tandem_rt.sample(logits, temp, top_k, top_p, rng, None), ctx)
            yield add_row(ctx, "sample_greedy_op", dtype, dict(batch=batch, context=VOCAB, q_len=1), t,
                          logits.numel() * logits.element_size())


@benchmark
def bench_verify(ctx: Context):
    """Speculative verification of γ drafts per row: greedy, and rejection sampling with draft probabilities."""
    gen = torch.Generator().manual_seed(3)
    rng = make_rng_state(0, ctx.device)
    for dtype in ctx.dtypes:
        for batch in ctx.batches:
            target = torch.randn(batch, GAMMA + 1, VOCAB, generator=gen).mul_(3).to(ctx.device, dtype)
            drafts = torch.randint(0, VOCAB, (batch, GAMMA), generator=gen).to(ctx.device)
            lens = torch.full((batch,), GAMMA, dtype=torch.int32, device=ctx.device)
            q = torch.softmax(torch.randn(batch, GAMMA, VOCAB, generator=gen), -1).to(ctx.device)
            for mode, temperature, probs in (("greedy", 0.0, None), ("sampling", 1.0, q)):
                temp, top_k, top_p = sampling_params(batch, temperature, 0, 1.0, device=ctx.device)
                t = time_fn(lambda: verify(drafts, lens, probs, target, temp, top_k, top_p, rng), ctx)
                nbytes = target.numel() * target.element_size() + (0 if probs is None else probs.numel() * 4)
                yield add_row(ctx, f"verify_{mode}", dtype, dict(batch=batch, context=VOCAB, q_len=GAMMA + 1), t, nbytes)
                # the op itself, as the engine calls it (verification.run_verify; the wrapper adds type / device checks)
                t = time_fn(lambda: torch.ops.tandem_rt.verify(drafts, lens, probs, target, temp, top_k, top_p, rng),
                            ctx)
                yield add_row(ctx, f"verify_{mode}_op", dtype, dict(batch=batch, context=VOCAB, q_len=GAMMA + 1), t,
                              nbytes)


def host_time_fn(fn, ctx: Context, calls: int = 200, reps: int = 7) -> float:
    """Median seconds per call of ``calls`` back-to-back calls with no synchronisation between them
    (on CUDA: the host's cost of issuing the call, while the device keeps up with tiny inputs; the
    minimum is kept in ctx.last_min)."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
        sync()
    ctx.last_min = min(times)
    return statistics.median(times)


@benchmark
def bench_host_overhead(ctx: Context):
    """Per-call host time of each op on tiny inputs (batch 1, 16 cached tokens, one query row, one
    page pair, one sampled row): the ``tandem_rt.ops`` wrapper against the raw ``torch.ops`` op the
    engine calls (ref). On CUDA this is the graph-less launch overhead (issue goal: < 10 us)."""
    gen = torch.Generator().manual_seed(4)
    dev, dtype = ctx.device, ctx.dtypes[-1]
    raw = torch.ops.tandem_rt
    q, kc, vc, bt, sl, qsl = make_paged(1, 16, dtype, dev, 1, gen)
    out, scale = torch.empty_like(q), HEAD_DIM ** -0.5
    k = torch.randn(1, HKV, HEAD_DIM, generator=gen).to(dev, dtype)
    v, pos, slots = torch.randn_like(k), torch.tensor([15], device=dev), torch.tensor([15], device=dev)
    caches = [torch.zeros(4, PAGE_SIZE, HKV, HEAD_DIM, device=dev, dtype=dtype) for _ in range(4)]
    src, dst = torch.tensor([0], device=dev), torch.tensor([2], device=dev)
    logits = torch.randn(1, VOCAB, generator=gen).to(dev, dtype)
    target = torch.randn(1, GAMMA + 1, VOCAB, generator=gen).to(dev, dtype)
    drafts = torch.randint(0, VOCAB, (1, GAMMA), generator=gen).to(dev)
    lens = torch.full((1,), GAMMA, dtype=torch.int32, device=dev)
    temp, top_k, top_p = sampling_params(1, 0.0, 0, 1.0, device=dev)
    rng = make_rng_state(0, dev)
    cases = [
        ("paged_attention", lambda: paged_attention(q, kc, vc, bt, sl, qsl, scale, 1, 16, out=out),
         lambda: raw.paged_attention(out, q, kc, vc, bt, sl, qsl, scale, 1, 16, False, 0, 0)),
        ("rope_cache_write", lambda: rope_cache_write(k, v, pos, slots, kc, vc, ROPE_THETA, q=q),
         lambda: raw.rope_cache_write(k, v, pos, slots, kc, vc, ROPE_THETA, q)),
        ("copy_pages", lambda: copy_pages(caches, src, dst), lambda: raw.copy_pages(caches, src, dst)),
        ("sample", lambda: sample(logits, temp, top_k, top_p, rng),
         lambda: raw.sample(logits, temp, top_k, top_p, rng, None)),
        ("verify", lambda: verify(drafts, lens, None, target, temp, top_k, top_p, rng),
         lambda: raw.verify(drafts, lens, None, target, temp, top_k, top_p, rng)),
    ]
    for name, wrapper, op in cases:
        t = host_time_fn(wrapper, ctx)
        t_min = ctx.last_min
        r = host_time_fn(op, ctx)
        yield add_row(ctx, f"host {name}", dtype, dict(batch=1, context=16, q_len=1), t, 0, r, "torch.ops (raw)",
                      t_min, ctx.last_min)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_row(row):
    print(f"{row['op']:<17} {row['dtype']:<9} {row['batch']:>5} {row['context']:>7} {row['q_len']:>5} "
          f"{row['time_us']:>11.1f} {row['gbps']:>8.2f} {fmt(row['pct_copy'], '>6.1f'):>6} "
          f"{fmt(row.get('ref_time_us'), '>11.1f'):>11} {fmt(row.get('ratio_vs_ref'), '>6.2f'):>6} "
          f"{row['min_time_us']:>11.1f} {fmt(row.get('ref_min_time_us'), '>11.1f'):>11} "
          f"{fmt(row.get('min_ratio_vs_ref'), '>6.2f'):>6}", flush=True)


def set_heads(spec: str) -> None:
    """Sets the module's head shape (HQ, HKV, HEAD_DIM) from "hq,hkv,d"."""
    global HQ, HKV, HEAD_DIM
    try:
        hq, hkv, d = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--heads must be three integers hq,hkv,d, got {spec!r}") from None
    if min(hq, hkv, d) <= 0 or hq % hkv or d % 2:
        raise SystemExit(f"--heads: need hq, hkv, d > 0, hq a multiple of hkv and d even, got {spec!r}")
    HQ, HKV, HEAD_DIM = hq, hkv, d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small shape set (CI smoke run)")
    ap.add_argument("--only", nargs="*", help="benchmark names to run (e.g. paged_attention copy_pages)")
    ap.add_argument("--out", help="JSON path (default runs/bench_kernels-<device>.json)")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads) for the op and the reference")
    ap.add_argument("--pa-kernel", default="simt", choices=["simt", "mma"],
                    help="CUDA paged-attention kernel (paged_attention(kernel=...); default %(default)s)")
    ap.add_argument("--pa-waves", type=int, default=0,
                    help="CTA waves per SM the CUDA KV split aims for (paged_attention(waves=...); 0: default)")
    ap.add_argument("--row-invariant", action="store_true",
                    help="paged_attention(row_invariant=True), the CPU engine's call (every query row by the "
                         "per-row chunk kernels)")
    ap.add_argument("--heads", default=f"{HQ},{HKV},{HEAD_DIM}",
                    help="query heads, KV heads, head dim of the attention / RoPE / copy shapes (default "
                         "%(default)s; SmolLM2-135M: 9,3,64)")
    args = ap.parse_args(argv)
    set_heads(args.heads)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        dtypes, batches, contexts = [torch.bfloat16], [1, 4, 16, 64], [256, 1024, 4096, 16384]
        if args.quick:
            batches, contexts = [1, 16], [1024, 4096]
        min_time = 0.05
    else:
        dtypes, batches, contexts = [torch.float32, torch.bfloat16], [1, 4, 16], [256, 1024, 4096]
        if args.quick:
            batches, contexts = [1, 4], [256, 1024]
        min_time = 0.1 if args.quick else 0.3
    ctx = Context(device, dtypes, batches, contexts, [1, 8], min_time)
    ctx.quick = args.quick
    ctx.pa_kernel, ctx.pa_waves = args.pa_kernel, args.pa_waves
    ctx.row_invariant = args.row_invariant
    ctx.copy_gbps = measure_copy_bandwidth(ctx)
    read_gbps = measure_read_bandwidth(device)
    print(f"device: {device_name(device)}; torch {torch.__version__}; copy bandwidth {ctx.copy_gbps:.1f} GB/s; "
          f"streaming read bandwidth {read_gbps:.1f} GB/s")
    print(f"{'op':<17} {'dtype':<9} {'batch':>5} {'context':>7} {'q_len':>5} {'time_us':>11} {'GB/s':>8} "
          f"{'%copy':>6} {'ref_us':>11} {'ratio':>6} {'min_us':>11} {'ref_min_us':>11} {'ratio':>6}")
    print("(ratio = op time / reference time; median columns first, then minimum columns)")
    for bench in BENCHMARKS:
        name = bench.__name__.removeprefix("bench_")
        if args.only and name not in args.only:
            continue
        for row in bench(ctx):
            print_row(row)
    out = Path(args.out or f"runs/bench_kernels-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device_name(device), torch=torch.__version__, quick=args.quick,
                                   heads=dict(num_heads=HQ, num_kv_heads=HKV, head_dim=HEAD_DIM),
                                   copy_gbps=ctx.copy_gbps, read_gbps=read_gbps, ratio="op time / reference time", rows=ctx.rows),
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
