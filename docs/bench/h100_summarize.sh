#!/usr/bin/env bash
# Batched summarization on a GPU with the default model's real weights: 8 documents (consecutive
# 6000-character pieces of the dev split) summarized one at a time and 4 at a time, per preset.
#   bash docs/bench/h100_summarize.sh MODEL.gguf OUTDIR      (from the repository root, after `make data`)
set -uo pipefail
model=${1:?usage: h100_summarize.sh MODEL OUTDIR}
out=${2:?usage: h100_summarize.sh MODEL OUTDIR}
mkdir -p "$out/docs"
export PYTHONUNBUFFERED=1
python3 - "$out/docs" <<'PY'
import pathlib, sys
text = pathlib.Path("data/pg_dev.txt").read_text(encoding="utf-8")
for i in range(8):
    pathlib.Path(sys.argv[1], f"doc{i}.txt").write_text(text[i * 6000:(i + 1) * 6000], encoding="utf-8")
PY
for kv in fp16 k4v2; do
  for batch in 1 4; do
    t0=$(date +%s.%N)
    timeout 240 python3 -m minikv.cli summarize "$out"/docs/doc*.txt -m "$model" --device cuda --kv "$kv" -n 64 \
      --batch "$batch" --jsonl -q > "$out/summarize-$kv-b$batch.jsonl"
    echo "kv $kv batch $batch exit $? wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
    python3 -c "import json, sys; r = [json.loads(l) for l in open(sys.argv[1])]; \
print('  summarizing (batches, excl. load):', round(sum({x['seconds'] for x in r}), 2), 's;', len(r), 'docs')" \
      "$out/summarize-$kv-b$batch.jsonl"
  done
done
