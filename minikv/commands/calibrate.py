"""`minikv calibrate`: measure a model's keys, values and queries and write kv_calibration.json.

The text is the user's own (-f FILE) or, by default, text the model writes itself from a
short prompt, so calibration needs nothing from outside the user's machine. Per layer it
records post- and pre-RoPE keys, values and a sample of queries, then computes what the
quantized store's settings may ask for (minikv.calibration): the SKVQ key channel order
(post- and pre-RoPE), the clip ratios for 2-, 3- and 4-bit keys and values in the SKVQ
layout (per-token groups, keys reordered), and KV-AdaQuant's per-layer norms (spectral norm
per √token of the key and value matrices) for the bit-budget split.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from minikv.errors import MinikvError

DEFAULT_CTX = 512
CLIP_BITS = (2, 3, 4)
PROMPT = "Write a long, thoughtful essay about how people learn new skills, with examples."
MAX_CLIP_TOKENS = 256  # keys/values per layer the clip search attends over (a random sample)
MAX_CLIP_QUERIES = 64  # queries per layer it scores, likewise


class Collector:
    """Everything `on_kv` is handed, per layer, on the CPU: (H, N, D) keys/values, (Hq, Nq, D) queries."""

    def __init__(self, n_layers: int) -> None:
        self.parts: dict[str, list[list[Tensor]]] = {kind: [[] for _ in range(n_layers)]
                                                      for kind in ("q", "k", "k_pre", "v")}

    def __call__(self, layer: int, q: Tensor, k: Tensor, k_pre: Tensor, v: Tensor) -> None:
        def rows(x: Tensor) -> Tensor:  # (B, H, T, D) -> (H, B*T, D)
            return x.transpose(0, 1).flatten(1, 2).float().cpu()

        for kind, x in (("k", k), ("k_pre", k_pre), ("v", v), ("q", q)):
            self.parts[kind][layer].append(rows(x))

    def get(self, kind: str, layer: int) -> Tensor:
        return torch.cat(self.parts[kind][layer], 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minikv.options import add_model_arguments, positive_int

    add_model_arguments(parser)
    parser.set_defaults(ctx=DEFAULT_CTX)
    g = parser.add_argument_group("calibration")
    g.add_argument("-f", "--file", metavar="FILE", help="text to calibrate on (default: text the model generates)")
    g.add_argument("--chunks", type=positive_int, default=4, metavar="K",
                   help="with -f: use the first K chunks of -c tokens (default: %(default)s)")
    g.add_argument("--gen-tokens", type=positive_int, default=128, metavar="N",
                   help="without -f: tokens generated per sequence (default: %(default)s)")
    g.add_argument("--gen-batch", type=positive_int, default=8, metavar="B",
                   help="without -f: sequences generated side by side (default: %(default)s)")
    g.add_argument("-s", "--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--out", type=Path, metavar="PATH",
                   help="where to write (default: kv_calibration.json in the model folder)")


@torch.inference_mode()
def generate_and_record(model, tokenizer, on_kv, n_tokens: int, batch: int, seed: int) -> int:
    """Sample `batch` continuations of one prompt through a recording store; return tokens recorded."""
    from minikv.evaluate import KVRecorder
    from minikv.sampling import SamplingParams, sample

    try:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    except MinikvError:  # a model without a chat template continues plain text
        prompt = PROMPT + "\n\n"
    ids = tokenizer.encode(prompt)
    device = model.tok_embeddings.weight.device
    store = KVRecorder(model, len(ids) + n_tokens, on_kv, batch=batch)
    tokens = torch.tensor(ids, device=device).expand(batch, -1)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(tokenizer.eos_ids, dtype=torch.long, device=device)
    for _ in range(n_tokens):
        logits = model(tokens, store.positions(tokens.shape[1]), store, last_only=True)[:, -1]
        store.advance(tokens.shape[1])
        logits[:, eos] = float("-inf")  # keep writing: calibration wants text, not turn ends
        tokens = sample(logits, params, gen)[:, None]
    return batch * store.length


def calibrate(cfg, data: Collector, name: str):
    """The Calibration for collected keys, values and queries."""
    from minikv.calibration import Calibration, compute_permutation, fingerprint, search_clip
    from minikv.evaluate import GramStats
    from minikv.presets import KVSettings

    L, H = cfg.n_layers, cfg.n_kv_heads
    G = min(KVSettings.group_k, cfg.head_dim)  # channels per scale, as the presets use
    group = cfg.n_heads // H
    perms = {kind: torch.stack([compute_permutation(data.get(kind, i)) for i in range(L)]) for kind in ("k", "k_pre")}
    clip: dict[str, dict[int, list[float]]] = {"k": {b: [] for b in CLIP_BITS}, "v": {b: [] for b in CLIP_BITS}}
    norms: dict[str, list[float]] = {"k": [], "v": []}
    rng = torch.Generator().manual_seed(0)
    for i in range(L):
        k, v, q = data.get("k", i), data.get("v", i), data.get("q", i)
        keep = torch.randperm(k.shape[1], generator=rng)[:MAX_CLIP_TOKENS]
        q = q[:, torch.randperm(q.shape[1], generator=rng)[:MAX_CLIP_QUERIES]]
        perm = perms["k"][i]  # (H, D): the stored space of reordered keys; queries follow the same order
        ks = k[:, keep].gather(-1, perm[:, None].expand(-1, keep.numel(), -1))
        qs = q.gather(-1, perm.repeat_interleave(group, 0)[:, None].expand(-1, q.shape[1], -1))
        for b in CLIP_BITS:
            clip["k"][b].append(search_clip(qs, ks, v[:, keep], "k", b, G, axis="token"))
            clip["v"][b].append(search_clip(qs, ks, v[:, keep], "v", b, G, axis="token"))
        for kind, x in (("k", k), ("v", v)):
            stats = GramStats(1)
            stats.add(0, x[None])
            norms[kind].append(stats.layer_stats(0)["spectral"])
    return Calibration(model=fingerprint(cfg, name), key_perm=perms["k"], key_perm_prerope=perms["k_pre"],
                       clip=clip, norms=norms)


def model_folder(model: str | None) -> Path:
    from minikv.loader import default_model_dir

    path = default_model_dir() if model is None else Path(model).expanduser()
    return path.parent if path.suffix == ".gguf" else path


def main(args: argparse.Namespace) -> int:
    from minikv.api import resolve_device, resolve_dtype
    from minikv.calibration import save_calibration
    from minikv.commands.perplexity import read_text
    from minikv.evaluate import record_kv
    from minikv.loader import load
    from minikv.presets import CALIBRATION_FILE

    device = resolve_device(args.device)
    model, tokenizer = load(args.model, device, resolve_dtype(args.dtype, device), progress=sys.stderr.isatty())
    data = Collector(model.config.n_layers)
    if args.file:
        ids = tokenizer.encode(read_text(args.file), add_bos=False)
        bos = tokenizer.bos_id if tokenizer.add_bos else None
        n = record_kv(model, ids, args.ctx, data, args.chunks, bos_id=bos)
        source = f"{n} tokens of {args.file}"
    else:
        n = generate_and_record(model, tokenizer, data, args.gen_tokens, args.gen_batch, args.seed)
        source = f"{n} tokens the model generated (seed {args.seed})"
    folder = model_folder(args.model)
    calib = calibrate(model.config, data, folder.name)
    out = args.out or folder / CALIBRATION_FILE
    try:
        save_calibration(out, calib)
    except OSError as e:
        raise MinikvError(f"cannot write {out}: {e}") from None
    print(f"wrote {out} from {source}", file=sys.stderr)
    return 0
