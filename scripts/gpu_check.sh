#!/usr/bin/env bash
# GPU check: llm_1b_fsdp and llm_8b_zero3, each sized to ONE GPU, a few dozen bf16 steps on the embedded Ray;
# prints steady-state tokens/s and MFU (model FLOPs / peak, peak from cluster.peak_tflops_per_gpu).
#   bash scripts/gpu_check.sh                 # STEPS=40 OUT=/tmp/slipway_gpu_check by default
#   SERVE_CHECK=1 bash scripts/gpu_check.sh   # and the native serving engine against vLLM (see the end)
# Sizes: the 1B model is the full Llama-3.2-1B shape; the 8B model keeps Llama-3-8B's width (dim 4096,
# FFN 14336, GQA 32/8) but 8 of its 32 layers, so that ZeRO-3's fp32 master weights and Adam states fit
# one 80 GB GPU. Checkpointing is off: this measures throughput only.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-40}
OUT=${OUT:-/tmp/slipway_gpu_check}
PYTHON=${PYTHON:-python}
common=(cluster=gpu_node cluster.num_workers=1 cluster.cpus_per_worker=8 cluster.include_dashboard=false
        "trainer.max_steps=$STEPS" trainer.log_every_n_steps=5 "trainer.eval_every_n_steps=$STEPS"
        trainer.eval_batches=1 checkpoint.enabled=false "paths.root=$OUT")

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== llm_1b_fsdp (1 GPU) =="
"$PYTHON" launch.py +exp=llm_1b_fsdp "${common[@]}" trainer.global_batch_size=16 trainer.micro_batch_size=4 \
  | tee "$OUT.1b.log"
echo "== llm_8b_zero3, 8 of 32 layers (1 GPU) =="
"$PYTHON" launch.py +exp=llm_8b_zero3 "${common[@]}" model.n_layers=8 data.seq_len=2048 \
  trainer.global_batch_size=8 trainer.micro_batch_size=4 | tee "$OUT.8b.log"

"$PYTHON" - "$OUT.1b.log" "$OUT.8b.log" <<'PY'
import json, statistics, sys
from pathlib import Path
for log in sys.argv[1:]:
    run_dir = Path([l for l in Path(log).read_text().splitlines() if l.startswith("run_dir: ")][-1][9:])
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "tokens_per_s" in r and r["step"] > 10]  # skip warm-up and allocator growth
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = statistics.median(r["mfu"] for r in steady)
    print(f"{run_dir.name}: {tps:,.0f} tokens/s, MFU {mfu:.1%} (median of {len(steady)} windows after step 10)")
PY

# Serving (SERVE_CHECK=1, with the vllm group installed: SLIPWAY_EXTRAS=vllm bash scripts/setup.sh): the native
# engine on one GPU against vLLM on the same random llm_tiny export, tokens/s at each concurrency.
if [ "${SERVE_CHECK:-0}" = 1 ]; then
  echo "== serving: native engine vs vLLM (1 GPU) =="
  "$PYTHON" scripts/bench_serve.py --parts llm vllm --num-gpus 1 --concurrency 1 16 64 --max-tokens 128 \
    --cores 8 --out "$OUT.serve"
fi
