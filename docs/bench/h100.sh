#!/usr/bin/env bash
# The GPU measurements in docs/SPEED.md, in one go: `bash docs/bench/h100.sh OUTDIR` from the repository root.
# Each bench bounds its own time, so one slow baseline cannot take the others' results with it.
set -uo pipefail
out=${1:?usage: h100.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
python3 -m pytest -q tests/test_bench.py -k "graph or twin" 2>&1 | tail -3
b() { timeout "$1" python3 -m minikv.cli bench --kv fp16 --out "$out" "${@:2}"; echo "exit $?"; }
b 150 --geometry llama2-7b --device cuda --dtype fp16
b 90 --geometry smollm2-135m --device cuda --dtype fp16
b 90 --geometry llama2-7b --device cuda --dtype fp16 --no-graph --no-transformers --tag llama2-7b-h100-nograph
b 60 --geometry llama2-7b --device cuda --dtype fp16 --attn-only --ctx-fill 4096
b 60 --geometry llama3-8b --device cuda --dtype fp16 --attn-only --ctx-fill 32768 --batch 4
b 90 --geometry llama3-8b --device cuda --dtype fp16 --no-transformers
b 240 --geometry llama2-7b --device cuda --dtype fp16 --transformers-static --tag llama2-7b-h100-hfstatic
