#!/usr/bin/env python
"""Pilot: a Tandem secondary that also reads its *own* K/V of every earlier position.

In Eq. (2) a drafting query at ``i`` reads primary-derived K/V for ``p < b(i)`` and the secondary's
own only inside its block (``b(i) <= p <= i``). With ``own_context`` it reads its own K/V of every
``p <= i`` as well (each computed with ``p``'s own boundary, as when ``p`` was drafted): the
drafter's context plus the primary's representations. The engine does not serve this variant (it
would keep both K/V sets per position and prefill the secondary on the prompt); this tool measures
whether it is worth building.

It trains the variant exactly as ``tandem-rt train`` trains the Tandem secondary of an existing run
(same plan: the drafter's half-way state, ridge projections, loss, budget, learning-rate factors,
cache), then evaluates it beside the run's drafter and Tandem secondary on the run's held-out
windows (``train.draft_eval.evaluate_drafts``: the columns of the run's ``eval.json``). Resumable:
the training state lives in ``--out`` (default ``<run>/own_context``).

    python tools/pilot_own_context.py --run runs/smollm2/kd_plr --threads 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished `tandem-rt train` run directory (plan.json, cache, "
                    "drafter, tandem)")
    ap.add_argument("--out", default=None, help="training state of the variant (default <run>/own_context)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the evaluation report here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    from tandem_rt.dtypes import resolve_dtype
    from tandem_rt.primary_source import load_primary
    from tandem_rt.train.draft_eval import evaluate_drafts, format_eval_table
    from tandem_rt.train.draft_training import CacheWindowSampler, CachedDraftObjective
    from tandem_rt.train.loop import load_run_state, train
    from tandem_rt.train.pipeline import (TrainError, TrainPlan, _eos_id, _json_write, _train_config,
                                          build_small_models, corpus_files, to_windows, tokenize_corpus, train_small)
    from tandem_rt.train.primary_cache import PrimaryCache

    run = Path(args.run)
    if not (run / "plan.json").is_file() or not (run / "eval.json").is_file():
        raise SystemExit(f"--run {str(run)!r} is not a finished `tandem-rt train` run (plan.json and eval.json)")
    plan = TrainPlan(**json.loads((run / "plan.json").read_text()))
    plan.run_dir = str(run)
    if plan.tandem_init != "drafter-half":
        raise TrainError(f"the pilot trains from the drafter's half-way state; the run has tandem_init={plan.tandem_init!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    t0 = time.time()
    source = load_primary(plan.primary, dtype=resolve_dtype(plan.primary_dtype), progress=progress)
    cache = PrimaryCache(run / "cache")
    layer_map = list(cache.meta["fingerprint"]["layer_map"])

    drafter = train_small(plan, source, layer_map, cache, "drafter", run, progress)     # reloads: finished
    tandem = train_small(plan, source, layer_map, cache, "tandem", run, progress)

    draft = build_small_models(plan, source, layer_map, cache, "tandem")
    draft.own_context = True
    objective = CachedDraftObjective(draft, cache, plan.distil_weight)
    out = Path(args.out) if args.out else run / "own_context"
    if (out / "done.json").is_file():
        objective.load_state_dict(load_run_state(out)["model"])
    else:
        cfg = _train_config(plan, len(cache), 0.5)
        sampler = CacheWindowSampler(len(cache), plan.gamma_max, seed=plan.seed + 1)
        result = train(objective, sampler.sample, cfg, out, sampler=sampler, desc="tandem (own context)",
                       progress=progress)
        if not result["done"]:
            return 1
        _json_write(out / "done.json", result)

    _, heldout_file = corpus_files(plan.corpus)
    eos = _eos_id(source.tokenizer, source.model.config)
    held = tokenize_corpus(source.tokenizer, heldout_file or corpus_files(plan.corpus)[0], run / "tokens" / "heldout.bin",
                           plan.heldout_tokens, eos, progress=False)
    held_w = to_windows(held, plan.seq_len, "held-out")
    models = {"drafter-Distil": drafter.eval(), "Tandem-Distil": tandem.eval(),
              "Tandem-Distil, own context": draft.eval()}
    report = evaluate_drafts(source.model, held_w, models, layer_map, progress=progress)
    report["_meta"] = {"run": str(run), "heldout_windows": int(len(held_w)), "layer_map": layer_map,
                       "wall_s": time.time() - t0, "plan": plan.to_dict()}
    print(format_eval_table({k: v for k, v in report.items() if k != "_meta"}), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
