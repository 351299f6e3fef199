#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md that need the GPU to themselves, one after the other.
#
#   DATA=../shared/data OUT=bench_h200 bash scripts/bench_h200.sh            # every step
#   DATA=../shared/data OUT=bench_h200 bash scripts/bench_h200.sh generate rag  # some steps
#
# Each step writes its JSON/markdown/log into $OUT and a line "step rc seconds" to $OUT/steps.txt;
# a failing step does not stop the others. Steps:
#   decode-check  static-cache decode gives the dynamic path's tokens (fp32 and bf16)
#   generate      ms/token and TTFT: engine (text, stored chunks) vs transformers generate
#   rag           store-hit vs full-text TTFT, 1 and 8 chunks of 512 tokens
#   rag-captured  the same with the captured prefill (--static-prefill; each shape compiles first)
#   encoder       cache-build encoder throughput, 4,096 chunks of 512 tokens
#   cache-build   `cache build` end to end on 10,000 arXiv abstracts
#   cache-grid    the same by anchor workers, kernels and writer threads, and the host side alone
#   eval-time     `eval qa`, 300 SQuAD questions, one compressed system
#   train-sweep   training samples/s of the default model's shape by batch size, with and without
#                 fused kernels
#   scale         training, compression and store hit on Llama-3.2-1B / Qwen2.5-3B / Llama-3.1-8B shapes
set -u
DATA=${DATA:-../shared/data}
OUT=${OUT:-bench_h200}
PY=${PY:-python3}
CLI="$PY -m compressor_plugin.cli"
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
val="$DATA/arxiv_abstracts_val.jsonl"

step() {  # name command...
  local name=$1 t0 rc
  shift
  t0=$(date +%s%N)
  timeout "${STEP_LIMIT:-900}" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/steps.txt"
}

run_step() {
  case $1 in
    decode-check)
      step decode-check-fp32 $PY scripts/check_static_decode.py --device cuda --dtype float32
      step decode-check-bf16 $PY scripts/check_static_decode.py --device cuda --dtype bfloat16 ;;
    generate)
      step generate $CLI bench generate --device cuda --n 4 --tokens 512 --new-tokens 64 --repeats 3 \
          --data "$val" --output "$OUT/generate_h200.json" --table "$OUT/generate_h200.md" \
          --plot "$OUT/generate_h200.png" --no-progress ;;
    rag)
      step rag $CLI bench rag --n 1,8 --tokens 512 --repeats 3 --device cuda --data "$val" \
          --output "$OUT/rag_h200.json" --plot "$OUT/rag_h200.png" --no-progress ;;
    rag-captured)
      step rag-captured $CLI bench rag --n 1,8 --tokens 512 --repeats 3 --device cuda --data "$val" \
          --static-prefill --output "$OUT/rag_h200_captured.json" --no-progress ;;
    encoder)
      step encoder $PY -c "import json; from compressor_plugin.caching import benchmark; \
print(json.dumps([benchmark(n_chunks=4096, chunk_tokens=512, batch_size=b, device='cuda', merge_lora=True) \
for b in (256, 512)]))" ;;
    cache-build)
      rm -rf /tmp/bench-store
      step cache-build $CLI cache build --input "$DATA/arxiv_abstracts_train.jsonl" --store /tmp/bench-store \
          --map /tmp/bench-map.jsonl --batch-size 256 --device cuda --limit 10000 --no-progress --json
      rm -rf /tmp/bench-store ;;
    cache-grid)
      # `cache build` by where anchors are chosen and by kernels, then the host side alone (the
      # encoder replaced: scripts/bench_cache_host.py), each on the same 10,000 abstracts
      for v in "a0:--anchors 0" "a32-w0:--anchor-workers 0" "a32-w8:--anchor-workers 8" \
               "a32-w14:--anchor-workers 14" "a32-w8-fused:--anchor-workers 8 --fused-kernels" \
               "a32-w8-wt8:--anchor-workers 8 --writer-threads 8"; do
        rm -rf /tmp/bench-store /tmp/bench-map.jsonl
        step "cache-${v%%:*}" $CLI cache build --input "$DATA/arxiv_abstracts_train.jsonl" --store /tmp/bench-store \
            --map /tmp/bench-map.jsonl --batch-size 256 --device cuda --limit 10000 --no-progress --json ${v#*:}
      done
      rm -rf /tmp/bench-store /tmp/bench-map.jsonl
      for v in "a0-w0:0 0" "a32-w0:32 0" "a32-w8:32 8" "a32-w14:32 14"; do
        set -- ${v#*:}
        step "cache-host-${v%%:*}" $PY scripts/bench_cache_host.py --data "$DATA/arxiv_abstracts_train.jsonl" \
            --limit 10000 --anchors "$1" --anchor-workers "$2" --writer-threads 4 --output "$OUT/cache-host-${v%%:*}.json"
      done ;;
    eval-time)
      step eval-time $CLI eval qa --data "$DATA/squad1.1_dev.jsonl" --limit 300 --batch-size 64 \
          --systems compressed --checkpoint kv-k16 --no-progress --output "$OUT/eval_time.json" ;;
    train-sweep)
      step train-sweep $CLI bench scale --shapes smollm2-135m --batch-size 64,128,256,512 --stages regen,qa \
          --checkpointing off --training-only --steps 4 --warmup 2 --device cuda --out "$OUT/sweep"
      step train-sweep-fused $CLI bench scale --shapes smollm2-135m --batch-size 64,128,256,512 \
          --stages regen,qa --checkpointing off --training-only --steps 4 --warmup 2 --fused-kernels \
          --device cuda --out "$OUT/sweep-fused" ;;
    scale)
      step scale-small $CLI bench scale --shapes llama-1b,qwen-3b --checkpointing off --steps 3 --warmup 1 \
          --device cuda --out "$OUT/scale-small"
      step scale-8b $CLI bench scale --shapes llama-8b --checkpointing both --steps 3 --warmup 1 \
          --device cuda --out "$OUT/scale-8b" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

for s in ${@:-train-sweep decode-check generate rag encoder cache-build eval-time scale}; do
  run_step "$s"
done
echo BENCH_DONE | tee -a "$OUT/steps.txt"
