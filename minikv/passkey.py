"""Passkey (needle-in-a-haystack) retrieval through the KV store.

A random 5-digit pass key is hidden at a depth (a fraction of the filler) inside filler text
of a given length in tokens; the model, asked for it at the end, must repeat it. Retrieval
over long contexts is where a quantized history can lose what attention needs, so every
KV preset is scored on the same prompts. The prompt is chat-templated for chat models and
the reply is started with "The pass key is" so that the first number is the answer.

    python -m minikv.passkey --filler pg_dev.txt --lengths 1024,2048 --depths 0.1,0.5,0.9 --kv fp16,k4v2
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minikv.sampling import SamplingParams

TASK = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_START = "The pass key is"


@dataclass
class Trial:
    kv: str
    length: int  # target prompt length in tokens
    depth: float
    trial: int
    tokens: int  # actual prompt length
    key: str
    answer: str
    found: bool
    seconds: float


def haystack(tokenizer, filler_ids: list[int], n_tokens: int, depth: float, key: str, offset: int) -> str:
    """n_tokens of filler (from `offset`) with the needle on its own line after the sentence nearest `depth`."""
    text = tokenizer.decode(filler_ids[offset:offset + n_tokens])
    at = int(depth * len(text))
    cut = text.rfind(". ", 0, at)
    cut = at if cut < 0 else cut + 1
    return f"{text[:cut]}\n{NEEDLE.format(key=key)}\n{text[cut:].lstrip()}"


def prompt_ids(tokenizer, filler_ids: list[int], length: int, depth: float, key: str, offset: int) -> list[int]:
    """The chat-templated prompt, filler sized so the whole prompt is about `length` tokens."""
    def render(body: str) -> str:
        content = f"{TASK} {QUESTION}\n\n{body}\n\n{QUESTION}"  # asked before and after: better on small models
        chat = tokenizer.apply_chat_template([{"role": "user", "content": content}])
        return chat + ANSWER_START

    overhead = len(tokenizer.encode(render(NEEDLE.format(key=key)))) + 2
    return tokenizer.encode(render(haystack(tokenizer, filler_ids, length - overhead, depth, key, offset)))


def run_trials(llm, kv_names: list[str], filler: str, lengths: list[int], depths: list[float], trials: int,
               seed: int = 0, log=None, model: str | None = None) -> list[Trial]:
    """Every (preset, length, depth, trial), greedy; the same keys and filler for every preset.
    `model`: where the model came from (None: the default model), for its calibration file."""
    from minikv.presets import KVSettings, default_calibration

    filler_ids = llm.tokenizer.encode(filler, add_bos=False)
    if len(filler_ids) < max(lengths):
        raise SystemExit(f"the filler has {len(filler_ids)} tokens, fewer than {max(lengths)}")
    rng = random.Random(seed)
    cases = [(n, d, t, str(rng.randint(10000, 99999)), rng.randrange(len(filler_ids) - n + 1))
             for n in lengths for d in depths for t in range(trials)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    results = []
    for kv in kv_names:
        llm.kv = KVSettings.from_preset(kv, calib=default_calibration(model))
        llm.engine = None  # free the previous store first
        engine = llm.engine = llm.new_engine()
        for n, d, t, key, offset in cases:
            ids = prompt_ids(llm.tokenizer, filler_ids, n, d, key, offset)
            t0 = time.perf_counter()
            engine.reset()
            answer = "".join(engine.generate(engine.ingest(ids), params))
            found = re.search(r"\d+", answer)
            results.append(Trial(kv, n, d, t, len(ids), key, answer.strip(), bool(found and found[0] == key),
                                 time.perf_counter() - t0))
            if log:
                log(results[-1])
    return results


def table(results: list[Trial]) -> str:
    """Markdown: one row per preset, one column per length, cells = retrieved / trials (over depths)."""
    lengths = sorted({r.length for r in results})
    kvs = list(dict.fromkeys(r.kv for r in results))
    lines = ["| KV preset | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths)
             + " | all |", "|---" * (len(lengths) + 2) + "|"]
    for kv in kvs:
        cells = []
        for group in [[r for r in results if r.kv == kv and r.length == n] for n in lengths] + \
                     [[r for r in results if r.kv == kv]]:
            cells.append(_score(group))
        lines.append(f"| {kv} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_table(results: list[Trial]) -> str:
    """Markdown: rows = (preset, length), columns = depths, cells = retrieved / trials."""
    depths = sorted({r.depth for r in results})
    lines = ["| KV preset | length | " + " | ".join(f"{d:.0%}" for d in depths) + " |",
             "|---" * (len(depths) + 2) + "|"]
    for kv in dict.fromkeys(r.kv for r in results):
        for n in sorted({r.length for r in results}):
            cells = [[r for r in results if r.kv == kv and r.length == n and r.depth == d] for d in depths]
            if any(cells):
                lines.append(f"| {kv} | {n} | " + " | ".join(_score(c) for c in cells) + " |")
    return "\n".join(lines)


def _score(trials: list[Trial]) -> str:
    return f"{sum(r.found for r in trials)}/{len(trials)}" if trials else "–"


def main(argv: list[str] | None = None) -> int:
    from minikv.api import load

    p = argparse.ArgumentParser(prog="python -m minikv.passkey", description=__doc__.split("\n\n")[0])
    p.add_argument("--filler", type=Path, required=True, help="UTF-8 text the needle is hidden in")
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: the default model)")
    p.add_argument("--device", default=None)
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths in tokens")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths, fractions of the filler")
    p.add_argument("--trials", type=int, default=1, help="keys and filler offsets per (length, depth)")
    p.add_argument("--kv", default="fp16", help="comma-separated KV presets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every trial as JSON here")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    llm = load(args.model, device=args.device, ctx=max(lengths) + 16, kv="fp16", cuda_graph=False)

    def log(r: Trial) -> None:
        print(f"{r.kv:10s} {r.tokens:6d} tok depth {r.depth:.0%} key {r.key} -> {r.answer!r} "
              f"{'ok' if r.found else 'MISS'} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)

    results = run_trials(llm, args.kv.split(","), args.filler.read_text(encoding="utf-8"), lengths, depths,
                         args.trials, args.seed, log, args.model)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(table(results) + "\n\n" + depth_table(results))
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
