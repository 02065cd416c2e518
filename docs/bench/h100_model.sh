#!/usr/bin/env bash
# Measurements with the default model's real weights on a GPU: perplexity through the Triton kernels
# against the reference attention (same store, same dtype), and ingestion of one long document.
#   bash docs/bench/h100_model.sh MODEL.gguf OUTDIR      (from the repository root, after `make data`)
set -uo pipefail
model=${1:?usage: h100_model.sh MODEL OUTDIR}
out=${2:?usage: h100_model.sh MODEL OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
for dtype in fp32 bf16; do  # bf16 also dequantizes the history in float16 inside the kernels
  for path in triton reference; do
    timeout 200 python3 -m minikv.cli perplexity -m "$model" -f data/pg_dev.txt -c 2048 --chunks 2 --device cuda \
      --dtype $dtype --kv fp16 k4v2 rotatekv kivi2 --kv-attention "$path" --json | tee "$out/perplexity_${dtype}_$path.jsonl"
    echo "exit $?"
  done
done
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} timeout 200 python3 docs/bench/ingest.py -m "$model" -f data/pg_dev.txt --tokens 8191 --kv fp16 k4v2 rotatekv kivi2 \
  --device cuda | tee "$out/ingest.jsonl"
echo "exit $?"
