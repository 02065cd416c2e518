"""What moving blocks from the window into the history costs a decoding store, on a CUDA GPU.

    PYTHONPATH=. python3 docs/bench/block_moves.py --out DIR [--step PRESET ...] [--moves PRESET ...]

--step: Llama-2-7B geometry (random weights, fp16), one sequence, a 1024-token prompt, then 64
greedy tokens through the CUDA graph, each step timed apart: the graph replay, and store.advance,
which moves a block every G tokens (G 32 or 64 by preset) on the host. Medians of three runs after
a warm-up; "fp16" is the full-precision store. Writes DIR/step.json.
--moves: Mistral-7B-v0.2 geometry, 8 sequences holding 32K tokens each (synthetic fill): the time
of store.advance for the token after which every sequence moves a block. Writes DIR/moves.json.
Run a second time with PYTHONPATH pointing at another revision's export to compare the two.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minikv.bench import GREEDY, fill_store, full_precision_store
from minikv.cuda_graph import enable_cuda_graph
from minikv.generate import Engine
from minikv.geometries import geometry, random_model
from minikv.presets import KVSettings, make_store
from minikv.sampling import sample

DEV = torch.device("cuda")
PROMPT, NEW = 1024, 64


def settings(name: str) -> KVSettings:
    """A preset as the benchmarks run it (skvq without the calibration random weights lack)."""
    return KVSettings.from_preset(name, **(dict(reorder=False, clip_k=1.0, clip_v=1.0) if name == "skvq" else {}))


def ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds) if seconds else 0.0


def step_costs(model: torch.nn.Module, name: str, prompt: torch.Tensor) -> dict:
    """Per decode step: the whole step, the graph replay, advance() without and with a block move."""
    store = full_precision_store(model, 1, PROMPT + NEW, True) if name == "fp16" else make_store(
        model.config, settings(name), 1, PROMPT + NEW, torch.float16, DEV, static=True)
    engine = Engine(model, None, store)
    enable_cuda_graph(engine)
    n_hist = getattr(store, "n_hist", lambda n: 0)
    runs = []
    for run in range(4):  # the first captures the graph and compiles the kernels
        engine.reset()
        for start in range(0, PROMPT, engine.prefill_chunk):
            logits = engine.forward(prompt[:, start:start + engine.prefill_chunk])
        ids = sample(logits, GREEDY, None)[:, None]
        torch.cuda.synchronize()
        replay, still, moving = [], [], []
        t_start = time.perf_counter()
        for _ in range(NEW):
            t0 = time.perf_counter()
            logits = engine.decode_step(ids, store.positions(1))
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            moves = n_hist(store.length + 1) > n_hist(store.length)
            store.advance(1)
            torch.cuda.synchronize()
            (moving if moves else still).append(time.perf_counter() - t1)
            replay.append(t1 - t0)
            ids = sample(logits, GREEDY, None)[:, None]
        torch.cuda.synchronize()
        if run:
            runs.append(dict(step_ms=1e3 * (time.perf_counter() - t_start) / NEW, replay_ms=ms(replay),
                             advance_ms=ms(still), move_ms=1e3 * statistics.mean(moving) if moving else 0.0,
                             moves=len(moving)))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def move_cost(name: str, batch: int = 8, filled: int = 32768) -> dict:
    """advance() after the token that makes every one of `batch` sequences move a block, four times."""
    store = make_store(geometry("mistral-7b-v0.2"), settings(name), batch, filled + 256, torch.float16, DEV,
                       static=True)
    n = filled - 1
    while store.n_hist(n + 1) == store.n_hist(n):
        n -= 1
    fill_store(store, n)
    times = []
    for _ in range(4):
        for _ in range(store.group):
            for layer in range(store.n_layers):
                k, v = (torch.randn(batch, store.n_kv_heads, 1, store.head_dim, device=DEV, dtype=torch.float16)
                        for _ in range(2))
                store.write(layer, k, v)
            torch.cuda.synchronize()
            moves = store.n_hist(store.length + 1) > store.n_hist(store.length)
            t0 = time.perf_counter()
            store.advance(1)
            torch.cuda.synchronize()
            if moves:
                times.append(time.perf_counter() - t0)
    return dict(move_ms=[round(1e3 * t, 3) for t in times], median_ms=ms(times[1:]))  # the first compiles


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--step", nargs="*", default=[], help="presets (or fp16) to time per decode step at 1K")
    ap.add_argument("--moves", nargs="*", default=[], help="presets to time a batch-8 block move for")
    opts = ap.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.step:
        cfg = geometry("llama2-7b")
        model = random_model(cfg, DEV, torch.float16)
        prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(DEV)
        result = {}
        for name in opts.step:
            result[name] = step_costs(model, name, prompt)
            print(name, json.dumps(result[name]), flush=True)
            torch.cuda.empty_cache()
        (opts.out / "step.json").write_text(json.dumps(result, indent=1) + "\n")
        del model
    if opts.moves:
        result = {}
        for name in opts.moves:
            result[name] = move_cost(name)
            print(name, json.dumps(result[name]), flush=True)
            torch.cuda.empty_cache()
        (opts.out / "moves.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
