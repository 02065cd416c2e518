"""Speed and memory measurements: prefill and decode tokens/s, peak memory, and the baselines.

Every number is printed beside what it should be judged against, measured in the same
process: the bandwidth floor (weight bytes / this machine's measured copy bandwidth, bytes
read plus bytes written), transformers' `generate` on the same weights (sharing their
storage), and, when the store is not full precision, a full-precision store. Times are
medians of repeated runs, so ratios hold on a noisy machine.
"""
from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minikv.cuda_graph import enable_cuda_graph
from minikv.errors import ContextFull, MinikvError
from minikv.generate import Engine
from minikv.model import Transformer
from minikv.qstore import QuantizedStore
from minikv.sampling import SamplingParams, sample
from minikv.store import FullPrecisionStore, KVStore

GREEDY = SamplingParams(temperature=0.0)


# --- measuring ---------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn(), synchronizing the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Median time of a short device-side operation: event-timed with a cold L2 on CUDA."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return median_seconds(fn, device, repeats, warmup=2)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = kernel_seconds(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes allocated on the GPU since the last reset; on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine(device: torch.device) -> dict[str, str]:
    info = {"cpu": _cpu_name(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --- our decode --------------------------------------------------------------------------

def fill_store(store: KVStore, n: int, chunk: int = 4096, seed: int = 0) -> None:
    """Append n synthetic tokens to every layer through the store's `write` path, in chunks.

    Stands in for a long prefill when only the store's contents matter (speed and memory of
    decode over a long context): keys and values go through `write` and `advance` like a real
    prefill's, so a quantized store packs them exactly as it would real ones. Nothing attends,
    which is what makes a million tokens take seconds instead of a quadratic prefill."""
    if n > store.room():
        raise ContextFull(f"{n} filler tokens do not fit: {store.length} of {store.capacity} context tokens used")
    gen = torch.Generator(device=store.device).manual_seed(seed)
    B, H, D = store.batch, store.n_kv_heads, store.head_dim
    for start in range(0, n, chunk):
        t = min(chunk, n - start)
        for layer in range(store.n_layers):
            k, v = (torch.randn(B, H, t, D, device=store.device, generator=gen).to(store.dtype) for _ in range(2))
            store.write(layer, k, v)
        store.advance(t)


@torch.inference_mode()
def time_ours(engine: Engine, prompt: Tensor, n_new: int, ctx_fill: int, repeats: int) -> dict[str, float]:
    """Median prefill and decode times of prompt (B, P) then n_new greedy tokens, after ctx_fill tokens."""
    device = engine.device

    def once(n: int) -> tuple[float, float]:
        engine.reset()
        if ctx_fill:
            fill_store(engine.store, ctx_fill)
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, prompt.shape[1], engine.prefill_chunk):
            logits = engine.forward(prompt[:, start:start + engine.prefill_chunk])
        ids = sample(logits, GREEDY, None)[:, None]
        sync(device)
        t1 = time.perf_counter()
        for _ in range(n):
            ids = sample(engine.forward(ids), GREEDY, None)[:, None]
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    once(min(n_new, 4))  # warm-up: lazy initialisation, graph capture
    runs = [once(n_new) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    B, P = prompt.shape
    return {"prefill_s": prefill, "prefill_tps": B * P / prefill, "decode_s": decode,
            "decode_ms_per_step": 1e3 * decode / n_new, "decode_tps": B * n_new / decode}


def bench_ours(model: Transformer, store: KVStore, prompt: Tensor, n_new: int, ctx_fill: int, repeats: int,
               graph: bool, compile: bool = False) -> dict[str, float]:
    """Time our decode through `store` (as a CUDA graph if asked and the store allows it), with its peak memory."""
    reset_peak_memory(store.device)
    engine = Engine(model, tokenizer=None, store=store)
    graph = graph and getattr(store, "static", False)
    if graph:
        enable_cuda_graph(engine, compile=compile)
    result = time_ours(engine, prompt, n_new, ctx_fill, repeats)
    result.update(graph=graph, compiled=graph and compile, peak_memory_bytes=peak_memory(store.device),
                  store_bytes=store.nbytes(), store_bytes_per_token=store.bytes_per_token())
    return result


def full_precision_store(model: Transformer, batch: int, capacity: int, static: bool) -> FullPrecisionStore:
    c = model.config
    w = model.tok_embeddings.weight
    return FullPrecisionStore(c.n_layers, batch, capacity, c.n_kv_heads, c.head_dim, c.sliding_window, w.dtype,
                              w.device, static=static)


# --- transformers' generate on the same weights -----------------------------------------

def transformers_twin(model: Transformer) -> torch.nn.Module:
    """A transformers LlamaForCausalLM / MistralForCausalLM whose weights are views of ours (no copy)."""
    import transformers

    from minikv.weights import to_hf_state

    cfg = model.config
    hf_cfg = cfg.to_hf()
    conf = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    state = to_hf_state(model)
    w = state["model.embed_tokens.weight"]
    with torch.device(w.device):
        hf_model = transformers.AutoModelForCausalLM.from_config(conf, dtype=w.dtype)
    hf_model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


@torch.inference_mode()
def bench_transformers(hf_model: torch.nn.Module, prompt: Tensor, n_new: int, repeats: int,
                       static_cache: bool = False) -> dict[str, float]:
    """transformers' greedy `generate`: prefill from 1-token runs, decode from the n-token minus 1-token time.

    With static_cache, transformers compiles its decode step itself (torch.compile)."""
    device = prompt.device
    extra = {"cache_implementation": "static"} if static_cache else {}

    def generate(n: int) -> None:
        hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0, **extra)

    reset_peak_memory(device)
    first = median_seconds(lambda: generate(1), device, repeats)
    full = median_seconds(lambda: generate(n_new + 1), device, repeats)
    B, P = prompt.shape
    decode = full - first  # n_new decode forwards, like ours
    return {"prefill_s": first, "prefill_tps": B * P / first, "decode_s": decode,
            "decode_ms_per_step": 1e3 * decode / n_new, "decode_tps": B * n_new / decode,
            "peak_memory_bytes": peak_memory(device)}


# --- one layer's decode attention ------------------------------------------------------------

@torch.inference_mode()
def bench_attention(store: KVStore, n_heads: int, ctx: int) -> dict[str, float]:
    """One layer's decode attention over ctx cached tokens: the store against SDPA over a plain cache."""
    device, dtype = store.device, store.dtype
    B, H, D = store.batch, store.n_kv_heads, store.head_dim
    fill_store(store, ctx)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(B, n_heads, 1, D, device=device, generator=gen).to(dtype)
    k, v = (torch.randn(B, H, 1, D, device=device, generator=gen).to(dtype) for _ in range(2))
    positions = store.positions(1)
    store_s = kernel_seconds(lambda: store.attend(0, q, k, v, positions), device)
    keys, values = (torch.randn(B, H, ctx + 1, D, device=device, generator=gen).to(dtype) for _ in range(2))
    sdpa_s = kernel_seconds(lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=H != n_heads),
                            device)
    layer_bytes = store.nbytes() / store.n_layers
    sdpa_bytes = 2 * keys.numel() * keys.element_size()
    return {"store_us": 1e6 * store_s, "store_bytes": layer_bytes, "store_bandwidth": layer_bytes / store_s,
            "sdpa_us": 1e6 * sdpa_s, "sdpa_bytes": sdpa_bytes, "sdpa_bandwidth": sdpa_bytes / sdpa_s,
            "peak_memory_bytes": peak_memory(device)}


# --- capacity: the longest context that fits -----------------------------------------------

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
        yield store._history(layer, a, min(a + step, h))
    w0 = store.hist_pos0 + h
    slots = (torch.arange(w0, max(n, w0), device=store.device) - store.n_sink) % store.ring
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


# --- a whole benchmark -------------------------------------------------------------------

@dataclass
class BenchOptions:
    model: Transformer
    model_name: str  # a folder or "random <geometry>"
    make_store: Callable[[int, int, bool], KVStore]  # (batch, capacity, static) -> the store under test
    kv: str = "fp16"
    batch: int = 1
    prompt_len: int = 512
    new_tokens: int = 128
    ctx_fill: int = 0
    repeats: int = 5
    graph: bool = True  # CUDA only
    compile: bool = False  # torch.compile the graph's step (CUDA only)
    attn_only: bool = False
    transformers: bool = True
    transformers_static: bool = False  # CUDA only: static cache, compiled by transformers
    seed: int = 0
    # Capacity mode: preset name -> its store factory; each one's longest batch-1 context is found and decoded at.
    capacity: dict[str, Callable[[int, int, bool], KVStore]] | None = None
    memory_budget: int | None = None  # bytes beside the weights (default: the device's free memory)
    capacity_probe: int = 1024  # tokens of the probe stores (and twice that) that give the bytes per token
    capacity_margin: float = 0.03  # of the budget, kept free for activations and allocator slack


def run(opt: BenchOptions) -> dict:
    """Measure everything the options ask for; returns the JSON-ready record (also printed as a table)."""
    model, cfg = opt.model, opt.model.config
    w = model.tok_embeddings.weight
    device = w.device
    graph = opt.graph and device.type == "cuda"
    record: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(device),
        "model": opt.model_name, "dtype": str(w.dtype).removeprefix("torch."), "kv": opt.kv, "batch": opt.batch,
        "prompt_len": opt.prompt_len, "new_tokens": opt.new_tokens, "ctx_fill": opt.ctx_fill,
        "repeats": opt.repeats, "graph": graph, "copy_bandwidth": copy_bandwidth(device),
        "weight_bytes": weight_bytes(model),
    }
    bw = record["copy_bandwidth"]
    if opt.capacity:
        record.update(mode="capacity", batch=1, kv=" ".join(opt.capacity), memory_budget=opt.memory_budget,
                      capacity_margin=opt.capacity_margin)
        record["capacity"] = {}
        for name, make_store in opt.capacity.items():
            print(f"capacity: {name} ...", flush=True)
            try:
                record["capacity"][name] = bench_capacity(model, make_store, opt.memory_budget, opt.new_tokens,
                                                          graph, opt.capacity_probe, opt.capacity_margin)
            except Exception as e:  # one preset's failure (out of memory in a step, no kernel) keeps the others
                record["capacity"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"capacity: {name}: {capacity_line(record['capacity'][name])}", flush=True)
        return record
    if opt.attn_only:
        record["mode"] = "attention"
        record["attention"] = bench_attention(opt.make_store(opt.batch, opt.ctx_fill + 1, False), cfg.n_heads,
                                              opt.ctx_fill)
        record["attention"].update(store_fraction_of_copy=record["attention"]["store_bandwidth"] / bw,
                                   sdpa_fraction_of_copy=record["attention"]["sdpa_bandwidth"] / bw)
        return record

    record["mode"] = "decode"
    record["floor_ms_per_step"] = 1e3 * record["weight_bytes"] / bw
    capacity = opt.ctx_fill + opt.prompt_len + opt.new_tokens
    gen = torch.Generator().manual_seed(opt.seed)
    prompt = torch.randint(0, cfg.vocab_size, (opt.batch, opt.prompt_len), generator=gen).to(device)
    record["ours"] = bench_ours(model, opt.make_store(opt.batch, capacity, graph), prompt, opt.new_tokens,
                                opt.ctx_fill, opt.repeats, graph, opt.compile)
    record["graph"] = "compiled" if record["ours"]["compiled"] else "yes" if record["ours"]["graph"] else "no"
    record["ours"]["fraction_of_floor"] = record["floor_ms_per_step"] / record["ours"]["decode_ms_per_step"]
    if opt.kv != "fp16":
        record["ours_fp16"] = bench_ours(model, full_precision_store(model, opt.batch, capacity, graph), prompt,
                                         opt.new_tokens, opt.ctx_fill, opt.repeats, graph, opt.compile)
    if opt.transformers and not opt.ctx_fill:  # transformers' cache cannot be pre-filled synthetically
        hf_model = transformers_twin(model)
        record["transformers"] = bench_transformers(hf_model, prompt, opt.new_tokens, opt.repeats)
        if opt.transformers_static and device.type == "cuda":
            record["transformers_static"] = bench_transformers(hf_model, prompt, opt.new_tokens, opt.repeats,
                                                               static_cache=True)
        del hf_model
    return record


# --- reporting -------------------------------------------------------------------------------

TABLE_HEADER = ("| date | machine | model | dtype | kv | B | prompt | new | ctx fill | graph | prefill tok/s "
                "| decode tok/s | ms/step | floor ms/step | % of floor | transformers decode tok/s "
                "| transformers static tok/s | peak mem |\n" + "|---" * 18 + "|")


def device_name(record: dict) -> str:
    m = record["machine"]
    return m.get("gpu") or f"{m['cpu']} ({m['threads']} threads)"


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def markdown_row(record: dict) -> str:
    """One row of TABLE_HEADER's table (decode mode)."""
    ours = record["ours"]
    hf, hf_static = record.get("transformers", {}), record.get("transformers_static", {})
    cells = [record["date"], device_name(record), record["model"], record["dtype"], record["kv"], record["batch"],
             record["prompt_len"], record["new_tokens"], record["ctx_fill"], record["graph"],
             fmt(ours["prefill_tps"]), fmt(ours["decode_tps"]), fmt(ours["decode_ms_per_step"], ".2f"),
             fmt(record["floor_ms_per_step"], ".2f"), fmt(100 * ours["fraction_of_floor"], ".0f"),
             fmt(hf.get("decode_tps")), fmt(hf_static.get("decode_tps")),
             f"{ours['peak_memory_bytes'] / 2**30:.2f} GiB"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


CAPACITY_HEADER = ("| date | machine | model | dtype | kv | capacity tokens (B=1) | store GiB | store bytes/token "
                   "| peak mem | graph | ms/step | decode tok/s | spot-check max abs err (of max abs out) "
                   "| fill s |\n" + "|---" * 14 + "|")


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
            cells = head + ["failed: " + r["error"].replace("|", "/").splitlines()[0]] + ["—"] * 8
        else:
            c = r["spot_check"]
            cells = head + [f"{r['capacity_tokens']:,}", fmt(r["store_bytes"] / 2**30, ".2f"),
                            fmt(r["store_bytes_per_token"], ".0f"), f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
                            "yes" if r["graph"] else "no", fmt(r["decode_ms_per_step"], ".2f"),
                            fmt(r["decode_tps"]), f"{c['max_abs_error']:.1e} ({c['max_abs_reference']:.1e})",
                            fmt(r["fill_s"])]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def summary(record: dict) -> str:
    """Human-readable lines for the terminal."""
    bw = record["copy_bandwidth"]
    lines = [f"{record['model']} on {device_name(record)}, {record['dtype']}, kv {record['kv']}, "
             f"batch {record['batch']}, torch {record['machine']['torch']}",
             f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s; weights {record['weight_bytes'] / 1e9:.3f} GB"]
    if record["mode"] == "capacity":
        lines.append("longest batch-1 context that fits, decoded there:")
        lines += [f"  {kv}: {capacity_line(r)}" for kv, r in record["capacity"].items()]
        return "\n".join(lines)
    if record["mode"] == "attention":
        a = record["attention"]
        lines += [f"one layer's decode attention over {record['ctx_fill']} tokens:",
                  f"  store ({record['kv']}): {a['store_us']:.1f} us, {a['store_bytes'] / 1e6:.2f} MB, "
                  f"{a['store_bandwidth'] / 1e9:.1f} GB/s = {100 * a['store_fraction_of_copy']:.0f} % of copy",
                  f"  fp16 cache + SDPA: {a['sdpa_us']:.1f} us, {a['sdpa_bytes'] / 1e6:.2f} MB, "
                  f"{a['sdpa_bandwidth'] / 1e9:.1f} GB/s = {100 * a['sdpa_fraction_of_copy']:.0f} % of copy",
                  f"  peak memory {a['peak_memory_bytes'] / 2**30:.2f} GiB"]
        return "\n".join(lines)
    lines.append(f"bandwidth floor: {record['floor_ms_per_step']:.2f} ms/step "
                 f"({1e3 / record['floor_ms_per_step']:.1f} steps/s)")
    for key, label in (("ours", f"minikv ({record['kv']}, CUDA graph: {record['graph']})"),
                       ("ours_fp16", "minikv (fp16 store)"), ("transformers", "transformers generate"),
                       ("transformers_static", "transformers generate, static cache + compile")):
        if key in record:
            r = record[key]
            extra = f", store {r['store_bytes'] / 2**20:.1f} MiB" if "store_bytes" in r else ""
            lines.append(f"{label:48s} prefill {r['prefill_tps']:9.1f} tok/s | decode {r['decode_tps']:8.1f} tok/s "
                         f"({r['decode_ms_per_step']:.2f} ms/step) | peak {r['peak_memory_bytes'] / 2**30:.2f} GiB"
                         + extra)
    return "\n".join(lines)
