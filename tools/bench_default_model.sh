#!/usr/bin/env bash
# The measurements of docs/RESULTS.md (default model, CPU): Table 1 on the test split for the
# checkpoints of tools/train_smollm2.sh, accepted drafts per block through the engine, the
# draft-step cost of candidate architectures, the draft vocabulary's coverage, and the end-to-end
# speed against transformers and llama.cpp. Records go to docs/benchmarks/<date>-cpu-*.json.
# TABLE1_VARIANTS: checkpoints under runs/smollm2 evaluated beside the default model (default:
# ckpt_big_kd ckpt_big_embed ckpt_kd_plr ckpt, where present).
#   bash tools/bench_default_model.sh [table1|accepted|cost|coverage|e2e ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/smollm2}
OUT=${OUT:-docs/benchmarks/$(date +%Y-%m-%d)-cpu}
BUNDLED=$($PY -c "from tandem_rt.paths import default_model_path; print(default_model_path())")
CKPTS=(--model "$BUNDLED")   # the default model, then the variants trained here (docs/RESULTS.md)
for c in ${TABLE1_VARIANTS:-ckpt_big_kd ckpt_big_embed ckpt_kd_plr ckpt}; do
  [ -f "$RUNS/$c/model.safetensors" ] && CKPTS+=(--model "$RUNS/$c")
done
table1()   { $PY tools/eval_drafts.py "${CKPTS[@]}" --split test --tokens 32768 --threads 2 --json "$OUT-smollm2-table1.json"; }
accepted() { $PY tools/accepted_per_block.py --split test --gammas 3,5,7 --temperatures 0,1 --prompts 64 \
               --dtype float32 --json "$OUT-smollm2-accepted.json"; }
cost()     { for dt in bfloat16 float32; do
               $PY tools/bench_draft_cost.py --dtype $dt --threads 1 --layers 1,2,4 --vocab 4096,8192,16384,0 \
                   --json "$OUT-smollm2-draft-cost-$dt.json"; done; }
coverage() { $PY tools/draft_vocab_coverage.py --run "$RUNS/main" --threads 2 --json "$OUT-smollm2-draft-vocab-coverage.json"; }
e2e()      { for dt in ${E2E_DTYPES:-bfloat16 float32}; do
               $PY tools/bench_e2e.py --threads 1 --dtype $dt --prompts-file tools/prompts.txt \
                   --max-new-tokens 128 --batch-sizes 1 --num-samples 1 --gammas 3,5,7 --repeats 2 \
                   --peer hf --peer llama.cpp --compare-draft-quantization Q8_0 \
                   --json "$OUT-smollm2-e2e-$dt.json"; done; }   # dense drafts, then Q8_0 (the CPU default)
for step in ${@:-table1 accepted cost coverage e2e}; do
  echo "== $step"; $step
done
