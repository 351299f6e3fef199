#!/usr/bin/env bash
# Question anchors and teacher targets in training, side by side on one GPU at the same budget.
#
#   DATA=../shared/data RUNS=runs MIN=7 bash scripts/train_anchored.sh
#
# The arms continue the shipped kv-k16 for MIN minutes each, all at once (they share the GPU). They share one recipe (mix: regen 0.2, continue 0.2, qa 0.4, cloze 0.2 with two
# cloze questions per corpus text; 1-2 chunks per QA prompt; batch BS, default 64; lr 2e-4) and
# differ only in the arms below. Memory: an arm takes about 36 GB at batch 128, so five at
# batch 128 do not fit one 141 GB H200; run them in two waves (ARMS="gold teacher", then the others),
# as the 2026-12-02 runs did, or at batch 64.
#   gold                gold answers (the control)
#   anchors             + up to 32 question-anchor tokens per chunk after its slots in QA steps,
#                         chosen as the engine chooses them at answer time (--anchors 32; the runs
#                         in docs/training.md predate anchors in multi-chunk steps)
#   teacher             the frozen model's own full-text answers as QA targets (--teacher-targets 1)
#   teacher-anchors     both
#   teacher-anchors-kl  both, + 0.5 KL to the full-text model's token distributions (--distill 0.5)
#   anchors-kl          anchors with gold answers, + 0.5 KL to the full-text model (--distill 0.5)
#   teacher-half-anchors anchors, half the QA samples on the teacher's answer (--teacher-targets 0.5)
#   teacher-half-anchors-verify  the same, with half of the cloze questions asked as yes/no checks
#                         of a sentence as the text has it or with its detail swapped (--verify-share 0.5)
#   k4, k1, emb16       the teacher-half-anchors recipe for the shipped kv-k4, kv-k1 and embedding-k16
#   teacher-75-anchors-verify  teacher-half-anchors-verify with three quarters of the QA samples on the
#                         teacher's answer (--teacher-targets 0.75)
#   k4-verify, k1-verify, emb16-verify  the teacher-half-anchors-verify recipe for kv-k4, kv-k1, embedding-k16
#   window-verify       teacher-half-anchors-verify with the engine's sentence window in the QA prompts
#                         (--window-share 0.5): the K/V learn beside the anchors the engine now reads
#   k4-window, k1-window  the shipped kv-k4 and kv-k1 recipes (teacher-half-anchors) with the window
# TEACHER_ANSWERS=FILE: a teacher_answers_qa.json of an earlier run on the same data, copied into every
# teacher arm instead of generating it again (a few GPU minutes; the trainer checks it fits the data).
# ARMS defaults to the first seven (the kv-k16 arms). The teacher answers are generated once (by the first teacher arm) and shared. Running the script
# again resumes every arm from its state.pt.
set -u
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
MIN=${MIN:-7}
BS=${BS:-64}
PY=${PY:-python3}
mkdir -p "$RUNS"
$PY -c "from compressor_plugin.models import ensure_default_model as e; print(e())" >/dev/null

common="--stage mix --mix regen=0.2,continue=0.2,qa=0.4,cloze=0.2 --cloze-per-text 2
        --data $DATA/arxiv_abstracts_train.jsonl $DATA/squad1.1_train_subset.jsonl
        --init kv-k16 --lr 2e-4 --warmup-steps 30 --batch-size $BS --max-minutes $MIN --max-chunks 2
        --max-tokens 192 --max-target-tokens 192 --val-data $DATA/squad1.1_dev.jsonl --val-samples 128
        --eval-every 40 --save-every 40 --log-every 10 --no-progress"

arm() {  # name extra-args...
  local name=$1
  shift
  # shellcheck disable=SC2086
  $PY -m compressor_plugin.cli train --output "$RUNS/$name" $common "$@" > "$RUNS/$name.log" 2>&1 \
      && echo "DONE $name" || echo "FAILED $name"
}

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_WAIT_POLICY=PASSIVE
want() { [[ " ${ARMS:-$kv16} " == *" $1 "* ]]; }  # ARMS="a b": only these arms
declare -A args=(
  [gold]=""
  [anchors]="--anchors 32"
  [anchors-kl]="--anchors 32 --distill 0.5"
  [teacher]="--teacher-targets 1"
  [teacher-half-anchors]="--teacher-targets 0.5 --anchors 32"
  [teacher-anchors]="--teacher-targets 1 --anchors 32"
  [teacher-anchors-kl]="--teacher-targets 1 --anchors 32 --distill 0.5"
  [teacher-half-anchors-verify]="--teacher-targets 0.5 --anchors 32 --verify-share 0.5"
  [k4]="--init kv-k4 --k 4 --teacher-targets 0.5 --anchors 32"
  [k1]="--init kv-k1 --k 1 --teacher-targets 0.5 --anchors 32"
  [emb16]="--init embedding-k16 --mode embedding --teacher-targets 0.5 --anchors 32"
  [teacher-75-anchors-verify]="--teacher-targets 0.75 --anchors 32 --verify-share 0.5"
  [k4-verify]="--init kv-k4 --k 4 --teacher-targets 0.5 --anchors 32 --verify-share 0.5"
  [k1-verify]="--init kv-k1 --k 1 --teacher-targets 0.5 --anchors 32 --verify-share 0.5"
  [emb16-verify]="--init embedding-k16 --mode embedding --teacher-targets 0.5 --anchors 32 --verify-share 0.5"
  [window-verify]="--teacher-targets 0.5 --anchors 32 --verify-share 0.5 --window-share 0.5"
  [k4-window]="--init kv-k4 --k 4 --teacher-targets 0.5 --anchors 32 --window-share 0.5"
  [k1-window]="--init kv-k1 --k 1 --teacher-targets 0.5 --anchors 32 --window-share 0.5"
)
kv16="gold anchors anchors-kl teacher teacher-half-anchors teacher-anchors teacher-anchors-kl"
order="$kv16 teacher-half-anchors-verify teacher-75-anchors-verify k4 k1 emb16 k4-verify k1-verify emb16-verify
       window-verify k4-window k1-window"
for name in ${ARMS:-}; do [ -n "${args[$name]+x}" ] || { echo "unknown arm $name" >&2; exit 2; }; done
# The first teacher arm generates the full-text answers before its first step; the others copy them.
answers=teacher_answers_qa.json first=""
for name in $order; do
  want "$name" && [[ ${args[$name]} == *teacher-targets* ]] && { first=$name; break; }
done
if [ -n "$first" ] && [ -n "${TEACHER_ANSWERS:-}" ]; then  # answers given: every teacher arm starts at once
  mkdir -p "$RUNS/$first"
  [ -f "$RUNS/$first/$answers" ] || cp "$TEACHER_ANSWERS" "$RUNS/$first/$answers"
fi
if [ -n "$first" ]; then
  # shellcheck disable=SC2086
  arm "$first" ${args[$first]} &
  for _ in $(seq 600); do [ -f "$RUNS/$first/$answers" ] && break; sleep 1; done
fi
for name in $order; do
  want "$name" && [ "$name" != "$first" ] || continue
  if [[ ${args[$name]} == *teacher-targets* ]]; then
    mkdir -p "$RUNS/$name"
    [ -f "$RUNS/$name/$answers" ] || cp "$RUNS/$first/$answers" "$RUNS/$name/" 2>/dev/null
  fi
  # shellcheck disable=SC2086
  arm "$name" ${args[$name]} &
done
wait
echo ALL_DONE
