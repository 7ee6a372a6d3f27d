#!/usr/bin/env bash
# The whole training pipeline with the settings of the bundled model (docs/RESULTS.md).
#   tools/run_pipeline.sh all        # everything, in order
#   tools/run_pipeline.sh prep|pretrain|tandem|router|report|export   # one phase
# Two CPU processes with one thread each (DDP for the primary, independent runs otherwise).
# Every training run is resumable: rerun the same phase after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
TORCHRUN=${TORCHRUN:-torchrun}
RUNS=${RUNS:-runs}
TOK=${STAGE_TOKENS:-300000}          # tokens per tandem / distillation stage
export PYTHONPATH=${PYTHONPATH:-$PWD} OMP_NUM_THREADS=1

prep() {
  $PY tools/train_tokenizer.py --out $RUNS/tokenizer.json --vocab-size 8192
  $PY tools/prepare_data.py --tokenizer $RUNS/tokenizer.json --out $RUNS/data
}
pretrain() {
  $PY tools/pretrain.py --role secondary --tokens 800000 --batch-size 8 --seq-len 256 --lr 2e-3 --warmup 40 \
      --bf16 --threads 1 --ckpt-every 25 --data $RUNS/data --out $RUNS/secondary > $RUNS/secondary.log 2>&1 &
  $TORCHRUN --standalone --nproc_per_node 2 tools/pretrain.py --role primary --tokens 1300000 --batch-size 4 \
      --seq-len 256 --lr 1.5e-3 --warmup 40 --bf16 --threads 1 --ckpt-every 20 --device cpu \
      --data $RUNS/data --out $RUNS/primary > $RUNS/primary.log 2>&1
  wait
}
stage() {  # stage MODE INIT WEIGHT OUT
  $PY tools/train_tandem.py --mode $1 --primary $RUNS/primary --init $2 --distil-weight $3 --tokens $TOK \
      --batch-size 8 --seq-len 256 --lr 1e-3 --warmup 20 --bf16 --threads 1 --ckpt-every 20 \
      --data $RUNS/data --out $4 > $4.log 2>&1
}
tandem() {
  stage tandem $RUNS/secondary 0 $RUNS/tandem_s1 &                 # Tandem stage 1 (CE)
  stage drafter $RUNS/secondary 0.5 $RUNS/secondary_distil &       # secondary-Distil
  wait
  stage tandem $RUNS/tandem_s1 0.5 $RUNS/tandem_distil &           # Tandem-Distil stage 2
  stage tandem $RUNS/tandem_s1 0 $RUNS/tandem_ce &                 # Tandem-CE (stage 2 with CE)
  wait
}
router() {
  $PY tools/train_router.py --tandem $RUNS/tandem_distil --data $RUNS/data --out $RUNS/router --steps 800 \
      > $RUNS/router.log 2>&1
}
report() {
  $PY tools/report.py --runs $RUNS --data $RUNS/data --split test --max-tokens 65536 --out docs
}
export_model() {
  $PY tools/export_bundled.py --tandem $RUNS/tandem_distil --drafter $RUNS/secondary_distil \
      --router $RUNS/router/router.pt --tokenizer $RUNS/tokenizer.json --out tandem_rt/bundled/tandem-gutenberg
}
case "${1:-all}" in
  prep) prep ;;
  pretrain) pretrain ;;
  tandem) tandem ;;
  router) router ;;
  report) report ;;
  export) export_model ;;
  post) tandem; router & report; wait; export_model ;;
  all) prep; pretrain; tandem; router & report; wait; export_model ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
