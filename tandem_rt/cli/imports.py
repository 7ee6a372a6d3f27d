"""``tandem-rt import-hf`` and ``tandem-rt import-gguf``: build a tandem checkpoint from
Hugging Face directories or GGUF files (projections freshly initialised)."""
from __future__ import annotations


def _layer_map(text, flag: str = "--layer-map"):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers such as 3,6, got {text!r}") from None


def _report(out, what: str) -> None:
    from tandem_rt.checkpoint import read_config

    cfg = read_config(out)
    p, s = cfg.primary, cfg.secondary
    print(f"wrote {out} from {what}: primary {p.num_hidden_layers} layers x {p.hidden_size}, "
          f"secondary {s.num_hidden_layers} layers x {s.hidden_size}, vocab {p.vocab_size}, "
          f"layer_map {cfg.layer_map}, dtype {cfg.torch_dtype}"
          + (f", {len(cfg.quantized)} primary matrices as {sorted(set(cfg.quantized.values()))[0]} blocks"
             if cfg.quantized else "")
          + (f", drafter {cfg.drafter.num_hidden_layers} layers x {cfg.drafter.hidden_size}" if cfg.drafter else ""))


def run_import_hf(args) -> int:
    from tandem_rt.hf import import_hf

    out = import_hf(args.primary, args.out, secondary_dir=args.secondary, secondary_config=args.secondary_config,
                    drafter_dir=args.drafter, dtype=args.dtype, layer_map=_layer_map(args.layer_map),
                    seed=args.seed, progress=not args.quiet, quantize=args.quantize)
    _report(out, "Hugging Face directories")
    return 0


def run_import_gguf(args) -> int:
    from tandem_rt.gguf import import_gguf

    out = import_gguf(args.primary, args.out, secondary_gguf=args.secondary, secondary_config=args.secondary_config,
                      drafter_gguf=args.drafter, dtype=args.dtype, layer_map=_layer_map(args.layer_map),
                      seed=args.seed, progress=not args.quiet, quantize=args.quantize)
    _report(out, "GGUF files")
    return 0


def _common(p, source: str) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--secondary", metavar=source, help=f"secondary model ({source})")
    group.add_argument("--secondary-config", metavar="JSON",
                       help="freshly initialised secondary: a JSON file or inline JSON object of model config "
                            "fields (vocab_size, bos/eos ids and max positions default to the primary's)")
    p.add_argument("--drafter", metavar=source, help=f"optional standalone drafter ({source})")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="stored dtype (default bfloat16)")
    p.add_argument("--layer-map", metavar="L1,L2,...",
                   help="primary layer read by each secondary layer (default round((j+1)*L_L/L_S))")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh projections / secondary")
    p.add_argument("--quantize", choices=["Q8_0", "Q4_1"], default=None,
                   help="store the primary's matrices as GGUF blocks (weight-only int8 / int4; "
                        "Engine.from_pretrained(quantized=True) / --quantized serve them as blocks)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("import-hf", help="build a tandem checkpoint from Hugging Face model directories")
    p.add_argument("--primary", required=True, metavar="DIR", help="primary (large) model directory")
    _common(p, "DIR")
    p.set_defaults(func=run_import_hf)

    p = sub.add_parser("import-gguf", help="build a tandem checkpoint from GGUF files (llama architecture)")
    p.add_argument("--primary", required=True, metavar="FILE", help="primary (large) model .gguf")
    _common(p, "FILE")
    p.set_defaults(func=run_import_gguf)
