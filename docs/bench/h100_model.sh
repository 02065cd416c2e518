#!/usr/bin/env bash
# Measurements with the default model's real weights on a GPU: perplexity through the Triton kernels
# against the reference attention (same store, same dtype), and ingestion of one long document.
#   bash docs/bench/h100_model.sh MODEL.gguf OUTDIR      (from the repository root, after `make data`)
# Perplexity runs once per dtype, preset and path over the whole dev split (36,828 scored tokens, 1-2
# minutes a run on an H100): over 2 chunks the 2-bit presets' two paths wandered apart by up to 1.6 %
# in bf16, rounding flipping codes; over the whole split they agree within about 0.1 %.
# DTYPES, PRESETS and CHUNKS (-1: all) narrow it down; TEXT picks the text (default data/pg_dev.txt).
set -uo pipefail
model=${1:?usage: h100_model.sh MODEL OUTDIR}
out=${2:?usage: h100_model.sh MODEL OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
for dtype in ${DTYPES:-bf16 fp32}; do  # bf16 also dequantizes the history in float16 inside the kernels
  for kv in ${PRESETS:-k4v2 rotatekv kivi2 mikv k2v1}; do
    for path in triton reference; do
      timeout 300 python3 -m minikv.cli perplexity -m "$model" -f "${TEXT:-data/pg_dev.txt}" -c 2048 --chunks "${CHUNKS:--1}" \
        --device cuda --dtype "$dtype" --kv "$kv" --kv-attention "$path" --json | tee -a "$out/perplexity_${dtype}_$path.jsonl"
      echo "exit $?"
    done
  done
done
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} timeout 200 python3 docs/bench/ingest.py -m "$model" -f data/pg_dev.txt --tokens 8191 --kv fp16 k4v2 rotatekv kivi2 \
  --device cuda | tee "$out/ingest.jsonl"
echo "exit $?"
