"""Decode-attention kernel benchmark on a CUDA GPU: correctness at real shapes, then speed.

    python -m kernels.bench_attention --out DIR

For each preset and (batch, context) it checks the decode kernel against its PyTorch twin, times it
(median of repeated runs, plain launches and CUDA-graph replays) and times, in the same run, fp16
SDPA over an fp16 cache of the same shape and a device-to-device copy (the bandwidth floor). It also
checks the prefill and quantize-and-pack kernels at real shapes, and a QuantizedStore's kernel path
against its reference path. Writes DIR/decode_attention.json and DIR/decode_attention.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernels import reference
from kernels.decode_attention import decode_attention, num_splits
from kernels.layout import HiRows, History, PreRope, Spec
from kernels.prefill_attention import prefill_attention
from kernels.quantize_pack import quantize_pack
from minikv.bench import capture, copy_bandwidth
from minikv.quant import hadamard, hadamard_block

DEV = "cuda"
HQ, HKV, D, N_SINK, W = 32, 8, 128, 4, 128
PRESETS = {  # name -> (Spec, pre-RoPE keys with a key matrix and rotated values), as minikv.presets ships them
    "k4v2": (Spec(D, 4, 2, True, 64, 64, 64), False),
    "k4v2-prerope": (Spec(D, 4, 2, True, 64, 64, 64), True),  # the same bits with keys before RoPE
    "kivi2": (Spec(D, 2, 2, True, 32, 32, 32), False),
    "kivi4": (Spec(D, 4, 4, True, 32, 32, 32), False),
    "k4v4": (Spec(D, 4, 4, True, 64, 64, 64), False),  # values rotated too (not timed here)
    "skvq": (Spec(D, 3, 2, False, 32, 32, 32), False),
    "rotatekv": (Spec(D, 2, 2, True, 64, 64, 64), True),
    "k2v1": (Spec(D, 2, 1, True, 64, 64, 128), True),
    "int8": (Spec(D, 8, 8, True, 32, 32, 32), False),
    "mikv": (Spec(D, 2, 2, True, 32, 32, 32, hi_bits=8, hi_rows=4), False),  # values rotated too (not timed here)
}
SHAPES = [(1, 1024), (1, 4096), (8, 32768), (8, 131072)]


def median_ms(fn, graph: bool = False) -> float:
    """Median ms of fn (event-timed), or of replays of fn captured in a CUDA graph."""
    return do_bench(capture(fn, warmup=1).replay if graph else fn, warmup=25, rep=200, return_mode="median")


def make_state(spec: Spec, rotated: bool, batch: int, length: int):
    """A store holding `length` tokens per sequence: random codes and fp16 scales, fp16 sinks and ring."""
    dev, f16 = DEV, torch.float16
    G, R = spec.block, W + spec.block
    n_hist = (length - N_SINK - W) // G * G
    cap = n_hist
    k_meta = (batch, HKV, cap // G, D) if spec.k_per_channel else (batch, HKV, cap, D // spec.k_group)
    v_meta = (batch, HKV, cap, D // spec.v_group)

    def codes(bits):
        return torch.randint(0, 256, (batch, HKV, cap, spec.packed_bytes(bits)), dtype=torch.uint8, device=dev)

    def meta(shape, lo):
        return (torch.rand(shape, device=dev) * 0.1 + lo).to(f16)

    hist = History(codes(spec.k_bits), codes(spec.v_bits), meta(k_meta, 0.01), meta(k_meta, -0.3),
                   meta(v_meta, 0.01), meta(v_meta, -0.3))
    kw = {}
    if spec.hi_rows:  # MiKV: hi_rows random rows of every block
        n_hi = cap // G * spec.hi_rows
        hi_codes = [torch.randint(0, 256, (batch, HKV, n_hi, spec.packed_bytes(spec.hi_bits)), dtype=torch.uint8,
                                  device=dev) for _ in range(2)]
        hi_k_meta, hi_v_meta = (batch, HKV, n_hi, D // spec.k_group), (batch, HKV, n_hi, D // spec.v_group)
        rows = torch.rand(batch, HKV, cap // G, G, device=dev).argsort(-1)[..., :spec.hi_rows]
        idx = (rows + torch.arange(0, cap, G, device=dev)[:, None]).flatten(-2).int()
        kw["hi"] = HiRows(History(*hi_codes, meta(hi_k_meta, 0.001), meta(hi_k_meta, -0.1),
                                  meta(hi_v_meta, 0.001), meta(hi_v_meta, -0.1)), idx)
    args = (torch.randn(batch, HQ, D, device=dev, dtype=f16), torch.randn(batch, HKV, N_SINK, D, device=dev, dtype=f16),
            torch.randn(batch, HKV, N_SINK, D, device=dev, dtype=f16),
            torch.full((batch,), length, device=dev, dtype=torch.int32), hist, spec,
            torch.full((batch,), n_hist, device=dev, dtype=torch.int32),
            torch.randn(batch, HKV, R, D, device=dev, dtype=f16), torch.randn(batch, HKV, R, D, device=dev, dtype=f16))
    if rotated:
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        emb = torch.outer(torch.arange(length, device=dev).float(), inv).repeat(1, 2)
        kw.update(rope=PreRope(emb.cos(), emb.sin(), torch.full((batch,), N_SINK, device=dev, dtype=torch.int32)),
                  key_matrix=hadamard_block(D, dev).half(),
                  value_matrix=hadamard(D, dev).half())
    else:
        kw.update(q_hist=torch.randn(batch, HQ, D, device=dev, dtype=f16))
    return args, kw, n_hist


def bytes_read(spec: Spec, batch: int, length: int, n_hist: int) -> int:
    """What the kernel must read: codes, scales and zeros of the history (and of MiKV's rows, with
    their index), fp16 sinks and window, q."""
    k_meta = 4 * D * n_hist // spec.block if spec.k_per_channel else 4 * n_hist * D // spec.k_group
    n_hi = n_hist // spec.block * spec.hi_rows
    per_head = (n_hist * (spec.packed_bytes(spec.k_bits) + spec.packed_bytes(spec.v_bits)) + k_meta
                + 4 * n_hist * D // spec.v_group + (length - n_hist) * D * 2 * 2
                + n_hi * (2 * spec.packed_bytes(spec.hi_bits) + 4 * D // spec.k_group + 4 * D // spec.v_group + 4))
    return batch * HKV * per_head + 2 * batch * HQ * D * 2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def bench_sdpa(batch: int, length: int) -> dict:
    q = torch.randn(batch, HQ, 1, D, device=DEV, dtype=torch.float16)
    k = torch.randn(batch, HKV, length, D, device=DEV, dtype=torch.float16)
    v = torch.randn_like(k)
    gqa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    gqa_graph = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=True)
    ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    expanded = median_ms(lambda: F.scaled_dot_product_attention(q, ke, ve))
    return dict(sdpa_gqa_ms=gqa, sdpa_gqa_graph_ms=gqa_graph, sdpa_expanded_ms=expanded,
                sdpa_bytes=2 * k.numel() * 2 + 2 * q.numel() * 2)


def sweep(args, kw, batch: int, length: int) -> list[dict]:
    """Launch settings around the default: block_n, num_warps, splits, num_stages."""
    base = num_splits(batch, HKV, length, 128)
    settings = [(128, w, base, None) for w in (2, 4, 8)] + [(128, 4, sp, None) for sp in (base // 2, 2 * base)]
    settings += [(128, 4, base, st) for st in (1, 2, 3, 4)] + [(64, 4, base, st) for st in (None, 1, 2)]
    settings += [(32, 4, base, None)]
    rows = []
    for block_n, warps, splits, stages in settings:
        setting = dict(block_n=block_n, num_warps=warps, splits=splits, num_stages=stages)
        try:
            ms = median_ms(lambda: decode_attention(*args, **kw, **setting))
            rows.append(dict(setting, ms=ms))
        except Exception as e:  # a setting that does not compile is recorded, not fatal
            rows.append(dict(setting, error=repr(e)[:300]))
    return rows


def check_prefill(spec: Spec, rotated: bool, length: int = 32768, chunk: int = 512) -> dict:
    """One prompt chunk after `length` held tokens (batch 1): error against the twin and time,
    beside SDPA over the same tokens in fp16 (causal within the chunk)."""
    args, kw, n_hist = make_state(spec, rotated, 1, length)
    q = torch.randn(1, HQ, chunk, D, device=DEV, dtype=torch.float16)
    k_new, v_new = (torch.randn(1, HKV, chunk, D, device=DEV, dtype=torch.float16) for _ in range(2))
    kw = {**kw, "q_hist": kw["q_hist"][:, :, None].expand(-1, -1, chunk, -1).contiguous()} if "q_hist" in kw else kw
    chunk_args = (q, k_new, v_new, *args[1:])
    row = dict(rel_err=rel_err(prefill_attention(*chunk_args, **kw), reference.prefill_attention(*chunk_args, **kw)))
    row["ms"] = median_ms(lambda: prefill_attention(*chunk_args, **kw))
    k = torch.randn(1, HKV, length + chunk, D, device=DEV, dtype=torch.float16)
    v = torch.randn_like(k)
    mask = torch.ones(chunk, length + chunk, dtype=torch.bool, device=DEV).tril(length)
    row["sdpa_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    return row


def check_pack(spec: Spec, rotated: bool, batch: int = 8) -> dict:
    """One block of G tokens per (sequence, head) out of a wrapped ring: codes against the twin, time."""
    f16, G = torch.float16, spec.block
    R = W + G
    ring_k, ring_v = (torch.randn(batch, HKV, R, D, device=DEV, dtype=f16) for _ in range(2))
    args, kw, n_hist = make_state(spec, False, batch, 8192)
    hist = args[4]
    src0, dst0 = R - G // 2, G
    pkw = {}
    rows = (src0 + torch.arange(G, device=DEV)) % R
    k, v = ring_k[:, :, rows].float(), ring_v[:, :, rows].float()
    if rotated:
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV).float() / D))
        emb = torch.outer(torch.arange(8192, device=DEV).float(), inv).repeat(1, 2)
        pkw = dict(rope=PreRope(emb.cos(), emb.sin(), torch.full((batch,), N_SINK, device=DEV, dtype=torch.int32)),
                   key_matrix=hadamard(D, DEV).expand(HKV, D, D).contiguous(), value_matrix=hadamard(D, DEV))
        pos = N_SINK + dst0 + torch.arange(G, device=DEV)
        from minikv.model import apply_rope
        k = apply_rope(k, emb.cos()[pos], -emb.sin()[pos]) @ hadamard(D, DEV)
        v = v @ hadamard(D, DEV)
    quantize_pack(ring_k, ring_v, src0, G, hist, dst0, spec, 0.9, 1.0, **pkw)
    want = reference.quantize_block(k, v, spec, 0.9, 1.0)
    meta = slice(dst0 // G, dst0 // G + 1) if spec.k_per_channel else slice(dst0, dst0 + G)
    got = (hist.k[:, :, dst0:dst0 + G], hist.v[:, :, dst0:dst0 + G], hist.k_scale[:, :, meta])
    row = dict(k_bytes_differ=(got[0] != want.k).float().mean().item(),
               v_bytes_differ=(got[1] != want.v).float().mean().item(),
               k_scale_rel_err=rel_err(got[2], want.k_scale))
    row["ms"] = median_ms(lambda: quantize_pack(ring_k, ring_v, src0, G, hist, dst0, spec, 0.9, 1.0, **pkw))
    return row


def check_store(preset: str) -> dict:
    """A QuantizedStore on the GPU, SmolLM2's attention shape (9 query heads over 3 KV heads, D 64):
    the kernel path against the reference path (a store with the dequantized mirror never calls
    the kernels), on random prefill chunks and decode steps, bf16."""
    from minikv.config import ModelConfig
    from minikv.model import rope_tables
    from minikv.presets import KVSettings, plan_layers
    from minikv.qstore import QuantizedStore

    cfg = ModelConfig(vocab_size=10, dim=576, n_layers=2, n_heads=9, n_kv_heads=3, hidden_dim=8, head_dim=64)
    settings = KVSettings.from_preset(preset)
    fast, ref = (QuantizedStore(2, 2, 2048, 3, 64, None, torch.bfloat16, DEV, settings=settings,
                                plans=plan_layers(cfg, settings), rope=rope_tables(cfg, 2048), mirror=mirror)
                 for mirror in (False, True))
    worst = 0.0
    for T in [512, 512, 300] + [1] * 40:
        pos = fast.positions(T)
        for layer in range(2):
            q = torch.randn(2, 9, T, 64, device=DEV, dtype=torch.bfloat16)
            k, v = (torch.randn(2, 3, T, 64, device=DEV, dtype=torch.bfloat16) for _ in range(2))
            worst = max(worst, rel_err(fast.attend(layer, q, k, v, pos), ref.attend(layer, q, k, v, pos)))
        fast.advance(T)
        ref.advance(T)
    return dict(rel_err=worst, tokens=fast.length)


def decode_rows(result: dict, names: list[str], out: Path) -> None:
    sdpa = result.setdefault("_sdpa", {})
    for name in names:
        spec, rotated = PRESETS[name]
        for batch, length in SHAPES:
            row = dict(preset=name, batch=batch, length=length)
            t0 = time.time()
            try:
                args, kw, n_hist = make_state(spec, rotated, batch, length)
                got = decode_attention(*args, **kw)
                if batch * length <= 8 * 32768:
                    row["rel_err"] = rel_err(got, reference.decode_attention(*args, **kw))
                row["ms"] = median_ms(lambda: decode_attention(*args, **kw))
                row["graph_ms"] = median_ms(lambda: decode_attention(*args, **kw), graph=True)
                row["bytes"] = bytes_read(spec, batch, length, n_hist)
                row["bw"] = row["bytes"] / row["ms"] * 1e3
                key = f"{batch}x{length}"
                if key not in sdpa:
                    sdpa[key] = bench_sdpa(batch, length)
                row.update(sdpa[key])
            except Exception as e:
                row["error"] = repr(e)[:3000]
            row["seconds"] = time.time() - t0
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
            (out / "decode_attention.json").write_text(json.dumps(result, indent=1))  # partial results too
            torch.cuda.empty_cache()


def other_checks(result: dict, out: Path) -> None:
    checks = [(f"store_{preset}", lambda preset=preset: check_store(preset)) for preset in ("k4v2", "rotatekv", "mikv")]
    checks += [(f"prefill_{name}", lambda name=name: check_prefill(*PRESETS[name])) for name in ("k4v2", "rotatekv")]
    checks += [(f"pack_{name}", lambda name=name: check_pack(*PRESETS[name]))
               for name in ("k4v2", "skvq", "rotatekv")]
    for key, fn in checks:
        try:
            result[key] = fn()
        except Exception as e:
            result[key] = dict(error=repr(e)[:3000])
        print(key, json.dumps(result[key]), flush=True)
        (out / "decode_attention.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--sweep", nargs="*", default=["k4v2", "kivi2"], help="presets whose launch settings to sweep")
    ap.add_argument("--no-checks", action="store_true", help="skip the prefill, pack and store checks")
    opts = ap.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    result = dict(command="python3 -m kernels.bench_attention " + shlex.join(sys.argv[1:]),
                  gpu=props.name, torch=torch.__version__, triton=triton.__version__,
                  copy_bw=copy_bandwidth(torch.device(DEV), 1 << 31),
                  rows=[])
    print(f"{props.name}: copy bandwidth {result['copy_bw'] / 1e12:.2f} TB/s", flush=True)
    decode_rows(result, opts.presets, opts.out)
    if not opts.no_checks:
        other_checks(result, opts.out)
    for row in result["rows"]:
        if (row["batch"], row["length"]) == (8, 32768) and "error" not in row and row["preset"] in opts.sweep:
            args, kw, _ = make_state(*PRESETS[row["preset"]], 8, 32768)
            row["sweep"] = sweep(args, kw, 8, 32768)
            print("sweep", row["preset"], json.dumps(row["sweep"]), flush=True)
            (opts.out / "decode_attention.json").write_text(json.dumps(result, indent=1))
    result.pop("_sdpa")
    (opts.out / "decode_attention.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (opts.out / "decode_attention.md").write_text(table)
    print(table)


def markdown(result: dict) -> str:
    bw = result["copy_bw"]
    lines = [f"`{result['command']}`", "",
             f"GPU: {result['gpu']} (torch {result['torch']}, triton {result['triton']}); "
             f"copy bandwidth (read + write) {bw / 1e12:.2f} TB/s",
             "",
             "| preset | B | S | rel. error | kernel ms | graph ms | eff. BW | % of copy | SDPA (GQA) ms | "
             "SDPA expanded ms | kernel / best SDPA | best swept ms (block_n, warps, splits, stages) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['length']} | error: {r['error'][:80]} |")
            continue
        swept = [x for x in r.get("sweep", []) if "ms" in x]
        best = min(swept, key=lambda x: x["ms"]) if swept else None
        best_txt = (f"{best['ms']:.4f} ({best['block_n']}, {best['num_warps']}, {best['splits']}, "
                    f"{best['num_stages']})" if best else "-")
        sdpa = min(r["sdpa_gqa_ms"], r["sdpa_expanded_ms"])
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        lines.append(f"| {r['preset']} | {r['batch']} | {r['length']} | {err} | {r['ms']:.4f} | "
                     f"{r['graph_ms']:.4f} | {r['bw'] / 1e12:.2f} TB/s | {100 * r['bw'] / bw:.0f} % | "
                     f"{r['sdpa_gqa_ms']:.4f} | {r['sdpa_expanded_ms']:.4f} | {r['ms'] / sdpa:.2f} | {best_txt} |")
    lines += ["", "Other checks:", ""]
    lines += [f"- {key}: {json.dumps(value)}" for key, value in result.items()
              if key.startswith(("prefill_", "pack_", "store_"))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
