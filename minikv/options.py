"""Flags shared by the commands that load a model and generate, with llama.cpp's names.

Commands call `add_model_arguments` and `add_sampling_arguments`, then `load_from_args` and
`sampling_from_args`, so every command spells and checks a flag the same way.
"""
from __future__ import annotations

import argparse
import sys

from minikv.sampling import SamplingParams

DEFAULT_CTX = 4096
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (a bad value is a usage error)."""
    value = integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def n_predict(text: str) -> int:
    """argparse type for -n: an integer >= -1 (-1: until end of text or a full context)."""
    value = integer(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be >= -1 (-1: until end of text or a full context), got {value}")
    return value


def max_tokens(n: int, ctx: int) -> int:
    """The token budget of `-n N`: -1 means as many as the context can hold."""
    return ctx if n == -1 else n


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """-m, --device, --dtype, -c, -v, --no-graph and the KV-cache flags."""
    from minikv.presets import add_kv_arguments

    g = parser.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH", default=None,
                   help="model folder (config.json + safetensors) or .gguf file (default: the default model)")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weights and activations (default: auto = fp32 on cpu, bf16 on cuda)")
    g.add_argument("-c", "--ctx", "--ctx-size", type=positive_int, default=DEFAULT_CTX, metavar="N",
                   help="context capacity in tokens: the KV store is preallocated for it (default: %(default)s)")
    g.add_argument("--no-graph", action="store_true", help="on cuda, do not capture the decode step as a CUDA graph")
    g.add_argument("-v", "--verbose", action="store_true", help="print speed, token counts and KV bytes on stderr")
    add_kv_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """-n, --temp, --top-k, --top-p, --min-p, --repeat-penalty, --repeat-last-n, -s, --stop/-r."""
    d = SamplingParams()
    g = parser.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", type=n_predict, default=d.max_tokens, metavar="N",
                   help="tokens to generate at most; -1: until end of text or a full context (default: %(default)s)")
    g.add_argument("--temp", type=float, default=d.temperature, help="temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k,
                   help="keep the k likeliest tokens; 0: off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p,
                   help="keep the likeliest tokens covering p of the mass; 1: off (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=d.min_p,
                   help="drop tokens below p times the top probability; 0: off (default: %(default)s)")
    g.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help="penalise recently seen tokens; 1: off (default: %(default)s)")
    g.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                   help="how many recent tokens the penalty looks at (default: %(default)s)")
    g.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: a fresh one each run)")
    g.add_argument("--stop", "-r", "--reverse-prompt", dest="stop", action="append", default=[], metavar="STRING",
                   help="stop when the output contains STRING (not printed); repeatable")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the parsed flags, validated (a bad value raises MinikvError)."""
    params = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
        max_tokens=max_tokens(args.n_predict, args.ctx), stop=list(args.stop),
    )
    params.validate()
    return params


def load_from_args(args: argparse.Namespace):
    """The model, tokenizer and a KV store for the parsed flags, as a `minikv.api.LLM`."""
    from minikv.api import load
    from minikv.presets import kv_settings_from_args

    return load(args.model, device=args.device, dtype=args.dtype, ctx=args.ctx, kv=kv_settings_from_args(args),
                cuda_graph=not args.no_graph, progress=sys.stderr.isatty())
