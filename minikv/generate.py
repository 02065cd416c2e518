"""Prefill and decode through a store: the engine behind `run`, `chat`, `summarize` and the API.

An `Engine` is one conversation's state: the model, its tokenizer, a KV store and the token
ids the store holds. `ingest` prefills new tokens in chunks (so memory stays bounded by the
store whatever the prompt length); `generate` decodes one token at a time and yields text
pieces as soon as they are complete UTF-8 and cannot be the start of a stop string.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from minikv.errors import ContextFull, MinikvError
from minikv.sampling import SamplingParams, sample
from minikv.store import KVStore


@dataclass
class Stats:
    """Timing of the last prefill and generation, for `-v`, `/stats` and the API."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "eos", "stop", "length", "context", "interrupted"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Engine:
    model: torch.nn.Module
    tokenizer: object  # minikv.tokenizer.Tokenizer
    store: KVStore
    prefill_chunk: int = 512
    tokens: list[int] = field(default_factory=list)  # what the store holds, in order
    stats: Stats = field(default_factory=Stats)
    decode_step: Callable[[Tensor, Tensor], Tensor] | None = None  # e.g. a CUDA-graph replay

    @property
    def device(self) -> torch.device:
        return self.store.device

    def reset(self) -> None:
        self.store.reset()
        self.tokens = []

    def forward(self, ids: Tensor) -> Tensor:
        """Run ids (1, T) through the model into the store; return the last position's logits (1, V)."""
        positions = self.store.positions(ids.shape[1])
        if ids.shape[1] == 1 and self.decode_step is not None:
            logits = self.decode_step(ids, positions)
        else:
            logits = self.model(ids, positions, self.store, last_only=True)[:, -1]
        self.store.advance(ids.shape[1])
        return logits

    @torch.inference_mode()
    def ingest(self, ids: list[int], progress: bool = False) -> Tensor:
        """Prefill `ids` after what the store holds, in chunks. Returns logits (V,) after the last id."""
        if not ids:
            raise MinikvError("nothing to ingest: the prompt is empty")
        if len(ids) > self.store.room():
            raise ContextFull(f"the prompt needs {len(ids)} tokens but only {self.store.room()} of the "
                              f"{self.store.capacity}-token context are free (raise -c/--ctx)")
        from tqdm import tqdm

        t0 = time.perf_counter()
        bar = tqdm(total=len(ids), desc="prefill", unit="tok", leave=False,
                   disable=not progress or len(ids) < 4 * self.prefill_chunk)
        data = torch.tensor(ids, device=self.device)[None]
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = data[:, start:start + self.prefill_chunk]
            logits = self.forward(chunk)
            self.tokens.extend(ids[start:start + chunk.shape[1]])
            bar.update(chunk.shape[1])
        bar.close()
        _sync(self.device)
        self.stats = Stats(prompt_tokens=len(ids), prefill_seconds=time.perf_counter() - t0)
        return logits[0]

    @torch.inference_mode()
    def generate_ids(self, logits: Tensor, params: SamplingParams) -> Iterator[int]:
        """Sample up to params.max_tokens ids, starting from the logits after the prompt.

        Stops at an end-of-sequence id (not yielded) or when the store is full; sets stats.stop_reason."""
        gen = sampling_generator(self.device, params.seed)
        eos = set(self.tokenizer.eos_ids)
        self.stats.stop_reason = "length"
        t0 = time.perf_counter()
        logits = logits[None]
        for _ in range(params.max_tokens):
            recent = None
            if params.repeat_penalty != 1.0 and params.repeat_last_n:
                recent = torch.tensor(self.tokens[-params.repeat_last_n:], device=self.device)[None]
            token = int(sample(logits, params, gen, recent)[0])
            if token in eos:
                self.stats.stop_reason = "eos"
                break
            yield token
            self.stats.generated_tokens += 1
            self.stats.decode_seconds = time.perf_counter() - t0
            if self.store.room() < 1:
                self.stats.stop_reason = "context"
                break
            logits = self.forward(torch.tensor([[token]], device=self.device))
            self.tokens.append(token)
        self.stats.decode_seconds = time.perf_counter() - t0

    @torch.inference_mode()
    def complete_rows(self, logits: Tensor, params: SamplingParams) -> list[str]:
        """The completions of every sequence of the store from `logits` (B, V), decoded together, each
        until an end-of-sequence id or a stop string, or max_tokens (or a full store). Sequences that
        finished keep decoding, unread, since the batch steps together. The repeat penalty sees the
        generated tokens only: the prompts live in other engines' views of the store."""
        gen = sampling_generator(self.device, params.seed)
        eos = set(self.tokenizer.eos_ids)
        streams = [TextStream(self.tokenizer, params.stop) for _ in range(logits.shape[0])]
        texts, live = [""] * len(streams), [True] * len(streams)
        recent = torch.empty(len(streams), 0, dtype=torch.long, device=self.device)
        for _ in range(params.max_tokens):
            tokens = sample(logits, params, gen, recent[:, -params.repeat_last_n:] if params.repeat_last_n else None)
            if params.repeat_penalty != 1.0:
                recent = torch.cat([recent, tokens[:, None]], 1)
            for row, token in enumerate(tokens.tolist()):
                if live[row] and token in eos:
                    live[row] = False
                elif live[row]:
                    texts[row] += streams[row].push(token)
                    live[row] = not streams[row].stopped
            if not any(live) or self.store.room() < 1:
                break
            logits = self.forward(tokens[:, None])
        return [(text + stream.flush()).strip() for text, stream in zip(texts, streams)]

    def generate(self, logits: Tensor, params: SamplingParams) -> Iterator[str]:
        """Yield text pieces of the completion; stop strings end it and are not yielded."""
        text = TextStream(self.tokenizer, params.stop)
        for token in self.generate_ids(logits, params):
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                self.stats.stop_reason = "stop"
                return
        tail = text.flush()
        if tail:
            yield tail


def sampling_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The sampler's generator: seeded, or with a fresh seed when seed is None, as llama.cpp (the
    global generator would repeat each run's output)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class TextStream:
    """Incremental detokenization with stop strings.

    Text is released only when it is complete UTF-8 (no trailing U+FFFD from a split
    multi-byte character) and no stop string could still begin inside it."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already released
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                self.stopped = True
                piece, self.emitted = text[self.emitted:at], len(text)
                return piece
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = max(self.emitted, len(text) - hold)
        piece, self.emitted = text[self.emitted:end], end
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
