#!/usr/bin/env bash
# Quantized-KV decode on the GPU (random weights): `bash docs/bench/h100_kv.sh OUTDIR` from the repository root.
# (a) Mistral-7B-v0.2 at batch 8 over 32K tokens, (b) every preset at Llama-2-7B, batch 1, ~1K tokens,
# (c) the longest batch-1 context that fits in memory. Each run also times the fp16 store beside its preset.
# JSON records, OUTDIR/runs.md and OUTDIR/capacity.md, all tables in OUTDIR/kv.md; about 5-7 minutes.
# COMPILE=--compile torch.compiles the graphed decode steps of (a) and (b): minutes of compilation per run,
# so their time limits grow to 10 minutes each.
set -uo pipefail
out=${1:?usage: h100_kv.sh OUTDIR}
compile=${COMPILE:-}
slow=${compile:+600}  # the time limit of (a) and (b) runs when compiling
mkdir -p "$out"
export PYTHONUNBUFFERED=1
b() {  # b SECONDS TAG ARGS...: one run; a failure is reported and the next run goes on
    echo "=== $2 ($(date -u +%H:%M:%S))"
    timeout "$1" python3 -m minikv.cli bench --device cuda --dtype fp16 --no-transformers --out "$out" --tag "$2" \
        "${@:3}" || echo "FAILED $2 (exit $?)"
}
# (a) end-to-end decode after a 32K-token fill, k4v2 against the fp16 store, CUDA graph on
b ${slow:-150} mistral-v0.2-b8-s32k-k4v2 --geometry mistral-7b-v0.2 --batch 8 --ctx-fill 32768 --prompt-len 16 -n 32 \
    --repeats 3 --kv k4v2 $compile
# (b) batch 1, 1024-token prompt, every preset against the fp16 store
# (skvq without its calibrated reorder and clipping: random weights have no calibration)
for kv in fp16 int8 kivi4 kivi2 k4v4 k4v2 skvq rotatekv k2v1 mikv; do
    extra=()
    [ "$kv" = skvq ] && extra=(--no-kv-reorder --kv-clip 1)
    b ${slow:-60} "llama2-b1-p1024-$kv" --geometry llama2-7b --prompt-len 1024 -n 64 --repeats 3 --kv "$kv" \
        "${extra[@]}" $compile
done
# (c) capacity: the longest batch-1 context beside the weights, 8 decode steps there, attention spot-checked
b 240 llama2-capacity --geometry llama2-7b --capacity k2v1 rotatekv kivi2 fp16 -n 8
b 150 mistral-v0.2-capacity --geometry mistral-7b-v0.2 --capacity k4v2 fp16 -n 8
pairs() {  # each decode record's preset beside the fp16 store timed in the same run
    python3 - "$out" <<'PY'
import json, pathlib, sys
print("| model | B | prompt | ctx fill | kv | decode tok/s | ms/step | fp16 store tok/s | fp16 ms/step "
      "| speed vs fp16 | store MiB | fp16 store MiB |\n" + "|---" * 12 + "|")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    if r.get("mode") == "decode":
        o, f = r["ours"], r.get("ours_fp16", r["ours"])
        print(f"| {r['model']} | {r['batch']} | {r['prompt_len']} | {r['ctx_fill']} | {r['kv']} "
              f"| {o['decode_tps']:.1f} | {o['decode_ms_per_step']:.2f} | {f['decode_tps']:.1f} "
              f"| {f['decode_ms_per_step']:.2f} | {o['decode_tps'] / f['decode_tps']:.2f}x "
              f"| {o['store_bytes'] / 2**20:.1f} | {f['store_bytes'] / 2**20:.1f} |")
PY
}
{
    echo "## Decode, each preset beside the fp16 store of the same run (\`bash docs/bench/h100_kv.sh OUT\`)"; echo; pairs; echo
    echo "## Decode, all columns"; echo; cat "$out/runs.md"; echo
    echo "## Capacity, batch 1"; echo; cat "$out/capacity.md"
} > "$out/kv.md" || echo "FAILED combining the tables"
echo "=== done ($(date -u +%H:%M:%S)): $out/kv.md"
