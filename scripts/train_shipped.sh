#!/usr/bin/env bash
# The recipe behind the shipped compressors: on one GPU, five training processes side by side
# (kv k=16/4/1, embedding k=16/1), each a regeneration
# pretraining stage on arXiv abstracts + SQuAD-train contexts, then QA fine-tuning on the
# SQuAD train subset. Checkpoints are selected on validation loss (arXiv val, SQuAD dev rows).
# The full-tuned reference trains afterwards, alone on the GPU (700 steps, the compressors' QA
# step count), because six processes at once do not fit in the H200's memory with it.
# This is what produced the shipped checkpoints (docs/training.md has the numbers):
#
#   DATA=../shared/data RUNS=runs bash scripts/train_shipped.sh
set -u
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
QA_MIN=${QA_MIN:-6}
PY=${PY:-python3}
mkdir -p "$RUNS"
# convert the default model once, before the jobs start
$PY -c "from compressor_plugin.models import ensure_default_model as e; print(e())"

common="--no-progress --log-every 20 --eval-every 100 --save-every 200 --val-samples 128"
regen_data="$DATA/arxiv_abstracts_train.jsonl $DATA/squad1.1_train_subset.jsonl"
qa_data="$DATA/squad1.1_train_subset.jsonl"

compressor() {  # name mode k regen-batch regen-minutes
  local name=$1 mode=$2 k=$3 bs=$4 minutes=$5
  $PY -m compressor_plugin.cli train --stage regen --mode "$mode" --k "$k" --data $regen_data \
      --val-data "$DATA/arxiv_abstracts_val.jsonl" --batch-size "$bs" --lr 1e-3 --warmup-steps 100 \
      --max-target-tokens 256 --max-minutes "$minutes" --output "$RUNS/$name-regen" $common \
      > "$RUNS/$name-regen.log" 2>&1 || { echo "FAILED $name-regen"; return 1; }
  $PY -m compressor_plugin.cli train --stage qa --mode "$mode" --k "$k" --data $qa_data \
      --val-data "$DATA/squad1.1_dev.jsonl" --init "$RUNS/$name-regen/checkpoint" --batch-size 32 --lr 3e-4 \
      --warmup-steps 50 --max-minutes "$QA_MIN" --output "$RUNS/$name-qa" $common \
      > "$RUNS/$name-qa.log" 2>&1 || { echo "FAILED $name-qa"; return 1; }
  echo "DONE $name"
}

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
compressor kv-k16 kv 16 32 6 &
compressor kv-k4 kv 4 32 6 &
compressor kv-k1 kv 1 32 6 &
compressor embedding-k16 embedding 16 64 7 &
compressor embedding-k1 embedding 1 64 7 &
wait
# the full-tuned reference: same QA data, batch and step count, full text in the prompt
$PY -m compressor_plugin.cli train --stage qa --mode full-tuned --data $qa_data \
    --val-data "$DATA/squad1.1_dev.jsonl" --batch-size 32 --lr 3e-4 --warmup-steps 50 --max-steps 700 \
    --output "$RUNS/full-tuned-qa" $common > "$RUNS/full-tuned-qa.log" 2>&1 && echo "DONE full-tuned"
echo ALL_DONE
