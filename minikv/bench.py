"""Speed and memory measurements: prefill and decode tokens/s, peak memory, and the baselines.

Every number is printed beside what it should be judged against, measured in the same
process: the bandwidth floor (weight bytes / this machine's measured copy bandwidth, bytes
read plus bytes written), transformers' `generate` on the same weights (sharing their
storage), and, when the store is not full precision, a full-precision store. Times are
medians of repeated runs, so ratios hold on a noisy machine.
"""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minikv.cuda_graph import enable_cuda_graph
from minikv.errors import ContextFull
from minikv.generate import Engine
from minikv.model import Transformer
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


def capture(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """fn captured as a CUDA graph, after `warmup` eager calls (lazy initialisation, compilation)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, n: int = 50) -> float:
    """Mean milliseconds per replay of a captured graph, over n back-to-back replays."""
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


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

    def attend() -> None:
        store.attend(0, q, k, v, positions)

    # A static store on CUDA is timed as the decode step runs it, replayed in a CUDA graph: eagerly, a
    # quantized store's host bookkeeping and launches cost more than its kernels at batch 1.
    graphed = getattr(store, "static", False) and device.type == "cuda"
    store_s = kernel_seconds(capture(attend).replay if graphed else attend, device)
    keys, values = (torch.randn(B, H, ctx + 1, D, device=device, generator=gen).to(dtype) for _ in range(2))
    sdpa_s = kernel_seconds(lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=H != n_heads),
                            device)
    layer_bytes = store.nbytes() / store.n_layers
    sdpa_bytes = 2 * keys.numel() * keys.element_size()
    return {"store_us": 1e6 * store_s, "store_bytes": layer_bytes, "store_bandwidth": layer_bytes / store_s,
            "sdpa_us": 1e6 * sdpa_s, "sdpa_bytes": sdpa_bytes, "sdpa_bandwidth": sdpa_bytes / sdpa_s,
            "peak_memory_bytes": peak_memory(device)}


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


def record_header(opt: BenchOptions) -> dict:
    """What every record starts with: when, where, what model and settings, and the baselines' inputs."""
    w = opt.model.tok_embeddings.weight
    device = w.device
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(device),
        "model": opt.model_name, "dtype": str(w.dtype).removeprefix("torch."), "kv": opt.kv, "batch": opt.batch,
        "prompt_len": opt.prompt_len, "new_tokens": opt.new_tokens, "ctx_fill": opt.ctx_fill,
        "repeats": opt.repeats, "graph": opt.graph and device.type == "cuda", "copy_bandwidth": copy_bandwidth(device),
        "weight_bytes": weight_bytes(opt.model),
    }


def run(opt: BenchOptions) -> dict:
    """Measure everything the options ask for (decode, or --attn-only); returns the JSON-ready record.
    Capacity runs are minikv.capacity.run."""
    model, cfg = opt.model, opt.model.config
    device = model.tok_embeddings.weight.device
    record = record_header(opt)
    graph = record["graph"]
    bw = record["copy_bandwidth"]
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
                "| transformers static tok/s | peak mem | command |\n" + "|---" * 19 + "|")


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
             f"{ours['peak_memory_bytes'] / 2**30:.2f} GiB", command_cell(record)]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def command_cell(record: dict) -> str:
    """The command that made a record (set by `minikv bench`), as a table cell."""
    return f"`{record['command']}`" if "command" in record else "–"


def summary(record: dict) -> str:
    """Human-readable lines for the terminal."""
    bw = record["copy_bandwidth"]
    lines = [f"{record['model']} on {device_name(record)}, {record['dtype']}, kv {record['kv']}, "
             f"batch {record['batch']}, torch {record['machine']['torch']}",
             f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s; weights {record['weight_bytes'] / 1e9:.3f} GB"]
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
