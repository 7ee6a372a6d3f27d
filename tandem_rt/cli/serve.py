"""``tandem-rt serve``: an OpenAI-compatible HTTP server (tandem_rt/server.py, docs/SERVING.md)."""
from __future__ import annotations

import sys


def run(args) -> int:
    from tandem_rt.cli import draft_quantization as cli_draft_quantization
    from tandem_rt.chat import load_chat_template
    from tandem_rt.cli import CLIError
    from tandem_rt.engine import Engine
    from tandem_rt.engine.engine import _default_model_path
    from tandem_rt.server import serve

    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port must be in [1, 65535], got {args.port}")
    path = args.model if args.model is not None else _default_model_path()
    engine = Engine.from_pretrained(path, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
                                    use_cuda_graphs=args.cuda_graphs, quantized=args.quantized,
                                    max_queued_requests=args.max_queued_requests, draft_policy=args.draft_policy,
                                    draft_quantization=cli_draft_quantization(args))
    template = load_chat_template(path) if path is not None else None
    name = args.served_model_name or "tandem-rt"
    print(f"tandem-rt serve: {name} ({path}) on http://{args.host}:{args.port} "
          f"({'with' if template else 'without'} a chat template)", file=sys.stderr)
    serve(engine, host=args.host, port=args.port, model_name=name, chat_template=template,
          log_level=args.log_level)
    return 0


def register(sub) -> None:
    from tandem_rt.cli import add_draft_quantization, add_quantized
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients name (default: tandem-rt)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: the checkpoint's")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences in the running batch at most")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for admission before new ones get 503")
    p.add_argument("--draft-policy", default="router", choices=["router", "cost"],
                   help="gamma=auto: stop drafting by the router alone, or also by the batch's measured cost "
                        "(faster under load; seeded sampled requests then depend on the batch)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture decode/verify steps in CUDA graphs")
    add_quantized(p)
    add_draft_quantization(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
