"""``tandem-rt train``: train a Tandem secondary, a standalone drafter and a router for a primary
(a .gguf file, a Hugging Face directory or a tandem checkpoint) on a text corpus; resumable."""
from __future__ import annotations

import json

from tandem_rt.cli.imports import _layer_map


def run_train(args) -> int:
    from tandem_rt.train.pipeline import TrainPlan, run_pipeline

    package = None
    if args.package_source:
        name, _, file = args.package_source.partition(":")
        if not name or not file:
            raise ValueError(f"--package-source must be PACKAGE:FILE, got {args.package_source!r}")
        package = {"package": name, "file": file}
    plan = TrainPlan(primary=args.primary, corpus=args.corpus, out=args.out, run_dir=args.run_dir,
                     train_tokens=args.train_tokens, heldout_tokens=args.heldout_tokens, seq_len=args.seq_len,
                     num_layers=args.layers, init=args.init, layer_map=_layer_map(args.layer_map),
                     init_layers=_layer_map(args.init_layers, "--init-layers"),
                     proj_init=args.proj_init, tandem_init=args.tandem_init, feature_layer=args.feature_layer,
                     feature_at=args.feature_at, feature_hidden=args.feature_hidden,
                     projection_embed=args.projection_embed,
                     proj_lr_scale=args.proj_lr_scale, feature_lr_scale=args.feature_lr_scale,
                     draft_vocab=args.draft_vocab or None, top_k=args.top_k, gamma_max=args.gamma_max,
                     distil_weight=args.distil_weight, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, router_threshold=args.router_threshold, primary_dtype=args.primary_dtype,
                     train_dtype=None if args.train_dtype == "auto" else args.train_dtype,
                     out_dtype=args.dtype, reference_primary=args.reference_primary or package is not None,
                     package_source=package, threads=args.threads)
    report = run_pipeline(plan, progress=not args.quiet, stop_after=args.stop_after)
    if args.json and report:
        print(json.dumps(report, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a Tandem secondary, drafter and router for a primary (resumable)",
                       description=__doc__)
    p.add_argument("--primary", required=True, metavar="SRC", help="primary: .gguf file, Hugging Face directory "
                   "or tandem checkpoint directory")
    p.add_argument("--corpus", required=True, metavar="PATH", help="directory with train.txt[.xz] (and val.txt[.xz] "
                   "for held-out text) or one text file; one paragraph per line")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--run-dir", required=True, metavar="DIR", help="stage outputs (caches, run states); "
                   "rerun with the same options to resume")
    p.add_argument("--train-tokens", type=int, default=400_000, help="training tokens cached (default %(default)s)")
    p.add_argument("--heldout-tokens", type=int, default=16_384, help="held-out tokens (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="secondary / drafter layers (default %(default)s)")
    p.add_argument("--init", default="primary", choices=["primary", "scratch"],
                   help="initialise the small models from the primary's embeddings and first layers (default)")
    p.add_argument("--layer-map", metavar="L1,L2,...", help="primary layer read by each secondary layer")
    p.add_argument("--init-layers", metavar="L1,L2,...",
                   help="primary layers the small models copy (0-based; default the first --layers); "
                        "the layer map then defaults to them (each layer reads the primary's input to its own copy)")
    p.add_argument("--proj-init", default="lstsq", choices=["lstsq", "random", "identity"],
                   help="Tandem projections: ridge regression onto the secondary's own residuals, random, or "
                        "identity (with --init-layers: the primary-derived K/V start as the primary's own)")
    p.add_argument("--tandem-init", default="drafter-half", choices=["drafter-half", "init"],
                   help="Tandem secondary starts from the drafter after half the budget and trains the other "
                        "half (default; same total budget), or from the drafter's init with the full budget")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="reduced output vocabulary of the drafters: the N tokens most often predicted or seen "
                        "in the training cache (0: the full vocabulary; default %(default)s)")
    p.add_argument("--feature-layer", type=int, default=None, metavar="L",
                   help="feed the primary's layer-L representation (one of the layer map) before each block "
                        "into the secondary's input embeddings (EAGLE-style feature input; default: none)")
    p.add_argument("--feature-at", default="input", choices=["input", "output"],
                   help="where the feature input enters the secondary: its input embeddings or its last "
                        "residual before the final norm (default %(default)s)")
    p.add_argument("--feature-hidden", type=int, default=None, metavar="H",
                   help="the feature input as a two-layer MLP of hidden width H (default: one matrix)")
    p.add_argument("--projection-embed", action="store_true",
                   help="token-anchored projections: the primary-derived residual of each secondary layer adds "
                        "the token's embedding (keys of earlier tokens keep their identity; default: Eq. (2))")
    p.add_argument("--proj-lr-scale", type=float, default=1.0, metavar="F",
                   help="learning rate of the Tandem projections relative to --lr (default %(default)s)")
    p.add_argument("--feature-lr-scale", type=float, default=None, metavar="F",
                   help="learning rate of the feature input relative to --lr (default: --proj-lr-scale)")
    p.add_argument("--top-k", type=int, default=32, help="primary distribution entries cached per position")
    p.add_argument("--gamma-max", type=int, default=8, help="drafting block lengths trained: 1..N")
    p.add_argument("--distil-weight", type=float, default=0.5)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router-threshold", type=float, default=0.9)
    p.add_argument("--train-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="autocast dtype of the small models' training (auto: bfloat16 where the CPU has "
                        "native bf16 products, AVX-512 BF16 / AMX; else float32)")
    p.add_argument("--primary-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the frozen primary (default float32: faster than bf16 without AMX)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"], help="stored dtype")
    p.add_argument("--reference-primary", action="store_true",
                   help="name the primary by path and sha256 instead of storing a copy")
    p.add_argument("--package-source", metavar="PACKAGE:FILE",
                   help="name the primary as a file of an installed Python package (implies --reference-primary)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stop-after", choices=["tokenize", "cache", "drafter", "tandem", "router", "export"])
    p.add_argument("--json", action="store_true", help="print the evaluation report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)
