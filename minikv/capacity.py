"""The longest context that decodes on this device: a store sized from measured bytes per token
beside the weights and one decode step's workspace, filled through its own write path, decoded
at that length, and spot-checked against fp32 attention over what it holds (`minikv bench
--capacity`)."""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from minikv.bench import (GREEDY, BenchOptions, command_cell, device_name, fill_store, fmt, peak_memory, record_header,
                          reset_peak_memory, sync)
from minikv.cuda_graph import enable_cuda_graph
from minikv.errors import MinikvError
from minikv.generate import Engine
from minikv.model import Transformer
from minikv.qstore import QuantizedStore
from minikv.sampling import sample
from minikv.store import KVStore


def footprint(model: Transformer, store: KVStore) -> int:
    """Bytes of every tensor the store keeps (buffers, a working copy, its RoPE tables) plus the
    model's RoPE tables for the store's positions: what must fit, which `nbytes()` understates."""
    model.setup_rope(store.max_position)
    storages = {}
    for value in [*vars(store).values(), model.rope_cos, model.rope_sin]:
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def free_memory(device: torch.device) -> int:
    """Bytes the device can still allocate (allocator cache returned first)."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


@torch.inference_mode()
def decode_workspace(model: Transformer, store: KVStore) -> int:
    """Peak bytes one decode step allocates beyond what it holds (CUDA; 0 on the CPU, where it is not measurable)."""
    device = store.device
    if device.type != "cuda":
        return 0
    engine = Engine(model, tokenizer=None, store=store)
    fill_store(store, min(store.room() - 1, 4 * store.head_dim))
    sync(device)
    before = torch.cuda.memory_allocated(device)
    reset_peak_memory(device)
    engine.forward(torch.zeros(store.batch, 1, dtype=torch.long, device=device))
    sync(device)
    return peak_memory(device) - before


def find_capacity(model: Transformer, make_store: Callable[[int, int, bool], KVStore], budget: int | None,
                  static: bool, probe: int, margin: float, backoff: float = 0.03) -> tuple[KVStore, dict]:
    """The batch-1 store of the most tokens whose footprint, with one decode step's workspace and
    `margin` of the budget kept free for activations, fits in `budget` bytes (default: the free
    device memory once a probe decode step has loaded the kernels and libraries it needs).

    Two probe stores give the bytes per token (a store's cost is linear in its capacity, plus
    its sinks and ring); the estimate is allocated, and backed off by `backoff` while it does not
    fit or allocating raises OutOfMemoryError (CUDA counts allocator rounding and fragmentation
    that no estimate sees)."""
    device = model.tok_embeddings.weight.device
    small = make_store(1, probe, static)
    sizes = footprint(model, small), footprint(model, make_store(1, 2 * probe, static))
    per_token = (sizes[1] - sizes[0]) / probe
    workspace = decode_workspace(model, small)
    del small
    budget = budget or free_memory(device)
    reserve = workspace + int(margin * budget)
    estimate = int((budget - reserve - (sizes[0] - per_token * probe)) / per_token)
    capacity, attempts = estimate, 0
    while capacity > probe:
        attempts += 1
        store = None
        try:
            store = make_store(1, capacity, static)
            fits = footprint(model, store) + reserve <= budget
            if fits and device.type == "cuda":
                torch.empty(reserve, dtype=torch.uint8, device=device)  # the headroom is really there
        except torch.OutOfMemoryError:
            fits = False
        if fits:
            return store, {"budget_bytes": budget, "per_token_bytes": per_token, "reserve_bytes": reserve,
                           "estimate_tokens": estimate, "attempts": attempts}
        store = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        capacity = int(capacity * (1 - backoff))
    raise MinikvError(f"no store of more than {probe} tokens fits in {budget / 2**30:.2f} GiB")


def _held_chunks(store: KVStore, layer: int, n: int, chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Keys and values (B, H, c, D) at positions 0 .. n-1 as attention sees them, a chunk at a
    time (at a million tokens the dequantized history of one layer does not fit beside the store)."""
    if not isinstance(store, QuantizedStore):
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            yield store.k[layer][:, :, a:b], store.v[layer][:, :, a:b]
        return
    s = min(n, store.n_sink)
    yield store.sink_k[layer][:, :, :s], store.sink_v[layer][:, :, :s]
    h, step = store.n_hist(n), store.group * max(1, chunk // store.group)  # history reads whole G-blocks
    for a in range(0, h, step):
        yield store.history(layer, a, min(a + step, h))
    slots = store.ring_slots(store.hist_pos0 + h, n)
    yield store.win_k[layer][:, :, slots], store.win_v[layer][:, :, slots]


def chunked_attention(q: Tensor, chunks: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """fp32 softmax attention of q (B, H, g, D), g query heads per KV head, over (keys, values)
    chunks (B, H, c, D), with a running maximum and sum (flash attention's recurrence)."""
    q = q.float() * q.shape[-1] ** -0.5
    m = torch.full(q.shape[:3], float("-inf"), device=q.device)
    total = torch.zeros_like(m)
    acc = torch.zeros_like(q)
    for k, v in chunks:
        scores = q @ k.float().mT  # (B, H, g, c)
        new_m = torch.maximum(m, scores.amax(-1))
        p = (scores - new_m[..., None]).exp()
        shrink = (m - new_m).exp()
        total = total * shrink + p.sum(-1)
        acc = acc * shrink[..., None] + p @ v.float()
        m = new_m
    return acc / total[..., None]


@torch.inference_mode()
def spot_check(store: KVStore, n_heads: int, layers: int = 2, kv_heads: int = 2, chunk: int = 4096,
               seed: int = 0) -> dict:
    """The store's decode attention for a random query and new token, against fp32 attention over
    what the store holds (sinks, dequantized history, ring) on a few sampled layers and KV heads."""
    device, (B, H, D) = store.device, (store.batch, store.n_kv_heads, store.head_dim)
    gen = torch.Generator().manual_seed(seed)
    sampled_layers = sorted(torch.randperm(store.n_layers, generator=gen)[:layers].tolist())
    heads = sorted(torch.randperm(H, generator=gen)[:kv_heads].tolist())
    q = torch.randn(B, n_heads, 1, D, generator=gen).to(device, store.dtype)
    k, v = (torch.randn(B, H, 1, D, generator=gen).to(device, store.dtype) for _ in range(2))
    n = store.length
    err = ref_max = 0.0
    for layer in sampled_layers:
        held = itertools.chain(_held_chunks(store, layer, n, chunk), [(k, v)])  # lazily: one chunk at a time
        chunks = ((hk[:, heads], hv[:, heads]) for hk, hv in held)
        # before attend, which may move a block into the history; (B, heads, g, D): query head i reads KV head i // g
        ref = chunked_attention(q[:, :, 0].unflatten(1, (H, -1))[:, heads], chunks)
        out = store.attend(layer, q, k, v, store.positions(1))[:, :, 0].unflatten(1, (H, -1))[:, heads]
        err = max(err, (out.float() - ref).abs().max().item())
        ref_max = max(ref_max, ref.abs().max().item())
    return {"layers": sampled_layers, "kv_heads": heads, "tokens": n + 1, "max_abs_error": err,
            "max_abs_reference": ref_max}


@torch.inference_mode()
def bench_capacity(model: Transformer, make_store: Callable[[int, int, bool], KVStore], budget: int | None,
                   n_new: int, graph: bool, probe: int, margin: float) -> dict:
    """Find the longest batch-1 context (find_capacity), fill it with `write`, time n_new decode
    steps there and spot-check the attention at that length."""
    device = model.tok_embeddings.weight.device
    model.rope_cos = model.rope_sin = None  # sized again for each candidate store, inside the budget
    reset_peak_memory(device)
    store, search = find_capacity(model, make_store, budget, graph, probe, margin)
    print(f"  {store.capacity:,} tokens fit ({search['attempts']} attempt(s)); filling ...", flush=True)
    t0 = time.perf_counter()
    fill_store(store, store.capacity - n_new - 2)  # room for the warm-up step, n_new steps and the spot check
    sync(device)
    fill_s = time.perf_counter() - t0
    print(f"  filled in {fill_s:.1f} s; decoding ...", flush=True)
    engine = Engine(model, tokenizer=None, store=store)
    graph = graph and getattr(store, "static", False)
    if graph:
        enable_cuda_graph(engine)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    times = []
    for _ in range(n_new + 1):  # the first step warms up (captures the graph)
        sync(device)
        t = time.perf_counter()
        ids = sample(engine.forward(ids), GREEDY, None)[:, None]
        sync(device)
        times.append(time.perf_counter() - t)
    step = statistics.median(times[1:])
    print(f"  {1e3 * step:.2f} ms/step; spot check ...", flush=True)
    result = {"capacity_tokens": store.capacity, "store_bytes": store.nbytes(),
              "working_bytes": store.working_nbytes(), "footprint_bytes": footprint(model, store),
              "store_bytes_per_token": store.bytes_per_token(), **search,
              "fill_s": fill_s, "graph": graph, "decode_ms_per_step": 1e3 * step, "decode_tps": 1 / step,
              "spot_check": spot_check(store, model.config.n_heads)}
    result["peak_memory_bytes"] = peak_memory(device)
    return result


def run(opt: BenchOptions) -> dict:
    """The capacity of every preset in opt.capacity (batch 1); one preset's failure keeps the others."""
    record = record_header(opt)
    record.update(mode="capacity", batch=1, kv=" ".join(opt.capacity), memory_budget=opt.memory_budget,
                  capacity_margin=opt.capacity_margin)
    record["capacity"] = {}
    for name, make_store in opt.capacity.items():
        print(f"capacity: {name} ...", flush=True)
        try:
            record["capacity"][name] = bench_capacity(opt.model, make_store, opt.memory_budget, opt.new_tokens,
                                                      record["graph"], opt.capacity_probe, opt.capacity_margin)
        except Exception as e:  # out of memory in a step, no kernel: recorded, not fatal
            record["capacity"][name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"capacity: {name}: {capacity_line(record['capacity'][name])}", flush=True)
    return record


# --- reporting -------------------------------------------------------------------------------

CAPACITY_HEADER = ("| date | machine | model | dtype | kv | capacity tokens (B=1) | store GiB | store bytes/token "
                   "| peak mem | graph | ms/step | decode tok/s | spot-check max abs err (of max abs out) "
                   "| fill s | command |\n" + "|---" * 15 + "|")


def capacity_line(r: dict) -> str:
    """One preset's capacity result, for the terminal."""
    if "error" in r:
        return f"FAILED: {r['error']}"
    c = r["spot_check"]
    return (f"{r['capacity_tokens']:,} tokens, store {r['store_bytes'] / 2**30:.2f} GiB "
            f"({r['store_bytes_per_token']:.0f} B/token), peak {r['peak_memory_bytes'] / 2**30:.2f} GiB, "
            f"{r['decode_ms_per_step']:.2f} ms/step, spot check max abs error {c['max_abs_error']:.2e} "
            f"(outputs up to {c['max_abs_reference']:.2e}), fill {r['fill_s']:.1f} s")


def capacity_rows(record: dict) -> list[str]:
    """CAPACITY_HEADER's rows, one per preset."""
    rows = []
    for kv, r in record["capacity"].items():
        head = [record["date"], device_name(record), record["model"], record["dtype"], kv]
        if "error" in r:
            failed = "failed: " + r["error"].replace("|", "/").splitlines()[0]
            cells = head + [failed] + ["—"] * 8 + [command_cell(record)]
        else:
            c = r["spot_check"]
            cells = head + [f"{r['capacity_tokens']:,}", fmt(r["store_bytes"] / 2**30, ".2f"),
                            fmt(r["store_bytes_per_token"], ".0f"), f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
                            "yes" if r["graph"] else "no", fmt(r["decode_ms_per_step"], ".2f"),
                            fmt(r["decode_tps"]), f"{c['max_abs_error']:.1e} ({c['max_abs_reference']:.1e})",
                            fmt(r["fill_s"]), command_cell(record)]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def summary(record: dict) -> str:
    """Human-readable lines for the terminal."""
    lines = [f"{record['model']} on {device_name(record)}, {record['dtype']}, torch {record['machine']['torch']}",
             "longest batch-1 context that fits, decoded there:"]
    return "\n".join(lines + [f"  {kv}: {capacity_line(r)}" for kv, r in record["capacity"].items()])
