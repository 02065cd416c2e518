"""`minikv perplexity`: llama-perplexity's score of a text, fed through the real KV store.

One row per --kv spec (the --kv-* overrides apply to each); with --kl-baseline every row
also gets KL divergence and top-1 agreement against the full-precision store, which runs
once per chunk whatever the number of rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minikv.errors import MinikvError

DEFAULT_CTX = 512  # llama-perplexity's default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minikv.options import add_model_arguments, positive_int

    add_model_arguments(parser)
    allow_several_presets(parser)
    parser.set_defaults(ctx=DEFAULT_CTX)
    g = parser.add_argument_group("perplexity")
    g.add_argument("-f", "--file", required=True, metavar="FILE", help="text to score")
    g.add_argument("--chunks", type=int, default=-1, metavar="K",
                   help="score only the first K chunks of -c tokens; -1: all (default: %(default)s)")
    g.add_argument("--batch-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens fed to the store per forward pass; small enough that the window spills into "
                        "the quantized history as in generation; 1 = token-by-token decode (default: %(default)s)")
    g.add_argument("--kl-baseline", action="store_true",
                   help="also run the full-precision store: KL divergence and top-1 agreement per row")
    g.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")


def allow_several_presets(parser: argparse.ArgumentParser) -> None:
    """Turn the shared single-valued --kv into `--kv SPEC [SPEC ...]` (one result row each)."""
    action = next(a for a in parser._actions if a.dest == "kv")
    action.nargs, action.default, action.choices, action.metavar = "+", ["fp16"], None, "SPEC"
    action.help = ("KV settings, one result row each: a preset, optionally with fields changed, "
                   "PRESET[:FIELD=VALUE...], e.g. kivi2:bits_k=4:prerope=True (default: fp16)")


def parse_spec(spec: str, args: argparse.Namespace):
    """KVSettings for `PRESET[:FIELD=VALUE...]`, the --kv-* flags applied first; values are Python literals."""
    import ast

    from minikv.presets import kv_settings_from_args

    name, *fields = spec.split(":")
    settings = kv_settings_from_args(argparse.Namespace(**{**vars(args), "kv": name}))
    overrides = {}
    for item in fields:
        key, sep, text = item.partition("=")
        if not sep:
            raise MinikvError(f"--kv {spec}: expected FIELD=VALUE, not {item!r}")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text  # a bare word, e.g. key_axis=token
    return settings.replace(**overrides)


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinikvError(f"cannot read {path}: {e}") from None


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: the columns users compare, fp16 and bits beside every quantized row.

    bits/elem: one more history token's cost; avg bits: over n_ctx tokens, sinks and window included."""
    cols = [("kv", "{}"), ("bits_k", "{:.3g}"), ("bits_v", "{:.3g}"), ("bits_per_element", "{:.2f}"),
            ("avg_bits_per_element", "{:.2f}"), ("ppl", "{:.4f}"), ("ppl_err", "{:.4f}"), ("dppl_pct", "{:+.2f}"),
            ("kl", "{:.5f}"), ("top1", "{:.4f}"), ("kv_bytes_per_token", "{:.0f}")]
    heads = ["kv", "K", "V", "bits/elem", "avg bits", "PPL", "±", "ΔPPL %", "KL", "top-1", "KV B/tok"]
    cells = [[("-" if r.get(k) is None else fmt.format(r[k])) for k, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from minikv.api import resolve_device, resolve_dtype
    from minikv.evaluate import perplexity, store_bits
    from minikv.loader import load
    from minikv.presets import KVSettings, make_store

    text = read_text(args.file)
    settings = {spec: parse_spec(spec, args) for spec in args.kv}  # a spec named twice is one row
    device = resolve_device(args.device)
    model, tokenizer = load(args.model, device, resolve_dtype(args.dtype, device), progress=sys.stderr.isatty())
    dtype, cfg = model.tok_embeddings.weight.dtype, model.config
    ids = tokenizer.encode(text, add_bos=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None  # llama.cpp puts BOS first in every chunk

    if args.kl_baseline and all(s.quantized for s in settings.values()):
        settings = {"fp16": KVSettings.from_preset("fp16"), **settings}  # the baseline's own row, for ΔPPL
    stores = {spec: make_store(cfg, s, 1, args.ctx, dtype, device) for spec, s in settings.items()}
    base = next((spec for spec, s in settings.items() if not s.quantized), None)

    n_chunks = min(len(ids) // args.ctx, args.chunks) if args.chunks > 0 else len(ids) // args.ctx
    with tqdm(total=n_chunks, desc="perplexity", unit="chunk", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        results = perplexity(model, ids, args.ctx, stores, stores[base] if args.kl_baseline else None,
                             args.batch_tokens, n_chunks, bos, bar.update)

    done = next(iter(results.values()))["chunks"]
    if done < n_chunks:
        print(f"interrupted: the results cover the first {done} of {n_chunks} chunks", file=sys.stderr)
    ref = None if base is None else results[base]["ppl"]
    rows = [{"kv": spec, "settings": settings[spec].describe(), **result, **store_bits(stores[spec], args.ctx),
             "n_ctx": args.ctx, "batch_tokens": args.batch_tokens,
             "dppl_pct": None if ref is None else 100 * (result["ppl"] / ref - 1)}
            for spec, result in results.items()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{args.file}: {len(ids)} tokens, {done} chunks of {args.ctx}, "
              f"{rows[0]['tokens']} scored, batch {args.batch_tokens}, {device.type} {str(dtype).split('.')[-1]}")
        print(format_table(rows))
    return 130 if done < n_chunks else 0  # interrupted: the results printed, the exit status says so
