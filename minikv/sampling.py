"""Token sampling on the device: temperature, top-k, top-p, min-p, repetition penalty.

No host sync: the draw is argmax(p / Exp(1)) (an exact sample from p) rather than
`torch.multinomial`, so the decode step can run inside a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """The knobs llama.cpp users know, with its defaults."""

    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        from minikv.errors import MinikvError

        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top-k must be >= 0"),
            (0 < self.top_p <= 1, "top-p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min-p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat-penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat-last-n must be >= 0"),
            (self.max_tokens >= 0, "the number of tokens to generate (-n) must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise MinikvError(message)


def apply_repeat_penalty(logits: Tensor, recent: Tensor, penalty: float) -> Tensor:
    """llama.cpp/CTRL penalty: positive logits of recent tokens divided, negative multiplied."""
    picked = logits.gather(-1, recent)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, recent, picked)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           recent: Tensor | None = None) -> Tensor:
    """logits (B, V) fp32 -> next tokens (B,). `recent` (B, n) holds token ids to penalise."""
    if recent is not None and params.repeat_penalty != 1.0 and recent.numel():
        logits = apply_repeat_penalty(logits, recent, params.repeat_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)
