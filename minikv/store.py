"""The KV store seam, and the full-precision store.

A store is preallocated for `batch` sequences of up to `capacity` tokens. The model calls
`attend(layer, q, k, v, positions)` once per layer: the store keeps the new keys/values
and returns the attention of `q` over everything it holds for that layer, the new tokens
included (causally). After a forward pass the caller calls `advance(n)` so the store can
do its host-side bookkeeping (a quantized store moves full window blocks into its packed
history there). Nothing else about the cache leaks into the model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from minikv.errors import ContextFull


def causal_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """(B, 1, T, S) bool: key at position k_pos[.., s] is visible to the query at q_pos[b, t].

    k_pos is (S,) or (B, S); negative key positions mark empty slots."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[None, None, None, :] if k_pos.dim() == 1 else k_pos[:, None, None, :]
    mask = (kp <= qp) & (kp >= 0)
    if window is not None:
        mask &= qp - kp < window
    return mask


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax attention with grouped KV heads: q (B, Hq, T, D); k, v (B, Hkv, S, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class KVStore(ABC):
    """What the model sees of a KV cache."""

    def __init__(self, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                 window: int | None, dtype: torch.dtype, device: torch.device | str) -> None:
        self.n_layers, self.batch, self.capacity = n_layers, batch, capacity
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.sliding_window = window  # the model's attention window (Mistral), not the store's ring
        self.dtype, self.device = dtype, torch.device(device)
        self.lengths = [0] * batch  # tokens held per sequence (host side, no device sync needed)

    @property
    def length(self) -> int:
        return max(self.lengths)

    @property
    def max_position(self) -> int:
        """One past the largest position a token in this store can have (sizes the RoPE tables)."""
        return self.capacity

    def room(self) -> int:
        """How many more tokens every sequence can take."""
        return self.capacity - self.length

    def positions(self, n: int) -> Tensor:
        """Positions (B, n) of the next n tokens of every sequence."""
        if n > self.room():
            raise ContextFull(f"{n} new tokens do not fit: {self.length} of {self.capacity} context tokens used")
        start = torch.tensor(self.lengths, device=self.device)[:, None]
        return start + torch.arange(n, device=self.device)

    @abstractmethod
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store k, v (B, Hkv, T, D) at `positions` (B, T); return attention of q (B, Hq, T, D)."""

    def advance(self, n: int) -> None:
        """Commit the n tokens that the last forward pass appended to every sequence."""
        self.lengths = [length + n for length in self.lengths]

    def reset(self) -> None:
        self.lengths = [0] * self.batch

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the store occupies (its preallocated buffers, metadata included)."""

    def bytes_per_token(self) -> float:
        return self.nbytes() / self.capacity


class FullPrecisionStore(KVStore):
    """Keys and values kept in the model's dtype, slot = position (gpt-fast's static cache)."""

    def __init__(self, *args, static: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        shape = (self.batch, self.n_kv_heads, self.capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        # static: attend over the whole capacity under a mask, so shapes never change (CUDA graphs).
        self.static = static
        self.slot_positions = torch.arange(self.capacity, device=self.device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        B, T = positions.shape
        if B == 1:
            self.k[layer][0].index_copy_(1, positions[0], k[0])
            self.v[layer][0].index_copy_(1, positions[0], v[0])
        else:
            rows = torch.arange(B, device=self.device)[:, None].expand(B, T)
            self.k[layer][rows, :, positions] = k.transpose(1, 2)
            self.v[layer][rows, :, positions] = v.transpose(1, 2)
        if self.static:
            n = self.capacity
        else:
            n = self.length + T
        keys, values = self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        single_decode = T == 1 and B == 1 and not self.static and self.sliding_window is None
        mask = None if single_decode else causal_mask(positions, self.slot_positions[:n], self.sliding_window)
        return reference_attention(q, keys, values, mask)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
