"""``tandem-rt generate``: generate text with a Tandem checkpoint in any mode."""
from __future__ import annotations

import json
import sys


def _gamma(value: str):
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--gamma must be an integer or 'auto', got {value!r}") from None


def _read_prompts(args) -> list:
    from tandem_rt.cli import CLIError

    given = [x is not None for x in (args.prompt, args.prompts_file, args.prompt_ids)]
    if sum(given) != 1:
        raise CLIError("give exactly one of --prompt, --prompts-file, --prompt-ids")
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_ids is not None:
        try:
            return [[int(t) for t in args.prompt_ids.split(",") if t.strip()]]
        except ValueError:
            raise CLIError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    try:
        with open(args.prompts_file, encoding="utf-8") as fh:
            lines = [line.rstrip("\n") for line in fh]
    except OSError as exc:
        raise CLIError(f"cannot read --prompts-file: {exc}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"--prompts-file {args.prompts_file} holds no prompt (one per line)")
    return prompts


def run(args) -> int:
    from tandem_rt.cli import draft_quantization as cli_draft_quantization
    from tandem_rt.engine import Engine, SamplingParams

    prompts = _read_prompts(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, n=args.num_samples, ignore_eos=args.ignore_eos)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    max_batch_size=args.max_batch_size, use_cuda_graphs=args.cuda_graphs,
                                    quantized=args.quantized, draft_quantization=cli_draft_quantization(args))
    gamma = _gamma(args.gamma)
    # validate everything before the first token
    engine.check_request(prompts, params, args.mode, gamma, not args.no_free_token)
    results = []
    chunk = max(1, args.max_batch_size // params.n)
    bar = None
    if args.prompts_file is not None:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), unit="prompt", file=sys.stderr, disable=None)
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        out = engine.generate(part, params, mode=args.mode, gamma=gamma, free_token=not args.no_free_token)
        for r in out:
            r.prompt_index += i
        results.extend(out)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps([{"prompt_index": r.prompt_index, "sample_index": r.sample_index, "text": r.text,
                           "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                           **({"stats": r.stats} if args.stats else {})} for r in results], indent=2))
        return 0
    for r in results:
        head = f"[prompt {r.prompt_index}" + (f", sample {r.sample_index}]" if params.n > 1 else "]")
        body = r.text if engine.tokenizer is not None else " ".join(map(str, r.token_ids))
        print(f"{head} {body}")
        if args.stats:
            s = r.stats
            print(f"  {len(r.token_ids)} tokens ({r.finish_reason}), {s['tokens_per_s']:.1f} tok/s, "
                  f"primary runs {s['primary_runs']}, secondary runs {s['secondary_runs']}, "
                  f"mean accepted {s['mean_accepted']:.2f} per block, accepted per block {s['accepted_per_block']}")
    return 0


def register(sub) -> None:
    from tandem_rt.cli import add_draft_quantization, add_quantized
    from tandem_rt.engine import MODES
    from tandem_rt.engine.params import DEFAULT_GAMMA

    p = sub.add_parser("generate", help="generate text with a Tandem checkpoint")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompts-file", help="file with one prompt per line")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--mode", default="tandem-speed", choices=MODES)
    p.add_argument("--gamma", default=str(DEFAULT_GAMMA),
                   help=f"drafted tokens per block, or 'auto' (router); default {DEFAULT_GAMMA}")
    p.add_argument("--no-free-token", action="store_true", help="tandem mode: no primary token after a block")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (prompt processed once)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: the checkpoint's")
    p.add_argument("--cuda-graphs", action="store_true", help="capture decode/verify steps in CUDA graphs")
    add_quantized(p)
    add_draft_quantization(p)
    p.add_argument("--stats", action="store_true", help="print acceptance and speed figures")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
