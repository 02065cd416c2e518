"""`minikv kvstats`: per-layer norms and spectra of the keys and values a text produces.

KV-AdaQuant's analysis, reproducible: for every layer, the spectral norm, Frobenius norm,
σ_max/σ_min and effective rank of the (tokens × KV heads·head dim) key matrix, after RoPE
and before it, and of the value matrix. Norms are divided by √tokens (per-token RMS scale),
so they do not grow with the length of the text. Keys with larger norms amplify their
quantization error more, which is why keys get more bits than values.
"""
from __future__ import annotations

import argparse
import json
import sys

DEFAULT_CTX = 512
KINDS = (("k", "K post-RoPE"), ("k_prerope", "K pre-RoPE"), ("v", "V"))
STATS = (("spectral", "‖·‖₂", "{:.2f}"), ("frobenius", "‖·‖F", "{:.2f}"), ("cond", "σmax/σmin", "{:.3g}"),
         ("eff_rank", "eff.rank", "{:.1f}"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minikv.options import add_model_arguments, positive_int

    add_model_arguments(parser)
    parser.set_defaults(ctx=DEFAULT_CTX)
    g = parser.add_argument_group("kvstats")
    g.add_argument("-f", "--file", required=True, metavar="FILE", help="text to run through the model")
    g.add_argument("--chunks", type=positive_int, default=4, metavar="K",
                   help="use the first K chunks of -c tokens (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def collect(model, ids: list[int], n_ctx: int, n_chunks: int, bos: int | None) -> tuple[dict, int]:
    """{kind: GramStats} over the text, and the number of tokens seen."""
    from tqdm import tqdm

    from minikv.evaluate import GramStats, record_kv

    stats = {kind: GramStats(model.config.n_layers) for kind, _ in KINDS}

    def on_kv(layer, q, k, k_pre, v):
        for kind, x in zip(stats, (k, k_pre, v)):
            stats[kind].add(layer, x)

    n = min(len(ids) // n_ctx, n_chunks)
    with tqdm(total=n, desc="kvstats", unit="chunk", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        tokens = record_kv(model, ids, n_ctx, on_kv, n_chunks, bos_id=bos, progress=bar.update)
    return stats, tokens


def format_table(layers: list[dict]) -> str:
    heads = ["layer"] + [f"{title} {label}" for _, title in KINDS for _, label, _ in STATS]
    rows = [[str(r["layer"])] + ["inf" if r[kind][key] is None else fmt.format(r[kind][key])
                                 for kind, _ in KINDS for key, _, fmt in STATS]
            for r in layers]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [heads, *rows])


def main(args: argparse.Namespace) -> int:
    from minikv.api import resolve_device, resolve_dtype
    from minikv.commands.perplexity import read_text
    from minikv.loader import load

    text = read_text(args.file)
    device = resolve_device(args.device)
    model, tokenizer = load(args.model, device, resolve_dtype(args.dtype, device), progress=sys.stderr.isatty())
    ids = tokenizer.encode(text, add_bos=False)
    stats, tokens = collect(model, ids, args.ctx, args.chunks, tokenizer.bos_id if tokenizer.add_bos else None)
    layers = [{"layer": i, **{kind: stats[kind].layer_stats(i) for kind, _ in KINDS}}
              for i in range(model.config.n_layers)]
    if args.json:
        print(json.dumps({"file": args.file, "n_ctx": args.ctx, "tokens": tokens, "layers": layers}))
        return 0
    print(f"{args.file}: {tokens} tokens in chunks of {args.ctx}; norms per token (divided by √tokens)")
    print(format_table(layers))
    k, v = (sum(r[kind]["frobenius"] for r in layers) / len(layers) for kind in ("k", "v"))
    print(f"mean Frobenius norm per token: keys {k:.2f}, values {v:.2f} (keys/values {k / v:.2f}x)")
    return 0
