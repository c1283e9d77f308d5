#!/usr/bin/env bash
# GPU rows of BENCHMARKS.md in one prepared run: BERT-base built from its config (110M parameters), seq_len 128,
# batch 48 (meta batch = base batch), unroll 10, every method in its own process. Three suites:
#   bert_base_fp32        finetune + the first-order methods (sama, sama-na, t1t2), default (SDPA) attention, and
#                         sama-eval: sama with its meta passes in eval mode (meta_dropout=False)
#   bert_base_bf16        the same in bf16 autocast
#   bert_base_fp32_eager  finetune, sama and the second-order methods (unrolled, neumann, cg), eager attention:
#                         they differentiate twice through the model, which SDPA's fused GPU kernels do not support
# Writes <suite>.json / .md into OUT_DIR (default outputs/benchmark).
#   bash recipes/gpu_benchmark.sh [OUT_DIR]
# Environment: PYTHON (interpreter), SUITES (default "fp32 bf16 fp32_eager"), REPEATS (default 3),
# WORKER_TIMEOUT (seconds per worker, default 300), BENCH_ARGS (extra benchmark.py flags).
set -euo pipefail
out=${1:-outputs/benchmark}
py=${PYTHON:-python}
mkdir -p "$out"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures GPU rows')"
status=0
eval_variant='{"sama-eval": {"method": "sama", "meta_dropout": false}}'
for suite in ${SUITES:-fp32 bf16 fp32_eager}; do
  case "$suite" in
    fp32) extra=(--methods finetune,sama,sama-na,t1t2 --variants "$eval_variant") ;;
    bf16) extra=(--methods finetune,sama,sama-na,t1t2 --variants "$eval_variant" --bf16) ;;
    fp32_eager) extra=(--methods finetune,sama,unrolled,neumann,cg --attn_implementation eager) ;;
    *) echo "unknown suite '$suite' (fp32, bf16, fp32_eager)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  "$py" recipes/benchmark.py --model_config bert-base --batch_size 48 --seq_len 128 --unroll_steps 10 \
    --steps 20 --warmup_steps 10 --repeats "${REPEATS:-3}" --worker_timeout "${WORKER_TIMEOUT:-300}" \
    "${extra[@]}" ${BENCH_ARGS:-} \
    --output "$out/bert_base_$suite.json" --markdown "$out/bert_base_$suite.md" || status=$?
done
exit "$status"
