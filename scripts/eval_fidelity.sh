#!/usr/bin/env bash
# Fidelity evaluation on one GPU: several `eval qa` processes side by side, each against the
# full-text systems of the same run (F1/EM, retention, agreement with the best full-text answer).
# JSON results and logs land in $OUT.
#
#   DATA=../shared/data OUT=eval CKPTS="kv-k16 kv-k4 kv-k1" BEST=kv-k16 bash scripts/eval_fidelity.sh
#
#   CKPTS    compressor checkpoints (shipped names or folders) for SQuAD dev and invented facts
#   BEST     the one checkpoint also run with 3 and 5 chunks per prompt and on every other QA file
#   EXTRA    more `eval qa` arguments for every process (e.g. "--anchors 0,32")
#   N        questions per file (default 300); the base model is the checkpoints' own
set -u
DATA=${DATA:-../shared/data}
OUT=${OUT:-eval}
PY=${PY:-python3}
N=${N:-300}
CKPTS=${CKPTS:-"kv-k16 kv-k4 kv-k1"}
BEST=${BEST:-kv-k16}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
[ -f "$OUT/invented_dev.jsonl" ] || $PY -m compressor_plugin.cli eval make-invented --output "$OUT/invented_dev.jsonl" \
    --paragraphs 50 --seed 0 >/dev/null
ev() {  # name data extra-args...
  local name=$1 data=$2
  shift 2
  # shellcheck disable=SC2086
  $PY -m compressor_plugin.cli eval qa --data "$data" --limit "$N" --batch-size 64 --no-progress \
      --systems full,compressed --output "$OUT/$name.json" $EXTRA "$@" \
      > "$OUT/$name.log" 2>&1 && echo "DONE $name" || echo "FAILED $name"
}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_WAIT_POLICY=PASSIVE
# shellcheck disable=SC2086
ev squad "$DATA/squad1.1_dev.jsonl" --checkpoint $CKPTS &
# shellcheck disable=SC2086
ev invented "$OUT/invented_dev.jsonl" --checkpoint $CKPTS &
ev squad-3chunks "$DATA/squad1.1_dev.jsonl" --chunks 3 --checkpoint "$BEST" &
ev squad-5chunks "$DATA/squad1.1_dev.jsonl" --chunks 5 --checkpoint "$BEST" &
for f in nq_open_goldpara relation_extraction_mrqa_dev squadshifts_new_wiki squadshifts_reddit \
         squadshifts_amazon_reviews hotpotqa_dev_goldpara pubmedqa_labeled; do
  [ -f "$DATA/$f.jsonl" ] && ev "$f" "$DATA/$f.jsonl" --checkpoint "$BEST" &
done
wait
echo EVAL_DONE
