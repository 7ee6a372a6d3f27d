#!/usr/bin/env python
"""Time one paged forward of each model of a checkpoint for a decode row and verify blocks of
several rows (one sequence at a given context): what a draft step and a verify step cost.

    python tools/bench_forward.py [--model DIR] [--dtype bfloat16] [--threads 1] [--context 64] \\
        [--rows 1,2,4,6,8] [--json out.json]

Median over ``--calls`` calls after warm-up, per model and row count; prints a table and writes JSON.
Each time is also given as the weight bytes the forward reads per second, and as a fraction of the
streaming read bandwidth measured in the same run (``bench_kernels.measure_read_bandwidth``): a
decode step streams every weight once, so that fraction is how close it is to the memory bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import add_model_args, cpu_model, engine_from_args  # noqa: E402
from bench_kernels import measure_read_bandwidth  # noqa: E402


def weight_bytes(model) -> int:
    """Bytes of the matrices and norms one forward of a :class:`PagedLlama` reads (every layer's
    weights, the final norm and the LM head; the embedding rows it gathers are not counted)."""
    from tandem_rt.quantized import QuantMatrix

    total = model.lm_head.nbytes + model.final_norm.nbytes
    for lw in model.layers:
        total += sum(t.nbytes for t in lw if isinstance(t, (torch.Tensor, QuantMatrix)))
    return total


def time_forward(engine, model, cache, context: int, rows: int, calls: int) -> float:
    """Median seconds of ``model.forward`` (a step, as the engine runs decode / draft / verify rows) over
    ``rows`` rows ending at position ``context + rows``."""
    from tandem_rt.engine.paged_model import build_meta

    pm = engine.page_manager
    sid = ("bench_forward", id(model), rows)
    pm.add_sequence(sid)
    try:
        pm.prepare_write(sid, 0, context + rows)
        meta = build_meta(pm, [sid], [context], [context + rows], [context], engine.device)
        ids = torch.full((rows,), 5, dtype=torch.int64, device=engine.device)
        last = meta.last_rows if rows == 1 else None
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        for _ in range(10):
            model.forward(ids, meta, cache.k, cache.v, logits_rows=last, step=True)
        times = []
        for _ in range(calls):
            sync()
            t = time.perf_counter()
            model.forward(ids, meta, cache.k, cache.v, logits_rows=last, step=True)
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        pm.free(sid)


class _NullOps:
    """Stand-ins for the CPU step ops (``tandem_rt._C.cpu``) that return outputs of the right shape
    without computing: ``skip`` names the ops replaced ("products": linear_rows, "all": every op)."""

    def __init__(self, real, skip: str):
        self._real, self._skip = real, skip

    def __getattr__(self, name):
        if name == "linear_rows" or self._skip == "all":
            return getattr(self, "_null_" + name)
        return getattr(self._real, name)

    @staticmethod
    def _null_linear_rows(x, w, add=None):   # dense [out, in] weight (quantized ones: quant_mm)
        return add if add is not None else torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype)

    @staticmethod
    def _null_rms_norm(x, weight, eps):
        return torch.empty_like(x)

    @staticmethod
    def _null_silu_and_mul(gu):
        return torch.empty((gu.shape[0], gu.shape[1] // 2), dtype=gu.dtype)

    @staticmethod
    def _null_rope_cache_write(*args):
        return None

    @staticmethod
    def _null_paged_attention(*args, **kwargs):
        return None

    @staticmethod
    def _null_paged_attention_scratch(*args):
        return None


def time_breakdown(engine, model, cache, context: int, calls: int) -> dict:
    """Median ms of a 1-row forward as it runs (``full``: with the model's ``DecoderPlan`` when it has
    one; with several threads it runs the step as one team, and ``plan_op_by_op`` times the same plan
    forking the threads per op), as the Python loop over the ops (``python_loop``), and as that loop with the weight
    products replaced by stand-ins that only allocate their outputs (``without_products``) and with
    every op replaced (``without_all``: the host's Python and allocation work): the share of a
    decode step outside the weight stream."""
    import tandem_rt.engine.paged_model as pmod
    from tandem_rt.quantized import QuantMatrix

    real_cpu, real_qmm = pmod._cpu, pmod.quant_mm

    def null_qmm(x, w: QuantMatrix, add=None, any_rows=False):
        return add if add is not None else torch.empty((x.shape[0], w.out_features), dtype=x.dtype)

    plan = model.decoder_plan
    out = {"full": time_forward(engine, model, cache, context, 1, calls)}
    try:
        if plan is not None and plan.team and torch.get_num_threads() > 1:
            model.decoder_plan = model._build_decoder_plan(team=False)   # threads forked per op
            out["plan_op_by_op"] = time_forward(engine, model, cache, context, 1, calls)
        model.decoder_plan = None   # the Python loop over the ops, which the stand-ins replace
        out["python_loop"] = time_forward(engine, model, cache, context, 1, calls)
        for skip in ("products", "all"):
            pmod._cpu, pmod.quant_mm = _NullOps(real_cpu, skip), null_qmm
            out[f"without_{skip}"] = time_forward(engine, model, cache, context, 1, calls)
    finally:
        pmod._cpu, pmod.quant_mm = real_cpu, real_qmm
        model.decoder_plan = plan
    return {k: 1e3 * v for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--context", type=int, default=64, help="cached positions before the rows")
    ap.add_argument("--rows", default="1,2,4,6,8", help="rows per forward (1 = decode)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--breakdown", action="store_true", help="also time the primary's 1-row forward (CPU) with "
                    "its decoder plan, as the Python loop over the ops, and that loop with the weight products "
                    "and with every op replaced by stand-ins: the time outside the weight stream")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    path, engine = engine_from_args(args)
    rows = [int(r) for r in args.rows.split(",")]
    models = [("primary", engine.primary, engine.primary_cache), ("secondary", engine.secondary, engine.secondary_cache)]
    if engine.drafter is not None:
        models.append(("drafter", engine.drafter, engine.drafter_cache))
    table = {name: {r: time_forward(engine, m, c, args.context, r, args.calls) for r in rows} for name, m, c in models}
    sizes = {name: weight_bytes(m) for name, m, _ in models}
    read_gbps = measure_read_bandwidth(engine.device)
    print(f"{path}: {args.device} ({cpu_model() if args.device == 'cpu' else args.device}), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), context {args.context}; ms per forward (median of {args.calls}); "
          f"streaming read bandwidth {read_gbps:.1f} GB/s")
    print(f"{'model':10s} {'weights MB':>10s} " + " ".join(f"{f'{r} rows':>9s}" for r in rows)
          + "   (1-row GB/s, % of read bandwidth)")
    for name, times in table.items():
        gbps = sizes[name] / times[rows[0]] / 1e9
        print(f"{name:10s} {sizes[name] / 1e6:10.1f} " + " ".join(f"{1e3 * times[r]:9.3f}" for r in rows)
              + f"   {gbps:.1f} GB/s, {100 * gbps / read_gbps:.0f}% (at {rows[0]} rows)")
    breakdown = None
    if args.breakdown:
        if args.device != "cpu":
            raise SystemExit("--breakdown times the CPU ops")
        breakdown = time_breakdown(engine, engine.primary, engine.primary_cache, args.context, args.calls)
        full, loop = breakdown["full"], breakdown["python_loop"]
        nop, host = breakdown["without_products"], breakdown["without_all"]
        print(f"primary 1-row forward: {full:.3f} ms (decoder plan), {loop:.3f} ms (Python loop over the ops); "
              f"the loop without the weight products {nop:.3f} ms (attention, norms, RoPE, host), without any op "
              f"{host:.3f} ms (host Python and allocations); products {loop - nop:.3f} ms = "
              f"{sizes['primary'] / (loop - nop) / 1e6:.1f} GB/s of weights")
        if "plan_op_by_op" in breakdown:
            print(f"decoder plan with the threads forked per op instead of one team: {breakdown['plan_op_by_op']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(breakdown_ms=breakdown,
            model=str(path), device=args.device, device_name=cpu_model() if args.device == "cpu" else args.device,
            dtype=args.dtype, threads=torch.get_num_threads(), context=args.context, read_gbps=read_gbps,
            weight_bytes=sizes, ms={n: {str(r): 1e3 * t for r, t in v.items()} for n, v in table.items()},
            pct_read_bandwidth={n: {str(r): 100 * sizes[n] / t / 1e9 / read_gbps for r, t in v.items()}
                                for n, v in table.items()}), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
