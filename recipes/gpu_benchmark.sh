#!/usr/bin/env bash
# GPU rows of BENCHMARKS.md in one prepared run: BERT-base built from its config (110M parameters), seq_len 128,
# batch 48 (meta batch = base batch), unroll 10, every method in its own process, fp32 then bf16.
# Writes bert_base_{fp32,bf16}.json / .md / .png into OUT_DIR (default outputs/benchmark).
#   bash recipes/gpu_benchmark.sh [OUT_DIR]
# Environment: PYTHON (interpreter), METHODS (comma-separated, default all), PRECISIONS (default "fp32 bf16"),
# REPEATS (default 3), WORKER_TIMEOUT (seconds per worker, default 300), BENCH_ARGS (extra benchmark.py flags).
set -euo pipefail
out=${1:-outputs/benchmark}
py=${PYTHON:-python}
methods=${METHODS:-finetune,sama,sama-na,t1t2,unrolled,neumann,cg}
mkdir -p "$out"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures GPU rows')"
for precision in ${PRECISIONS:-fp32 bf16}; do
  extra=()
  if [ "$precision" = bf16 ]; then extra=(--bf16); fi
  # shellcheck disable=SC2086
  "$py" recipes/benchmark.py --model_config bert-base --batch_size 48 --seq_len 128 --unroll_steps 10 \
    --steps 20 --warmup_steps 10 --repeats "${REPEATS:-3}" --methods "$methods" \
    --worker_timeout "${WORKER_TIMEOUT:-300}" "${extra[@]}" ${BENCH_ARGS:-} \
    --output "$out/bert_base_$precision.json" --markdown "$out/bert_base_$precision.md"
done
