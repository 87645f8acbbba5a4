#!/usr/bin/env bash
# Croc's three-stage recipe end to end at toy scale, on the CPU, and the ablation of its
# comprehension stage (docs/EXPERIMENTS.md). For each seed:
#
#   data      tools/make_demo_data.py --recipe: text / caption / instruct / held-out eval splits,
#             one tokenizer (the demo world's rendered shapes)
#   lm        a text-only language-model stage (Croc starts from a pretrained LLM; the toy
#             model needs one too): the instruct stage's trainer on the text split
#   align     stage 1: the projector on captions, from lm's weights
#   stage 1.5 one VARIANT (below), from align's weights, on the same captions
#   instruct  stage 2: short-answer questions (and some captions), from stage 1.5's weights
#   eval      tools/evaluate.py on the held-out split: LM loss, accuracy per question type,
#             caption facts
#
# Variants of stage 1.5 (the paper's control is "caption": the same data without Croc's objective):
#   untrained     no training at all: the model as initialised, evaluated (the table's floor)
#   none          no stage 1.5 (instruct starts from align)
#   caption       plain captioning: LLM + projector, causal attention, LM loss only
#   croc          the comprehension stage (pool, Hungarian matching, visual attention, LM + VTR loss)
#   croc-novtr    croc with --croc-vtr-weight 0
#   croc-nearest  croc with --croc-matcher nearest
#   croc-prefix   croc with --croc-attention prefix
#   croc-normal   croc with --croc-pool-init normal
#
# Usage: bash examples/croc_recipe_demo.sh      (the whole table: 22 minutes on 2 CPU cores)
# Settings (environment; defaults in the lines below): OUT, SEEDS, VARIANTS, EXTRA_SEEDS (the seeds
# that also run EXTRA_VARIANTS; EXTRA_VARIANTS= runs none), JOBS (runs at once, one CPU thread
# each; default: the number of cores), LM_ITERS, ALIGN_ITERS, STAGE15_ITERS, INSTRUCT_ITERS, the
# split sizes TEXT_SAMPLES, CAPTION_SAMPLES, INSTRUCT_SAMPLES, EVAL_SAMPLES, and EVAL_LIMIT (questions).
# Each stage's log is OUT/seed<S>/<stage>.log; OUT/timings.tsv holds each stage's wall time;
# OUT/table.md the table (mean +- std over seeds).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || { echo "error: $PYTHON not found; run 'bash scripts/setup.sh' first (or set PYTHON)" >&2; exit 2; }
OUT=${OUT:-outputs/croc_recipe}
SEEDS=${SEEDS:-1 2 3}
VARIANTS=${VARIANTS:-untrained none caption croc}
EXTRA_SEEDS=${EXTRA_SEEDS:-1}
EXTRA_VARIANTS=${EXTRA_VARIANTS-croc-novtr croc-nearest croc-prefix croc-normal}
JOBS=${JOBS:-$(nproc)}
LM_ITERS=${LM_ITERS:-300}
ALIGN_ITERS=${ALIGN_ITERS:-150}
STAGE15_ITERS=${STAGE15_ITERS:-300}
INSTRUCT_ITERS=${INSTRUCT_ITERS:-300}
TEXT_SAMPLES=${TEXT_SAMPLES:-2000}
CAPTION_SAMPLES=${CAPTION_SAMPLES:-2000}
INSTRUCT_SAMPLES=${INSTRUCT_SAMPLES:-2000}
EVAL_SAMPLES=${EVAL_SAMPLES:-350}
EVAL_LIMIT=${EVAL_LIMIT:-}
SEQ_LENGTH=192  # the longest instruct sample is 179 tokens with its 16 visual tokens

mkdir -p "$OUT"
# one CPU thread per run, JOBS runs at once: the tiny model gains nothing from more threads
export OMP_NUM_THREADS=1 NPROC_PER_NODE=1 TP=1 PP=1
unset STAGE
COMMON=(--model tiny --seq-length "$SEQ_LENGTH" --micro-batch-size 4 --global-batch-size 16 --num-workers 0
        --log-interval 50)
# The LLM and projector learn at one rate in the toy (the paper's 2e-5 / 1.5e-4 are for a 7B LLM)
LR_LM=(--lr 2e-3 --projector-lr 2e-3)
LR_STAGE=(--lr 1e-3 --projector-lr 1e-3)

timed() {  # timed SEED NAME LOG command...: run, append "seed name seconds" to timings.tsv
  local seed=$1 name=$2 log=$3 start=$SECONDS
  shift 3
  if ! "$@" >"$log" 2>&1; then
    echo "error: seed $seed, $name failed; its log: $log" >&2
    tail -5 "$log" >&2
    return 1
  fi
  printf '%s\t%s\t%s\n' "$seed" "$name" "$((SECONDS - start))" >>"$OUT/timings.tsv"
}

stage() {  # stage SEED NAME CROC_STAGE DATA ITERS LOAD_OR_- [extra trainer flags...]
  local seed=$1 name=$2 croc_stage=$3 data=$4 iters=$5 load=$6
  shift 6
  local dir="$OUT/seed$seed"
  if [ -f "$dir/$name/latest_checkpointed_iteration.txt" ] &&
     [ "$(cat "$dir/$name/latest_checkpointed_iteration.txt")" = "$iters" ]; then
    return 0  # done by an earlier run of this script
  fi
  local load_flags=()
  [ "$load" = - ] || load_flags=(--load "$dir/$load" --finetune)
  rm -rf "${dir:?}/$name" "$dir/tb/$name"
  timed "$seed" "$name" "$dir/$name.log" bash examples/pretrain_croc.sh "${COMMON[@]}" --croc-stage "$croc_stage" \
    --data-path "$data" --train-iters "$iters" --seed "$seed" "${load_flags[@]}" --save "$dir/$name" \
    --tensorboard-dir "$dir/tb/$name" "$@"
}

croc_flags() {  # croc_flags VARIANT: the trainer flags of a comprehension-stage variant
  case "$1" in
    croc) ;;
    croc-novtr) echo --croc-vtr-weight 0 ;;
    croc-nearest) echo --croc-matcher nearest ;;
    croc-prefix) echo --croc-attention prefix ;;
    croc-normal) echo --croc-pool-init normal ;;
    *) echo "error: unknown variant $1 (see the top of examples/croc_recipe_demo.sh)" >&2; return 2 ;;
  esac
}

variant() {  # variant SEED VARIANT: stage 1.5 from align, instruct from it, evaluation
  local seed=$1 variant=$2 dir="$OUT/seed$1" from="s15-$2" flags
  local evaluated="instruct-$variant"
  case "$variant" in
    untrained) evaluated=untrained  # the floor: the model as initialised (one step at LR 0), never trained
       stage "$seed" untrained instruct "$INSTRUCT_DATA" 1 - --lr 0 --min-lr 0 --projector-lr 0 ;;
    none) from=align ;;
    caption) stage "$seed" "$from" instruct "$CAPTION_DATA" "$STAGE15_ITERS" align "${LR_STAGE[@]}" ;;
    *) flags=$(croc_flags "$variant")
       # shellcheck disable=SC2086
       stage "$seed" "$from" croc "$CAPTION_DATA" "$STAGE15_ITERS" align "${LR_STAGE[@]}" $flags ;;
  esac
  [ "$variant" = untrained ] ||
    stage "$seed" "instruct-$variant" instruct "$INSTRUCT_DATA" "$INSTRUCT_ITERS" "$from" "${LR_STAGE[@]}"
  if [ ! -f "$dir/eval-$variant/summary.json" ]; then
    timed "$seed" "eval-$variant" "$dir/eval-$variant.log" "$PYTHON" tools/evaluate.py \
      --load "$dir/$evaluated" --model tiny --data-path "$EVAL_DATA" --output-dir "$dir/eval-$variant" --overwrite \
      --no-progress ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}
  fi
}

seed_data() {  # seed_data SEED: build the seed's splits, set TEXT_DATA CAPTION_DATA INSTRUCT_DATA EVAL_DATA
  local seed=$1
  "$PYTHON" tools/make_demo_data.py --recipe --output-dir "$OUT/data" --seed "$seed" --seq-length "$SEQ_LENGTH" \
    --text-samples "$TEXT_SAMPLES" --caption-samples "$CAPTION_SAMPLES" --instruct-samples "$INSTRUCT_SAMPLES" \
    --eval-samples "$EVAL_SAMPLES" >/dev/null
  # shellcheck disable=SC1090
  source "$OUT/data/recipe_seed$seed.env"
}

job() {  # job SEED VARIANT: the seed's data, lm and align (once: the first of its jobs builds them), then VARIANT
  set -euo pipefail
  local seed=$1 variant=$2
  mkdir -p "$OUT/seed$seed"
  (
    flock 9
    seed_data "$seed"
    [ "$variant" = untrained ] && exit 0
    stage "$seed" lm instruct "$TEXT_DATA" "$LM_ITERS" - "${LR_LM[@]}"
    stage "$seed" align align "$CAPTION_DATA" "$ALIGN_ITERS" lm "${LR_LM[@]}"
  ) 9>"$OUT/seed$seed/.base.lock"
  # the data prefixes the block above (re)wrote, into this shell
  # shellcheck disable=SC1090
  source "$OUT/data/recipe_seed$seed.env"
  variant "$seed" "$variant"
  echo "recipe: seed $seed, $variant done"
}

jobs_list() {  # the main variants seed by seed in turn (so JOBS seeds start at once), then the extras
  local v seed
  for v in $VARIANTS; do for seed in $SEEDS; do echo "$seed $v"; done; done
  for v in $EXTRA_VARIANTS; do for seed in $EXTRA_SEEDS; do echo "$seed $v"; done; done
}

for v in $VARIANTS $EXTRA_VARIANTS; do  # a typo fails now, not after the first stages
  case "$v" in untrained|none|caption) ;; *) croc_flags "$v" >/dev/null || exit 2 ;; esac
done

echo "recipe: seeds [$SEEDS], variants [$VARIANTS], extra variants [$EXTRA_VARIANTS] on seeds [$EXTRA_SEEDS]," \
     "$JOBS runs at once; outputs in $OUT"
start=$SECONDS
export -f timed stage croc_flags variant seed_data job
export PYTHON OUT LM_ITERS ALIGN_ITERS STAGE15_ITERS INSTRUCT_ITERS TEXT_SAMPLES CAPTION_SAMPLES INSTRUCT_SAMPLES \
       EVAL_SAMPLES EVAL_LIMIT SEQ_LENGTH
export COMMON_FLAGS="${COMMON[*]}" LR_LM_FLAGS="${LR_LM[*]}" LR_STAGE_FLAGS="${LR_STAGE[*]}"
# shellcheck disable=SC2016
jobs_list | xargs -P "$JOBS" -L1 bash -c \
  'COMMON=($COMMON_FLAGS); LR_LM=($LR_LM_FLAGS); LR_STAGE=($LR_STAGE_FLAGS); job "$0" "$1"'
"$PYTHON" -m megatron_croc.evaluation.table "$OUT" --output "$OUT/table.md"
echo "recipe: done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s; table: $OUT/table.md"
