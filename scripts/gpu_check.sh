#!/usr/bin/env bash
# GPU check: tokens/s, MFU and peak memory of the training speed options (scripts/bench_mfu.py) for the 1B and
# 8B presets, each sized to ONE GPU, on the embedded Ray; the serving comparison on request.
#   bash scripts/gpu_check.sh                 # STEPS=40 OUT=/tmp/slipway_gpu_check by default
#   QUICK=1 bash scripts/gpu_check.sh         # only the settings that decide the defaults (about half the time)
#   SERVE_CHECK=1 bash scripts/gpu_check.sh   # and the native serving engine against vLLM (see the end)
# Sizes: the 1B model is the full Llama-3.2-1B shape on FSDP2; the 8B model keeps Llama-3-8B's width (dim 4096,
# FFN 14336, GQA 32/8) but 8 of its 32 layers, so that fp32 master weights and Adam states fit one 80 GB GPU
# (bench_mfu.py's docstring). Saving checkpoints is off: this measures throughput only. Each setting is one run of
# STEPS steps; the first few (compilation, allocator growth) are left out of the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-40}
OUT=${OUT:-/tmp/slipway_gpu_check}
PYTHON=${PYTHON:-python}
settings_1b=() settings_8b=()
if [ "${QUICK:-0}" = 1 ]; then
  settings_1b=(--settings eager compiled selective)
  settings_8b=(--settings zero3-eager compiled selective full)
fi

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== llm_1b_fsdp (1 GPU) =="
"$PYTHON" scripts/bench_mfu.py --preset 1b --steps "$STEPS" "${settings_1b[@]}" --out "$OUT/1b" | tee "$OUT.1b.log"
echo "== llm_8b shape, 8 of 32 layers (1 GPU) =="
"$PYTHON" scripts/bench_mfu.py --preset 8b --steps "$STEPS" "${settings_8b[@]}" --out "$OUT/8b" | tee "$OUT.8b.log"

# Serving (SERVE_CHECK=1, with the vllm group installed: SLIPWAY_EXTRAS=vllm bash scripts/setup.sh): the native
# engine on one GPU against vLLM on the same random llm_tiny export, tokens/s at each concurrency.
if [ "${SERVE_CHECK:-0}" = 1 ]; then
  echo "== serving: native engine vs vLLM (1 GPU) =="
  "$PYTHON" scripts/bench_serve.py --parts llm vllm --num-gpus 1 --concurrency 1 16 64 --max-tokens 128 \
    --cores 8 --out "$OUT.serve"
fi
