"""`minikv bench`: prefill/decode speed and peak memory, beside the bandwidth floor and transformers.

Writes the record as JSON and appends markdown rows to `<out>/runs.md` (`<out>/capacity.md` for
--capacity); the logic is in minikv.bench and minikv.capacity.
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from minikv.errors import MinikvError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minikv.geometries import GEOMETRIES
    from minikv.presets import add_kv_arguments

    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", type=Path, default=None, help="model folder (default: the default model)")
    src.add_argument("--geometry", choices=sorted(GEOMETRIES), help="random weights of a published shape")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights and cache dtype (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default: %(default)s)")
    p.add_argument("-n", "--new-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--ctx-fill", type=int, default=0, metavar="S",
                   help="fill the store with S synthetic tokens first, through its real write path")
    p.add_argument("--attn-only", action="store_true",
                   help="time one layer's decode attention over --ctx-fill tokens instead of the whole model")
    p.add_argument("--capacity", nargs="*", metavar="PRESET", default=None,
                   help="find the longest batch-1 context whose store fits beside the weights, for each preset "
                        "(default: --kv's), fill it, decode -n steps there and spot-check attention")
    p.add_argument("--memory-budget", type=int, metavar="BYTES",
                   help="--capacity: bytes for the store and a decode step, instead of the device's free memory "
                        "(needed on the CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; medians are reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-graph", action="store_true", help="on CUDA, decode without the CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="on CUDA, torch.compile the decode step inside the graph (faster; compiling takes minutes)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' generate baseline")
    p.add_argument("--transformers-static", action="store_true",
                   help="also time transformers with a static cache, which it compiles (CUDA only; slow to start)")
    p.add_argument("--out", type=Path, default=Path("docs/bench"),
                   help="folder for the JSON record and runs.md (default: %(default)s); '-' writes nothing")
    p.add_argument("--tag", default=None, help="JSON file name (default: built from the settings)")
    add_kv_arguments(p)


def check(args: argparse.Namespace) -> None:
    if min(args.batch, args.prompt_len, args.new_tokens, args.repeats) < 1:
        raise MinikvError("--batch, --prompt-len, -n and --repeats must be >= 1")
    if args.ctx_fill < 0:
        raise MinikvError("--ctx-fill must be >= 0")
    if args.attn_only and not args.ctx_fill:
        raise MinikvError("--attn-only needs --ctx-fill S, the number of cached tokens to attend over")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MinikvError("--device cuda: no CUDA device is available")
    if args.capacity is not None:
        from minikv.presets import PRESETS

        unknown = [name for name in args.capacity if name not in PRESETS]
        if unknown:
            raise MinikvError(f"unknown KV preset(s) {', '.join(unknown)} (choose from {', '.join(PRESETS)})")
        if args.memory_budget is None and (args.device == "cpu" or not torch.cuda.is_available()):
            raise MinikvError("--capacity on the CPU needs --memory-budget BYTES")
    if args.memory_budget is not None and args.memory_budget < 1:
        raise MinikvError("--memory-budget must be positive")


def main(args: argparse.Namespace) -> int:
    from minikv import bench
    from minikv import capacity as capacity_mode
    from minikv.presets import KVSettings, kv_settings_from_args, make_store
    from minikv.store import KVStore

    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.geometry:
        from minikv.geometries import geometry, random_model

        model, name = random_model(geometry(args.geometry), device, dtype), f"{args.geometry} (random)"
    else:
        from minikv.loader import default_model_dir
        from minikv.weights import load_folder

        folder = args.model or default_model_dir()
        model, name = load_folder(folder, device, dtype), folder.name

    def store_factory(settings: KVSettings) -> Callable[[int, int, bool], KVStore]:
        return lambda batch, capacity, static: make_store(model.config, settings, batch, capacity, dtype, device,
                                                          static=static)

    capacity = None
    if args.capacity is not None:
        if model.config.sliding_window is not None:
            raise MinikvError("--capacity: sliding-window models are not supported (e.g. mistral-7b-v0.2 has none)")
        capacity = {kv: store_factory(kv_settings_from_args(argparse.Namespace(**{**vars(args), "kv": kv})))
                    for kv in args.capacity or [args.kv]}
    opt = bench.BenchOptions(
        model=model, model_name=name, kv=args.kv, make_store=store_factory(kv_settings_from_args(args)),
        capacity=capacity, memory_budget=args.memory_budget,
        batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, ctx_fill=args.ctx_fill,
        repeats=args.repeats, graph=not args.no_graph, compile=args.compile, attn_only=args.attn_only,
        transformers=not args.no_transformers, transformers_static=args.transformers_static)
    mode = capacity_mode if capacity else bench
    record = mode.run(opt)
    record["command"] = args.command_line
    print(mode.summary(record))
    if str(args.out) != "-":
        write(record, args.out, args.tag or default_tag(record))
    return 0


def default_tag(record: dict) -> str:
    parts = [record["model"].split()[0], record["machine"].get("gpu", "cpu"), record["dtype"], record["kv"],
             f"b{record['batch']}", f"s{record['ctx_fill']}", record["mode"]]
    return re.sub(r"[^a-z0-9.]+", "-", "-".join(parts).lower())


def write(record: dict, out: Path, tag: str) -> None:
    from minikv import bench
    from minikv import capacity as capacity_mode

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{tag}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    if record["mode"] in ("decode", "capacity"):
        decode = record["mode"] == "decode"
        table = out / ("runs.md" if decode else "capacity.md")
        if not table.exists():
            table.write_text((bench.TABLE_HEADER if decode else capacity_mode.CAPACITY_HEADER) + "\n")
        rows = [bench.markdown_row(record)] if decode else capacity_mode.capacity_rows(record)
        with table.open("a") as f:
            f.write("".join(row + "\n" for row in rows))
        print(f"appended {len(rows)} row(s) to {table}")
