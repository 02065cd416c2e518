#!/usr/bin/env bash
# The compiled-graph GPU measurements in docs/SPEED.md: `bash docs/bench/h100_compiled.sh OUTDIR` from the repository root.
set -uo pipefail
out=${1:?usage: h100_compiled.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
b() { timeout "$1" python3 -m minikv.cli bench --kv fp16 --out "$out" "${@:2}"; echo "exit $?"; }
b 280 --geometry llama2-7b --device cuda --dtype fp16 --compile --transformers-static --tag llama2-7b-h100-compiled
b 120 --geometry smollm2-135m --device cuda --dtype fp16 --compile --tag smollm2-135m-h100-compiled
b 170 --geometry llama3-8b --device cuda --dtype fp16 --compile --no-transformers --tag llama3-8b-h100-compiled
