"""Measuring a KV store: perplexity, KL divergence and top-1 agreement, and KV statistics.

Perplexity follows llama.cpp's `llama-perplexity`: the token stream is cut into
non-overlapping chunks of n_ctx tokens (the first token of a chunk replaced by BOS when the
tokenizer adds one), and in each chunk only the second half is scored: logits at positions
n_ctx/2 … n_ctx-2 predicting tokens n_ctx/2+1 … n_ctx-1. Unlike a plain forward pass, every
chunk goes through the real store in sub-chunks of `batch_tokens`, so the store's window
fills, spills into the quantized history and is read back exactly as during generation.
KL divergence (baseline ‖ store) and top-1 agreement compare each store's next-token
distribution with a full-precision store's over the same scored positions.

`KVRecorder` is a full-precision store that also hands every layer's queries, keys
(post- and pre-RoPE) and values to a callback: what `kvstats` and `calibrate` measure.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from minikv.errors import MinikvError
from minikv.model import Transformer, apply_rope
from minikv.qstore import QuantizedStore
from minikv.store import FullPrecisionStore, KVStore


@dataclass
class Score:
    """Running sums over scored positions, reduced to llama.cpp's figures by `summary`."""

    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0
    kl: float = 0.0
    top1: int = 0
    compared: int = 0  # positions with a baseline

    def add(self, logp: Tensor, targets: Tensor, base_logp: Tensor | None) -> None:
        """logp, base_logp: (N, V) log-probabilities; targets: (N,) token ids."""
        nll = -logp.gather(-1, targets[:, None])[:, 0].double()
        self.nll += nll.sum().item()
        self.nll2 += nll.square().sum().item()
        self.count += nll.numel()
        if base_logp is not None:
            self.kl += (base_logp.exp() * (base_logp - logp)).sum().item()
            self.top1 += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            self.compared += nll.numel()

    def summary(self) -> dict[str, float | int | None]:
        mean = self.nll / self.count
        ppl = math.exp(mean)
        var = self.nll2 / self.count - mean * mean  # llama.cpp: ppl * sqrt(var(nll) / (N - 1))
        err = ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else 0.0
        kl = self.kl / self.compared if self.compared else None
        top1 = self.top1 / self.compared if self.compared else None
        return {"ppl": ppl, "ppl_err": err, "tokens": self.count, "kl": kl, "top1": top1}


def split_chunks(tokens: list[int], n_ctx: int, n_chunks: int | None = None, bos_id: int | None = None) -> Tensor:
    """(n, n_ctx) non-overlapping chunks of the token stream, the leftover tail dropped."""
    if n_ctx < 4:
        raise MinikvError(f"context {n_ctx} is too small to score (need at least 4 tokens)")
    available = len(tokens) // n_ctx
    if available == 0:
        raise MinikvError(f"the text has {len(tokens)} tokens, fewer than one {n_ctx}-token chunk (lower -c)")
    n = available if n_chunks is None or n_chunks <= 0 else min(n_chunks, available)
    chunks = torch.tensor(tokens[:n * n_ctx], dtype=torch.long).view(n, n_ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


@torch.inference_mode()
def chunk_logprobs(model: Transformer, store: KVStore, ids: Tensor, batch_tokens: int, first: int) -> Tensor:
    """Feed one chunk (T,) through a reset store in sub-chunks; log-probs (T-1-first, V) of the scored positions."""
    store.reset()
    device = store.device
    ids = ids.to(device)
    out = []
    T = ids.numel()
    for start in range(0, T, batch_tokens):
        part = ids[start:start + batch_tokens][None]
        logits = model(part, store.positions(part.shape[1]), store)[0]
        store.advance(part.shape[1])
        lo, hi = max(first, start) - start, min(T - 1, start + part.shape[1]) - start
        if hi > lo:
            out.append(F.log_softmax(logits[lo:hi].float(), dim=-1))
    return torch.cat(out)


def perplexity(model: Transformer, tokens: list[int], n_ctx: int, stores: dict[str, KVStore],
               baseline: KVStore | None = None, batch_tokens: int = 64, n_chunks: int | None = None,
               bos_id: int | None = None, progress: Callable[[int], object] | None = None) -> dict[str, dict]:
    """Score every store on the same chunks; returns name -> `Score.summary()`.

    Stores must hold n_ctx tokens. With a `baseline` store, each row also gets KL divergence and
    top-1 agreement against it; a row whose store *is* the baseline reuses its log-probs, so the
    baseline runs once per chunk however many rows there are. `progress(n)` is called after
    each chunk (e.g. a tqdm bar's `update`). Ctrl-C stops it with the chunks every store finished
    (each summary's `chunks`), so a long run keeps what it measured; before the first, it raises."""
    if batch_tokens < 1:
        raise MinikvError(f"--batch-tokens must be at least 1, not {batch_tokens}")
    for name, store in [*stores.items(), *([("baseline", baseline)] if baseline is not None else [])]:
        if store.capacity < n_ctx:
            raise MinikvError(f"store {name} holds {store.capacity} tokens, the context needs {n_ctx}")
    chunks = split_chunks(tokens, n_ctx, n_chunks, bos_id)
    first = n_ctx // 2
    scores = {name: Score() for name in stores}
    done, kept = 0, {}  # the scores after the last chunk that every store finished
    try:
        for ids in chunks:
            targets = ids[first + 1:]
            base = None if baseline is None else chunk_logprobs(model, baseline, ids, batch_tokens, first)
            for name, store in stores.items():
                logp = base if store is baseline else chunk_logprobs(model, store, ids, batch_tokens, first)
                scores[name].add(logp, targets.to(logp.device), base)
            done, kept = done + 1, {name: replace(s) for name, s in scores.items()}
            if progress is not None:
                progress(1)
    except KeyboardInterrupt:
        if not done:
            raise
    return {name: {**s.summary(), "chunks": done} for name, s in kept.items()}


def store_bits(store: KVStore, n_tokens: int) -> dict[str, float]:
    """What a store costs: mean key/value code bits over layers, bits per history element (scales
    and zero-points included), bits per element averaged over n_tokens held (the full-precision
    sinks and window included) and bytes per token of capacity."""
    if isinstance(store, QuantizedStore):
        plans = store.plans
        bits_k, bits_v = (sum(getattr(p, f) for p in plans) / len(plans) for f in ("bits_k", "bits_v"))
        per_element, average = store.bits_per_element(), store.avg_bits_per_element(n_tokens)
    else:
        bits_k = bits_v = per_element = average = torch.finfo(store.dtype).bits
    return {"bits_k": bits_k, "bits_v": bits_v, "bits_per_element": per_element, "avg_bits_per_element": average,
            "kv_bytes_per_token": store.bytes_per_token()}


# --- KV statistics ------------------------------------------------------------------------------

KVCallback = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]  # (layer, q, k, k_pre_rope, v)


class KVRecorder(FullPrecisionStore):
    """A full-precision store that passes each layer's (q, k_post_rope, k_pre_rope, v), all (B, H, T, D), to `on_kv`.

    Pre-RoPE keys are recovered by rotating back by the same angle (RoPE is orthogonal), so
    the model needs no hook."""

    def __init__(self, model: Transformer, capacity: int, on_kv: KVCallback, batch: int = 1) -> None:
        c = model.config
        w = model.tok_embeddings.weight
        super().__init__(c.n_layers, batch, capacity, c.n_kv_heads, c.head_dim, c.sliding_window, w.dtype, w.device)
        self.model, self.on_kv = model, on_kv

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        cos = self.model.rope_cos[positions].unsqueeze(1).to(k.dtype)
        sin = self.model.rope_sin[positions].unsqueeze(1).to(k.dtype)
        self.on_kv(layer, q, k, apply_rope(k, cos, -sin), v)
        return super().attend(layer, q, k, v, positions)


@torch.inference_mode()
def record_kv(model: Transformer, tokens: list[int], n_ctx: int, on_kv: KVCallback,
              n_chunks: int | None = None, batch_tokens: int = 512, bos_id: int | None = None,
              progress: Callable[[int], object] | None = None) -> int:
    """Run the text in n_ctx-token chunks, calling on_kv(layer, q, k, k_pre, v) per layer and sub-chunk.

    Returns the number of tokens seen."""
    store = KVRecorder(model, n_ctx, on_kv)
    chunks = split_chunks(tokens, n_ctx, n_chunks, bos_id)
    for ids in chunks:
        store.reset()
        ids = ids.to(store.device)
        for start in range(0, n_ctx, batch_tokens):
            part = ids[start:start + batch_tokens][None]
            model(part, store.positions(part.shape[1]), store, last_only=True)
            store.advance(part.shape[1])
        if progress is not None:
            progress(1)
    return chunks.numel()


@dataclass
class GramStats:
    """Streaming second moments of one (tokens × channels) matrix per layer: X^T X in float64.

    The singular values of X are the square roots of the eigenvalues of X^T X, so norms and
    spectra come out exactly without keeping the tokens."""

    n_layers: int
    gram: list[Tensor | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gram = [None] * self.n_layers
        self.rows = [0] * self.n_layers

    def add(self, layer: int, x: Tensor) -> None:
        """x: (B, H, T, D) -> rows of H*D channels, one per token."""
        m = x.transpose(1, 2).reshape(-1, x.shape[1] * x.shape[3]).double().cpu()
        g = m.T @ m
        self.gram[layer] = g if self.gram[layer] is None else self.gram[layer] + g
        self.rows[layer] += m.shape[0]

    def layer_stats(self, layer: int) -> dict[str, float | None]:
        """Per-token-normalised spectral and Frobenius norms (σ/√N), σ_max/σ_min and effective rank.

        Effective rank is exp(entropy of σ_i / Σσ) (Roy & Vetterli): how many directions carry the energy."""
        n = self.rows[layer]
        eig = torch.linalg.eigvalsh(self.gram[layer]).clamp_min(0)
        sigma = eig.sqrt().flip(0)
        p = sigma / sigma.sum()
        p = p[p > 0]
        return {
            "spectral": sigma[0].item() / math.sqrt(n),
            "frobenius": math.sqrt(eig.sum().item() / n),
            "cond": (sigma[0] / sigma[-1]).item() if sigma[-1] > 1e-9 * sigma[0] else None,  # None: rank-deficient
            "eff_rank": math.exp(-(p * p.log()).sum().item()),
        }
