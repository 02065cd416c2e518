"""Ingest one long document into a store per preset: wall time, peak memory, store bytes.

    python docs/bench/ingest.py -f data/pg_dev.txt --tokens 8191 --kv fp16 k4v2 rotatekv --device cuda

The document's first `--tokens` tokens are prefilled in 512-token chunks through a store of that
many positions plus 8 (the real chunked-prefill path), then 8 greedy tokens are decoded (eagerly),
after a warm-up on the first 1024 tokens that compiles the kernels. On CUDA
the peak is torch's peak allocation since the store was made (weights excluded); on the CPU it is
the process's peak RSS (run one preset per process there). Prints one JSON line per preset.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from minikv.bench import peak_memory, reset_peak_memory, sync
from minikv.generate import Engine
from minikv.loader import load
from minikv.presets import make_store
from minikv.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-f", "--file", required=True, help="UTF-8 document")
    ap.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: the default model)")
    ap.add_argument("--tokens", type=int, default=8191, help="document tokens to ingest")
    ap.add_argument("--kv", nargs="+", default=["fp16", "k4v2"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, tokenizer = load(args.model, device, dtype, progress=False)
    with open(args.file, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())[:args.tokens]
    for kv in args.kv:
        # Warm-up: compile the Triton kernels this preset uses (a first use costs seconds), outside the timing.
        warm = Engine(model, tokenizer, make_store(model.config, kv, 1, 1024 + 8, dtype, device))
        "".join(warm.generate(warm.ingest(ids[:1024]), SamplingParams(temperature=0.0, max_tokens=4)))
        del warm
        reset_peak_memory(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        store = make_store(model.config, kv, 1, len(ids) + 8, dtype, device)
        engine = Engine(model, tokenizer, store)
        t0 = time.perf_counter()
        logits = engine.ingest(ids)
        sync(device)
        t1 = time.perf_counter()
        text = "".join(engine.generate(logits, SamplingParams(temperature=0.0, max_tokens=8)))
        sync(device)
        t2 = time.perf_counter()
        print(json.dumps(dict(
            kv=kv, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", dtype=args.dtype,
            tokens=len(ids), ingest_s=round(t1 - t0, 3), ingest_tps=round(len(ids) / (t1 - t0), 1),
            decode_8_s=round(t2 - t1, 3), store_bytes=store.nbytes(), working_bytes=store.working_nbytes(),
            peak_bytes_above_weights=peak_memory(device) - base, reply=text)), flush=True)
        del engine, store
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
