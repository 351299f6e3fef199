#!/usr/bin/env bash
# The fidelity recipe and its ablations, side by side on one GPU, at the same wall-clock budget.
#
#   DATA=../shared/data RUNS=runs MIN=11 bash scripts/train_fidelity.sh
#
# Every arm is one `compressor-plugin train` process; all arms share the GPU for MIN minutes, so
# each arm gets the same budget. Running the script again resumes every arm from its state.pt
# (carry the run folders back in to continue on a later GPU lease).
#
# kv k=16 ablations, all from scratch:
#   old        regeneration stage (MIN/2) then QA stage (MIN/2): the earlier recipe
#   mix        one stage: 20% regeneration, 30% continuation, 50% QA steps (SQuAD), 1-5 chunks
#   mix-cloze  + 2 cloze questions per corpus text (names, numbers, dates) in the QA pool
#   mix-kd     + distillation: QA loss = 0.5 CE(gold) + 0.5 KL(frozen model reading the full text)
# shipped candidates (mix-kd recipe, continued from the previously shipped checkpoints):
#   kv-k16, kv-k4, kv-k1, embedding-k1
set -u
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
MIN=${MIN:-11}
BS=${BS:-48}
SOLO=${SOLO:-75}  # seconds the mix-kd arm runs alone first (its log then shows one process's throughput)
PY=${PY:-python3}
mkdir -p "$RUNS"
$PY -c "from compressor_plugin.models import ensure_default_model as e; print(e())" >/dev/null

corpus="$DATA/arxiv_abstracts_train.jsonl"
qa="$DATA/squad1.1_train_subset.jsonl"
common="--no-progress --log-every 10 --eval-every 100 --save-every 100 --val-data $DATA/squad1.1_dev.jsonl
        --val-samples 128 --max-tokens 192 --max-target-tokens 192 --max-chunks 5 --batch-size $BS"
kd="--stage mix --data $corpus $qa --cloze-per-text 2 --distill 0.5"

arm() {  # name minutes extra-args...
  local name=$1 minutes=$2
  shift 2
  $PY -m compressor_plugin.cli train --max-minutes "$minutes" --output "$RUNS/$name" $common "$@" \
      > "$RUNS/$name.log" 2>&1 && echo "DONE $name" || echo "FAILED $name"
}
old() {
  local half
  half=$(awk -v m="$MIN" 'BEGIN{print m/2}')
  arm old-regen "$half" --stage regen --data $corpus $qa --lr 1e-3 --warmup-steps 100 &&
  arm old "$half" --stage qa --data $qa --init "$RUNS/old-regen/checkpoint" --lr 3e-4 --warmup-steps 50
}

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
arm mix-kd "$MIN" $kd --lr 7e-4 --warmup-steps 100 &
sleep "$SOLO"
old &
arm mix "$MIN" --stage mix --data $corpus $qa --lr 7e-4 --warmup-steps 100 &
arm mix-cloze "$MIN" --stage mix --data $corpus $qa --cloze-per-text 2 --lr 7e-4 --warmup-steps 100 &
arm kv-k16 "$MIN" $kd --init kv-k16 --lr 3e-4 --warmup-steps 50 &
arm kv-k4 "$MIN" $kd --k 4 --init kv-k4 --lr 3e-4 --warmup-steps 50 &
arm kv-k1 "$MIN" $kd --k 1 --init kv-k1 --lr 3e-4 --warmup-steps 50 &
arm embedding-k1 "$MIN" $kd --mode embedding --k 1 --init embedding-k1 --lr 3e-4 --warmup-steps 50 &
wait
echo ALL_DONE
