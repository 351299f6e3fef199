#!/usr/bin/env bash
# Fidelity experiments at one budget: arms that continue the shipped kv-k16 with the sixth-round
# recipe (docs/training.md) plus one change each, against a control run of the same recipe and
# budget without it, then the ten fidelity sets for every arm that exists. Every step resumes
# when run again, so the script can be repeated across GPU leases until it prints ALL_DONE.
#
#   DATA=../shared/data RUNS=runs N=40000 STEPS=1000 bash scripts/train_arms.sh [STEP]...
#
# QFLAGS adds flags to train-questions (QFLAGS=--any-answer keeps the answers that are not words of
# the text too); EVAL_LIMIT (default 300) is the questions per evaluated set.
#
#   questions    written questions for the first N abstracts -> $RUNS/written_arxiv.jsonl (appended)
#   written      the recipe with those rows in the QA pool -> $RUNS/written (seventh round)
#   continue-kl  the recipe with continuation steps distilled from the frozen model reading the
#                whole text (--continue-distill 1) -> $RUNS/continue-kl
#   control      the recipe alone -> $RUNS/control (needs no questions)
#   eval         the ten fidelity sets, shipped kv-k16 against the arms' checkpoints that exist
#                -> $RUNS/eval
# With no step named, questions, written and eval run in order.
set -u
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
N=${N:-40000}
STEPS=${STEPS:-1000}
BS=${BS:-512}
QFLAGS=${QFLAGS:-}
EVAL_LIMIT=${EVAL_LIMIT:-300}
PY=${PY:-python3}
mkdir -p "$RUNS"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_WAIT_POLICY=PASSIVE
Q=$RUNS/written_arxiv.jsonl
steps=${*:-questions written eval}
ARMS="written continue-kl control"
for step in $steps; do
  case $step in
    questions)
      $PY -m compressor_plugin.cli train-questions --kind written --input "$DATA/arxiv_abstracts_train.jsonl" \
          --output "$Q" --limit "$N" --per-text 2 --max-tokens 192 --batch-size 256 --no-progress $QFLAGS || exit 1 ;;
    written|continue-kl|control)
      out=$RUNS/$step extra=()
      case $step in
        written) [ -s "$Q" ] || { echo "no questions in $Q: run the questions step first" >&2; exit 2; }
                 extra=("$Q") ;;
        continue-kl) extra=(--continue-distill 1) ;;
      esac
      # the teacher answers for the SQuAD rows are the same in every arm: reuse another arm's
      for other in $ARMS; do
        if [ ! -s "$out/teacher_answers_qa.json" ] && [ -s "$RUNS/$other/teacher_answers_qa.json" ]; then
          mkdir -p "$out" && cp "$RUNS/$other/teacher_answers_qa.json" "$out/"
        fi
      done
      $PY -m compressor_plugin.cli train --stage mix --mix regen=0.2,continue=0.2,qa=0.4,cloze=0.2 --cloze-per-text 2 \
          --data "$DATA/arxiv_abstracts_train.jsonl" "$DATA/squad1.1_train_subset.jsonl" "${extra[@]}" \
          --init kv-k16 --lr 4e-4 --warmup-steps 50 --lr-schedule cosine --min-lr-ratio 0.1 --max-steps "$STEPS" \
          --batch-size "$BS" --max-chunks 2 --max-tokens 192 --max-target-tokens 192 \
          --val-data "$DATA/squad1.1_dev.jsonl" --val-samples 256 --eval-every 100 --save-every 50 --log-every 10 \
          --no-progress --teacher-targets 0.5 --anchors 32 --verify-share 0.5 --fused-kernels --anchor-workers 8 \
          --output "$out" || exit 1 ;;
    eval)
      E=$RUNS/eval
      mkdir -p "$E"
      for seed in 0 1; do
        [ -s "$E/inv$seed.jsonl" ] || $PY -m compressor_plugin.cli eval make-invented --output "$E/inv$seed.jsonl" \
            --paragraphs 50 --seed $seed >/dev/null
      done
      [ -s "$E/inv3p.jsonl" ] || $PY -m compressor_plugin.cli eval make-invented --output "$E/inv3p.jsonl" \
          --paragraphs 50 --seed 0 --paragraphs-per-chunk 3 >/dev/null
      runs=()
      for r in $ARMS; do [ -d "$RUNS/$r/checkpoint" ] && runs+=("$RUNS/$r/checkpoint"); done
      ev() {  # name data extra-args...
        local name=$1 data=$2
        shift 2
        [ -s "$E/$name.json" ] && return 0
        $PY -m compressor_plugin.cli eval qa --data "$data" --limit "$EVAL_LIMIT" --batch-size 64 --systems full,compressed \
            --layouts fewshot --anchors 32 --question-anchors --window-shares 0.5 --examples all --no-progress \
            --checkpoint kv-k16 "${runs[@]}" --output "$E/$name.json" "$@" > "$E/$name.log" 2>&1 \
            && echo "DONE $name" || echo "FAILED $name"
      }
      ev squad "$DATA/squad1.1_dev.jsonl" &
      ev squad-3chunks "$DATA/squad1.1_dev.jsonl" --chunks 3 &
      ev inv0 "$E/inv0.jsonl" & ev inv1 "$E/inv1.jsonl" & ev inv3p "$E/inv3p.jsonl" &
      ev nq "$DATA/nq_open_goldpara.jsonl" & ev pubmedqa "$DATA/pubmedqa_labeled.jsonl" &
      ev hotpotqa "$DATA/hotpotqa_dev_goldpara.jsonl" & ev re "$DATA/relation_extraction_mrqa_dev.jsonl" &
      ev new_wiki "$DATA/squadshifts_new_wiki.jsonl" &
      wait ;;
    *) echo "unknown step $step (questions, written, continue-kl, control, eval)" >&2; exit 2 ;;
  esac
done
echo ALL_DONE
