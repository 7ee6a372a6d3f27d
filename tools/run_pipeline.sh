#!/usr/bin/env bash
# The whole toy-scale pipeline (a 6.3 M-parameter primary pretrained here, its Tandem secondary,
# drafter and router; docs/RESULTS_TOY.md) -> runs/toy/ckpt. The default model is
# trained by tools/train_smollm2.sh instead.
#   tools/run_pipeline.sh all        # everything, in order
#   tools/run_pipeline.sh prep|pretrain|tandem|router|report|export|threshold|accepted   # one phase
# On the 2-core development machine every run is one process with 2 threads and torch.compile
# (1.4x faster than eager on CPU); under torchrun the same scripts run DDP (gloo / NCCL).
# Every training run is resumable: rerun the same phase after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
TORCHRUN=${TORCHRUN:-torchrun}
RUNS=${RUNS:-runs}
TOK=${STAGE_TOKENS:-1500000}         # tokens per tandem / distillation stage
TRAIN="--bf16 --compile --threads 2 --batch-size 16 --seq-len 256"
export PYTHONPATH=${PYTHONPATH:-$PWD}

prep() {
  $PY tools/train_tokenizer.py --out $RUNS/tokenizer.json --vocab-size 8192
  $PY tools/prepare_data.py --tokenizer $RUNS/tokenizer.json --out $RUNS/data
}
pretrain() {
  $PY tools/pretrain.py --role primary --tokens 15000000 --lr 2e-3 --warmup 100 $TRAIN --ckpt-every 100 \
      --data $RUNS/data --out $RUNS/primary > $RUNS/primary.log 2>&1
  $PY tools/pretrain.py --role secondary --tokens 4000000 --lr 3e-3 --warmup 100 $TRAIN --ckpt-every 100 \
      --data $RUNS/data --out $RUNS/secondary > $RUNS/secondary.log 2>&1
}
stage() {  # stage MODE INIT WEIGHT OUT [TOKENS] [BLOCK_LENGTH]
  $PY tools/train_tandem.py --mode $1 --primary $RUNS/primary --init $2 --distil-weight $3 --tokens ${5:-$TOK} \
      --block-length ${6:-2} --lr 1e-3 --warmup ${7:-50} $TRAIN --ckpt-every 50 --data $RUNS/data --out $4 > $4.log 2>&1
}
tandem() {
  stage tandem $RUNS/secondary 0 $RUNS/tandem_s1                   # Tandem stage 1 (CE)
  stage drafter $RUNS/secondary 0.5 $RUNS/secondary_distil         # secondary-Distil
  stage tandem $RUNS/tandem_s1 0.5 $RUNS/tandem_distil             # Tandem-Distil stage 2 (Table 1)
  stage tandem $RUNS/tandem_s1 0 $RUNS/tandem_ce                   # Tandem-CE (stage 2 with CE)
  # the bundled secondary: Tandem-Distil stage 2 with block length 5 (drafts of up to 5 tokens
  # read up to 5 of their own positions in the engine; block length 2 trains only 0 or 1)
  stage tandem $RUNS/tandem_s1 0.5 $RUNS/tandem_distil_g5 600000 5 20
}
router() {
  $PY tools/train_router.py --tandem $RUNS/tandem_distil --data $RUNS/data --out $RUNS/router --steps 800 \
      > $RUNS/router.log 2>&1
  $PY tools/train_router.py --tandem $RUNS/tandem_distil_g5 --data $RUNS/data --out $RUNS/router_g5 --steps 800 \
      > $RUNS/router_g5.log 2>&1
}
report() {
  $PY tools/report.py --runs $RUNS --data $RUNS/data --split test --max-tokens 65536 --out docs
}
export_model() {
  $PY tools/export_bundled.py --tandem $RUNS/tandem_distil_g5 --drafter $RUNS/secondary_distil \
      --router $RUNS/router_g5/router.pt --tokenizer $RUNS/tokenizer.json --out $RUNS/toy/ckpt
}
BUNDLED=$RUNS/toy/ckpt
threshold() {   # router threshold by measured engine speed on val (writes it into the checkpoint)
  $PY tools/choose_router_threshold.py --model $BUNDLED --threads 2 --prompts 6 --repeats 2 \
      --thresholds 0.5,0.6,0.65,0.7,0.75,0.8,0.85,0.9 --gammas 2,3,4,5,6 --json docs/benchmarks/$(date +%F)-cpu-toy-router-threshold.json --write
}
accepted() {    # accepted drafts per block through the engine, test split (Table 1's last goal)
  $PY tools/accepted_per_block.py --model $BUNDLED --split test --gammas 3,5,7 --prompts 24 \
      --dtype float32 --json docs/benchmarks/$(date +%F)-cpu-toy-accepted.json
}
case "${1:-all}" in
  prep) prep ;;
  pretrain) pretrain ;;
  tandem) tandem ;;
  router) router ;;
  report) report ;;
  export) export_model ;;
  threshold) threshold ;;
  accepted) accepted ;;
  post) tandem; router; report; export_model; threshold; accepted ;;
  all) prep; pretrain; tandem; router; report; export_model; threshold; accepted ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
