#!/usr/bin/env python
"""End-to-end generation benchmark: every mode of one checkpoint on the same prompts, in one process.

For each (batch size, num-samples) configuration it runs ``primary``, ``secondary``, ``speed`` and
``tandem-speed`` (several γ and "auto"), and ``tandem``, greedy with fixed output length, and
prints a table: latency per generated token (wall time / tokens per sequence; every prompt runs
once, in consecutive groups of the batch size, one group after another), tokens/s (all
sequences), speedup over ``primary``, mean accepted drafts per block, primary and secondary
forward runs per 100 generated tokens (paper Tables 2, 4, 5), and whether the tokens equal
``primary``'s (lossless modes); writes JSON and, with ``--plot``, a bar chart (matplotlib).
``--peer hf`` adds Hugging Face assisted generation (``model.generate(..., assistant_model=...)``)
with the same primary and standalone drafter, exported to Hugging Face format in a temporary
directory, measured in the same run (batch 1). ``--compare-draft-quantization Q8_0,Q4_1`` runs the
drafting modes again on engines whose drafting models are quantized (``Engine(draft_quantization=)``).

    python tools/bench_e2e.py --model DIR [--device cpu] [--gammas 2,4,6] [--peer hf] [--json out.json]
    python tools/bench_e2e.py --random-checkpoint /tmp/rand_ckpt ...   # builds a random-weights model first
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------- random checkpoint

def make_random_checkpoint(out: Path, vocab=2048, seed=0) -> Path:
    """A random-weights Tandem checkpoint whose small models share the primary's embedding and
    whose layers add scaled random updates, so drafts are accepted part of the time."""
    from tandem_rt.checkpoint import save_checkpoint
    from tandem_rt.config import ModelConfig, RouterConfig, TandemConfig
    from tandem_rt.models import TandemModel
    from tandem_rt.models.random_init import make_agreeing_, randomize_

    def mc(h, layers, heads, kv, ffn):
        return ModelConfig(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                           max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
    primary = mc(512, 8, 8, 4, 1536)
    small = dict(h=512, layers=2, heads=8, kv=2, ffn=1024)
    cfg = TandemConfig(primary=primary, secondary=mc(**small), drafter=mc(**small),
                       router=RouterConfig(embed_dim=512, top_k=4, hidden_size=64, threshold=0.5, gamma_max=8),
                       torch_dtype="float32")
    torch.manual_seed(seed)
    model = TandemModel(cfg)
    randomize_(model, lambda p: 0.5 / p.shape[1] ** 0.5)
    make_agreeing_(model, 3.0)
    return save_checkpoint(model, out)


def add_model_args(ap) -> None:
    """Arguments choosing the checkpoint, device, dtype and CPU threads (shared with profile_step.py)."""
    ap.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--random-checkpoint", help="build a random-weights checkpoint in this directory and use it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quantized", action="store_true",
                    help="the primary reads the blocks of the GGUF file the checkpoint references (linear_rows_q)")
    ap.add_argument("--draft-quantization", default="none", choices=["none", "auto", "Q8_0", "Q4_1"],
                    help="the secondary and drafter read their matrices as blocks of this type (quantized at load; "
                         "auto: Engine.from_pretrained's default)")


def engine_from_args(args, **engine_kw):
    """(checkpoint path, Engine) for :func:`add_model_args`' arguments; sets the CPU threads. Without
    --model and without a bundled model, a random-weights checkpoint in a temporary directory."""
    from tandem_rt.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    if args.random_checkpoint:
        path = str(make_random_checkpoint(Path(args.random_checkpoint)))
    elif path is None:
        from tandem_rt.engine.engine import _default_model_path
        path = _default_model_path()
        if path is None:
            path = str(make_random_checkpoint(Path(tempfile.mkdtemp(prefix="bench_e2e_")) / "random"))
            print(f"no --model and no bundled model: using a random-weights checkpoint at {path}")
    engine_kw["quantized"] = bool(getattr(args, "quantized", False))   # dense unless --quantized
    dq = getattr(args, "draft_quantization", "none")
    engine_kw["draft_quantization"] = None if dq in (None, "none") else dq
    return path, Engine.from_pretrained(path, device=args.device, dtype=args.dtype, **engine_kw)


# ----------------------------------------------------------------------------- Hugging Face peer

def export_hf(model, out: Path, vocab_size: int) -> Path:
    """Write a reference ``LlamaForCausalLM`` as a Hugging Face checkpoint (Llama, or Qwen2 when
    the attention has Q/K/V biases)."""
    import transformers

    c = model.config
    kind = "Qwen2" if c.attention_bias else "Llama"
    kw = dict(vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
              tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
              bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    if kind == "Llama":
        kw.update(head_dim=c.head_dim, attention_bias=False)
    cfg = getattr(transformers, f"{kind}Config")(**kw)
    hf = getattr(transformers, f"{kind}ForCausalLM")(cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and c.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF export: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(out)
    return out


def full_vocab(model):
    """A copy of a drafter without its reduced output vocabulary (Hugging Face has no such notion:
    the peer drafts over the whole vocabulary with the same weights)."""
    import dataclasses

    from tandem_rt.models.llama import LlamaForCausalLM

    if getattr(model, "vocab_subset", None) is None:
        return model
    cfg = dataclasses.replace(model.config, output_vocab_size=None)
    with torch.device("meta"):
        out = LlamaForCausalLM(cfg)
    out = out.to_empty(device="cpu").to(next(model.parameters()).dtype)
    out.load_state_dict({k: v for k, v in model.state_dict().items() if k != "vocab_subset"})
    return out


def bench_llama_cpp(gguf: str, prompts, max_new, repeats, threads):
    """llama.cpp (llama-cpp-python) greedy decoding of ``max_new`` tokens after each prompt
    (token ids), on the same GGUF file; best wall time over ``repeats`` per prompt."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("--peer llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    llm = Llama(model_path=gguf, n_ctx=max(256, max(map(len, prompts)) + max_new + 8),
                n_threads=threads or torch.get_num_threads(), n_threads_batch=threads or torch.get_num_threads(),
                verbose=False, logits_all=False)
    outs, wall = [], 0.0
    for prompt in prompts:
        best, toks = float("inf"), None
        for _ in range(repeats + 1):  # the first pass warms up
            llm.reset()
            t = time.perf_counter()
            got = []
            for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                got.append(int(tok))
                if len(got) == max_new:
                    break
            el = time.perf_counter() - t
            if toks is not None:
                best = min(best, el)
            toks = got
        wall += best
        outs.append(toks)
    return {"name": "llama.cpp", "outputs": outs, "wall_s": wall, "sequences": len(prompts),
            "tokens": sum(len(o) for o in outs)}


def bench_hf(engine, prompts, max_new, repeats):
    import transformers

    model = engine.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        V = engine.vocab_size
        p_dir = export_hf(model.primary, Path(tmp) / "primary", V)
        d_dir = export_hf(full_vocab(model.drafter), Path(tmp) / "drafter", V)
        dev = engine.device
        primary = transformers.AutoModelForCausalLM.from_pretrained(p_dir, dtype=engine.dtype).to(dev).eval()
        drafter = transformers.AutoModelForCausalLM.from_pretrained(d_dir, dtype=engine.dtype).to(dev).eval()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for name, kwargs in (("hf greedy", {}), ("hf assisted", {"assistant_model": drafter})):
            outs, wall = [], 0.0
            for prompt in prompts:
                ids = torch.tensor([prompt], device=dev)
                with torch.no_grad():
                    primary.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kwargs)  # warm-up
                    best = float("inf")
                    for _ in range(repeats):
                        sync()
                        t = time.perf_counter()
                        out = primary.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                               min_new_tokens=max_new, do_sample=False, **kwargs)
                        sync()
                        best = min(best, time.perf_counter() - t)
                wall += best
                outs.append(out[0, len(prompt):].tolist())
            rows.append({"name": name, "outputs": outs, "wall_s": wall, "sequences": len(prompts),
                         "tokens": sum(len(o) for o in outs)})
    return rows


# ----------------------------------------------------------------------------- engine runs

def prompt_groups(base: list, B: int) -> list:
    """Every prompt once, in consecutive groups of ``B`` (the last group wraps around to the first
    prompts), so that batch 1 measures all prompts rather than the first one."""
    n_groups = max(1, -(-len(base) // B))
    return [[base[(g * B + i) % len(base)] for i in range(B)] for g in range(n_groups)]


def submit_and_wait(engine, prompts, params, mode, gamma) -> list:
    """``generate`` through ``submit``: the engine's background thread runs the loop while this
    thread waits (``generate`` would run it on this thread)."""
    handles = [engine.submit(p, params, mode=mode, gamma=gamma) for p in prompts]
    return [r for h in handles for r in h.results()]


def run_engine(engine, groups, params, mode, gamma, repeats, background=False):
    """Best over ``repeats`` of the summed wall time of ``generate`` on each group of prompts
    (``background``: :func:`submit_and_wait` instead)."""
    gen = (lambda ps, p: submit_and_wait(engine, ps, p, mode, gamma)) if background else (
        lambda ps, p: engine.generate(ps, p, mode=mode, gamma=gamma))
    gen(groups[0][:1], params.__class__(max_new_tokens=4, ignore_eos=True, n=params.n))   # warm-up
    best, out = float("inf"), None
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for _ in range(repeats):
        wall, res = 0.0, []
        for prompts in groups:
            sync()
            t = time.perf_counter()
            res += gen(prompts, params)
            sync()
            wall += time.perf_counter() - t
        if wall < best:
            best, out = wall, res
    tokens = sum(len(r.token_ids) for r in out)
    blocks = sum(r.stats["blocks"] for r in out)
    return {"outputs": [r.token_ids for r in out], "wall_s": best, "sequences": len(out),
            "batch": len(out) // len(groups), "tokens": tokens,
            "mean_accepted": (sum(r.stats["accepted_tokens"] for r in out) / blocks) if blocks else None,
            "primary_runs_per_100": 100.0 * sum(r.stats["primary_runs"] for r in out) / tokens,
            "secondary_runs_per_100": 100.0 * sum(r.stats["secondary_runs"] for r in out) / tokens}


def referenced_gguf(path) -> str:
    """The GGUF file a checkpoint references as its primary source."""
    from tandem_rt.checkpoint import read_config
    from tandem_rt.primary_source import resolve_reference

    ref = read_config(path).primary_source
    if ref is None or ref["kind"] != "gguf":
        raise SystemExit("--peer llama.cpp: give --gguf (the checkpoint does not reference a GGUF primary)")
    return str(resolve_reference(ref, Path(path)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (random ids, or text)")
    ap.add_argument("--prompts-file", help="text prompts, one per line (needs a tokenizer)")
    ap.add_argument("--gammas", default="2,4,6")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--num-samples", default="1,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--background-loop", action="store_true",
                    help="also time primary with the engine's loop on its background thread (submit + wait) "
                         "instead of on the calling main thread (generate)")
    ap.add_argument("--peer", choices=["hf", "llama.cpp"], action="append", default=[],
                    help="peers run on the same prompts at batch 1 (repeatable): hf = transformers generate "
                         "and assisted generation with the same drafter; llama.cpp = llama-cpp-python on --gguf")
    ap.add_argument("--gguf", help="GGUF file of the primary for --peer llama.cpp (default: the checkpoint's "
                                   "referenced GGUF source)")
    ap.add_argument("--compare-draft-quantization", default="",
                    help="comma-separated Q8_0 / Q4_1: also run the speculative modes with the drafting models "
                         "quantized to each (a second engine per type; rows carry draft_quantization)")
    ap.add_argument("--json", "--out", dest="json", default="bench_e2e.json", help="JSON report path")
    ap.add_argument("--plot", help="also draw the speed-ups (matplotlib) into this image file (.png, .svg, ...)")
    args = ap.parse_args(argv)
    from tandem_rt.engine import SamplingParams

    path, engine = engine_from_args(args, max_batch_size=16, use_cuda_graphs=args.cuda_graphs)
    compare_q = [q for q in args.compare_draft_quantization.split(",") if q]
    bad = [q for q in compare_q if q not in ("Q8_0", "Q4_1")]
    if bad:
        raise SystemExit(f"--compare-draft-quantization takes Q8_0 / Q4_1, got {bad}")
    extra_engines = []
    for q in compare_q:   # built before any timing (each holds its own copy of the models)
        ns = argparse.Namespace(**{**vars(args), "draft_quantization": q, "threads": None})
        extra_engines.append((q, engine_from_args(ns, max_batch_size=16, use_cuda_graphs=args.cuda_graphs)[1]))
    V = engine.vocab_size
    if args.prompts_file:
        lines = [l.strip() for l in open(args.prompts_file) if l.strip()]
        base = [engine._tokenize(l, i) for i, l in enumerate(lines)]
    else:
        g = torch.Generator().manual_seed(0)
        base = [torch.randint(2, V, (args.prompt_len,), generator=g).tolist() for _ in range(4)]
    gammas = [int(x) for x in args.gammas.split(",")]
    has_auto = engine.model.router is not None
    configs = []
    for B in (int(x) for x in args.batch_sizes.split(",")):
        for n in (int(x) for x in args.num_samples.split(",")):
            if B > 1 and n > 1:
                continue
            configs.append((B, n))
    report = {"checkpoint": str(path), "device": args.device, "dtype": args.dtype, "cpu": cpu_model(),
              "torch_threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
              "prompt_len": len(base[0]), "torch": torch.__version__, "configs": []}
    for B, n in configs:
        groups = prompt_groups(base, B)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, n=n, ignore_eos=True)
        runs = [("primary", 1), ("secondary", 1)]
        if engine.drafter is not None:
            runs += [("speed", g) for g in gammas]
        runs += [("tandem-speed", g) for g in gammas] + ([("tandem-speed", "auto")] if has_auto else [])
        runs += [("tandem", gammas[0])]
        if args.background_loop:
            runs.insert(1, ("primary", "background"))
        rows = []
        dq = engine.runner.draft_quantization
        for mode, gamma in runs:
            bg = gamma == "background"
            r = run_engine(engine, groups, params, mode, 1 if bg else gamma, args.repeats, background=bg)
            r.update(mode="primary (loop off the main thread)" if bg else mode, gamma=None if bg else gamma,
                     draft_quantization=dq if mode != "primary" else None)
            rows.append(r)
            print(f"  B={B} n={n} {mode:13s} γ={gamma!s:4s} {r['wall_s']:.3f}s", flush=True)
        for q, eq in extra_engines:   # the drafting modes again, drafting models quantized to q
            for mode, gamma in runs:
                if mode in ("primary", "secondary") or gamma == "background":
                    continue
                r = run_engine(eq, groups, params, mode, gamma, args.repeats)
                r.update(mode=mode, gamma=gamma, draft_quantization=q)
                rows.append(r)
                print(f"  B={B} n={n} {mode:13s} γ={gamma!s:4s} [{q} drafts] {r['wall_s']:.3f}s", flush=True)
        if B == 1 and n == 1:
            peers = []
            if "hf" in args.peer:
                peers += bench_hf(engine, [g[0] for g in groups], args.max_new_tokens, args.repeats)
            if "llama.cpp" in args.peer:
                peers.append(bench_llama_cpp(args.gguf or referenced_gguf(path), [g[0] for g in groups],
                                             args.max_new_tokens, args.repeats, args.threads))
            for r in peers:
                r.update(mode=r.pop("name"), gamma=None, mean_accepted=None, primary_runs_per_100=None,
                         secondary_runs_per_100=None, batch=1, draft_quantization=None)
                rows.append(r)
        ref = rows[0]
        # latency per token of one sequence: groups run one after another, B sequences each
        per_seq = lambda r: r["tokens"] / r["batch"]  # noqa: E731
        for r in rows:
            r["ms_per_token"] = 1000.0 * r["wall_s"] / per_seq(r)
            r["tokens_per_s"] = r["tokens"] / r["wall_s"]
            r["speedup"] = ref["ms_per_token"] / r["ms_per_token"] if "ms_per_token" in ref else 1.0
            r["equals_primary"] = r["outputs"] == ref["outputs"] if r["mode"] != "secondary" else None
            if r["mode"] == "tandem":
                r["equals_primary"] = None
        ref["speedup"] = 1.0
        report["configs"].append({"batch_size": B, "num_samples": n, "rows": [
            {k: v for k, v in r.items() if k != "outputs"} for r in rows]})
        print(f"\nbatch {B}, num-samples {n}, {args.max_new_tokens} new tokens, {len(base)} prompts "
              f"({min(map(len, base))}-{max(map(len, base))} tokens) in {len(groups)} group(s), "
              f"{args.device} ({report['cpu'] if args.device == 'cpu' else args.device})")
        label = lambda r: r["mode"] + (f" [{r['draft_quantization']}]" if r.get("draft_quantization") else "")  # noqa: E731
        print(f"{'mode':21s} {'γ':>5s} {'ms/token':>9s} {'tok/s':>8s} {'speedup':>8s} {'acc/block':>9s} "
              f"{'P runs/100':>10s} {'S runs/100':>10s} {'=primary':>8s}")
        fmt = lambda v, f: (format(v, f) if v is not None else "-")  # noqa: E731
        for r in rows:
            print(f"{label(r):21s} {str(r['gamma'] if r['gamma'] is not None else '-'):>5s} "
                  f"{r['ms_per_token']:9.2f} {r['tokens_per_s']:8.1f} {r['speedup']:8.2f} "
                  f"{fmt(r['mean_accepted'], '.2f'):>9s} {fmt(r['primary_runs_per_100'], '.1f'):>10s} "
                  f"{fmt(r['secondary_runs_per_100'], '.1f'):>10s} {fmt(r['equals_primary'], ''):>8s}")
        print()
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot_report(report: dict, path: str) -> None:
    """One panel per (batch size, num-samples): speed-up over ``primary`` of every row (bars, the
    lossless rows that reproduced ``primary`` in colour, others grey), and ms per token as labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    fig, axes = plt.subplots(len(configs), 1, figsize=(10, 3.2 * len(configs)), squeeze=False)
    for ax, cfg in zip(axes[:, 0], configs):
        rows = cfg["rows"]
        labels = [(r["mode"] if r["gamma"] in (None, 1) else f"{r['mode']} γ={r['gamma']}")
                  + (f" [{r['draft_quantization']}]" if r.get("draft_quantization") else "") for r in rows]
        speed = [r["speedup"] for r in rows]
        colours = ["tab:blue" if r["equals_primary"] else "tab:grey" for r in rows]
        bars = ax.bar(range(len(rows)), speed, color=colours)
        for bar, r in zip(bars, rows):
            ax.annotate(f"{r['ms_per_token']:.2f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("speed-up over primary")
        ax.set_title(f"batch {cfg['batch_size']}, num-samples {cfg['num_samples']} — {report['device']} "
                     f"{report.get('cpu') or ''}, {report['dtype']}, {report['max_new_tokens']} new tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
