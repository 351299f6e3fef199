#!/usr/bin/env bash
# Evaluate the runs of scripts/train_fidelity.sh (best/ checkpoints) against full text, on one GPU:
# several `eval qa` processes side by side. JSON results land in $RUNS/eval/.
#
#   DATA=../shared/data RUNS=runs bash scripts/eval_fidelity.sh
set -u
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
PY=${PY:-python3}
N=${N:-300}
out="$RUNS/eval"
mkdir -p "$out"
[ -f "$out/invented_dev.jsonl" ] || $PY -m compressor_plugin.cli eval make-invented --output "$out/invented_dev.jsonl" \
    --paragraphs 50 --seed 0 >/dev/null
ev() {  # name data extra-args...
  local name=$1 data=$2
  shift 2
  $PY -m compressor_plugin.cli eval qa --data "$data" --limit "$N" --batch-size 64 --no-progress \
      --systems full,compressed --output "$out/$name.json" "$@" > "$out/$name.log" 2>&1 \
      && echo "DONE $name" || echo "FAILED $name"
}
ship="$RUNS/kv-k16/best $RUNS/kv-k4/best $RUNS/kv-k1/best $RUNS/embedding-k1/best kv-k16"
ablate="$RUNS/old/best $RUNS/mix/best $RUNS/mix-cloze/best $RUNS/mix-kd/best"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
ev squad-ship "$DATA/squad1.1_dev.jsonl" --checkpoint $ship &
ev invented-ship "$out/invented_dev.jsonl" --checkpoint $ship &
ev squad-ablate "$DATA/squad1.1_dev.jsonl" --checkpoint $ablate &
ev invented-ablate "$out/invented_dev.jsonl" --checkpoint $ablate &
ev squad-3chunks "$DATA/squad1.1_dev.jsonl" --chunks 3 --checkpoint "$RUNS/kv-k16/best" &
ev squad-5chunks "$DATA/squad1.1_dev.jsonl" --chunks 5 --checkpoint "$RUNS/kv-k16/best" &
wait
for f in nq_open_goldpara relation_extraction_mrqa_dev squadshifts_new_wiki squadshifts_reddit \
         squadshifts_amazon_reviews hotpotqa_dev_goldpara pubmedqa_labeled; do
  ev "$f" "$DATA/$f.jsonl" --checkpoint "$RUNS/kv-k16/best" &
done
wait
echo EVAL_DONE
