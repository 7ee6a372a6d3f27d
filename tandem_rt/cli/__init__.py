"""``tandem-rt`` command line. Each subcommand lives in its own module with ``register(sub)``.

Errors are one clear line on stderr with exit code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module name -> registers one or more subcommands
SUBCOMMAND_MODULES = ["info", "inspect", "imports", "eval", "generate", "serve", "train"]


class CLIError(Exception):
    """An error to print as one line (exit code 2)."""


def add_draft_quantization(p: argparse.ArgumentParser) -> None:
    """``--draft-quantization {auto,none,Q8_0,Q4_1}`` (``args.draft_quantization``: "auto", None or
    the block type, as ``Engine.from_pretrained`` takes it)."""
    p.add_argument("--draft-quantization", default="auto", choices=["auto", "none", "Q8_0", "Q4_1"],
                   help="the drafting models (secondary, drafter) read their matrices as blocks of this type, "
                        "quantized at load (lossless modes unchanged); auto: Q8_0 on the CPU in bf16 / fp32")


def draft_quantization(args):
    """``args.draft_quantization`` for ``Engine.from_pretrained`` ("none" -> None)."""
    return None if args.draft_quantization == "none" else args.draft_quantization


def add_quantized(p: argparse.ArgumentParser) -> None:
    """``--quantized`` / ``--no-quantized`` (``args.quantized``: True, False, or "auto" when neither
    is given, as ``Engine.from_pretrained`` takes it)."""
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default="auto",
                   help="the primary reads the Q8_0/Q4_0/Q4_1 blocks the checkpoint stores or the GGUF file it "
                        "references (--no-quantized: the dequantised weights); default: the blocks on a CPU with "
                        "the int8 kernels (AVX-512 VNNI or AVX2) when they are Q8_0 / Q4_1, else the dense weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem-rt", description="Tandem Transformers inference runtime")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"tandem_rt.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tandem-rt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line unless --debug
        if args.debug:
            raise
        print(f"tandem-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
