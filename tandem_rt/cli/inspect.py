"""``tandem-rt inspect CKPT``: configs, parameter counts, dtypes, bytes per part."""
from __future__ import annotations

import json
import math
from collections import defaultdict


def summarize(path: str) -> dict:
    """Per part (primary, secondary, tandem, drafter, router): tensors, parameters, bytes, dtypes."""
    from tandem_rt.checkpoint import read_config, read_safetensors_header, weight_files

    cfg = read_config(path)
    files = weight_files(path)
    headers = {f: read_safetensors_header(f) for f in set(files.values())}
    parts: dict = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0, "dtypes": set()})
    for name, file in files.items():
        info = headers[file][name]
        part = parts[name.split(".", 1)[0]]
        part["tensors"] += 1
        part["parameters"] += math.prod(info["shape"])
        part["bytes"] += info["data_offsets"][1] - info["data_offsets"][0]
        part["dtypes"].add(info["dtype"])
    out = {name: {**v, "dtypes": sorted(v["dtypes"])} for name, v in sorted(parts.items())}
    return {"config": cfg.to_dict(), "parts": out}


def run(args) -> int:
    summary = summarize(args.checkpoint)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    cfg = summary["config"]
    print(f"checkpoint {args.checkpoint} (format {cfg['format']} v{cfg['format_version']}, dtype {cfg['torch_dtype']})")
    for role in ("primary", "secondary", "drafter"):
        m = cfg[role]
        if m is None:
            continue
        print(f"  {role:9s}: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, ffn {m['intermediate_size']}, "
              f"heads {m['num_attention_heads']}/{m['num_key_value_heads']} kv, head_dim {m['head_dim']}, "
              f"vocab {m['vocab_size']}"
              + (f" (draft vocabulary {m['output_vocab_size']})" if m.get("output_vocab_size") else "")
              + f", rope_theta {m['rope_theta']:g}")
    print(f"  layer_map {cfg['layer_map']}, train_block_length {cfg['train_block_length']}, "
          f"router {'yes' if cfg['router'] else 'no'}")
    ref = cfg.get("primary_source")
    if ref is not None:
        where = f"package {ref['package']}: {ref['file']}" if "package" in ref else ref["path"]
        print(f"  primary weights not stored: {ref['kind']} source {where} (sha256 {ref['sha256']})")
    if cfg.get("shared_embeddings"):
        print(f"  token embeddings shared with the primary: {', '.join(cfg['shared_embeddings'])}")
    print(f"  {'part':10s} {'tensors':>8s} {'parameters':>12s} {'MiB':>9s}  dtypes")
    for name, p in summary["parts"].items():
        print(f"  {name:10s} {p['tensors']:8d} {p['parameters']:12,d} {p['bytes'] / 2**20:9.2f}  {','.join(p['dtypes'])}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's configs, parameter counts and sizes")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
