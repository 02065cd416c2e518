"""The KV store seam, and the full-precision store.

A store is preallocated for `batch` sequences of up to `capacity` tokens. The model calls
`attend(layer, q, k, v, positions)` once per layer: the store keeps the new keys/values
and returns the attention of `q` over everything it holds for that layer, the new tokens
included (causally). After a forward pass the caller calls `advance(n)` so the store can
do its host-side bookkeeping (a quantized store moves full window blocks into its packed
history there). Nothing else about the cache leaks into the model.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minikv.errors import ContextFull, MinikvError


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
        self._parent: tuple[KVStore, int] | None = None  # (store, first sequence) when this is a view of rows

    per_sequence: tuple[str, ...] = ()  # attributes holding a tensor, or a list of them, whose dim 0 is the batch

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

    @abstractmethod
    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, Hkv, T, D) at the next positions as attend would, without attending (the
        caller then calls `advance(T)`): filling a long context costs O(n), not a prefill's O(n^2)."""

    def replayable(self) -> bool:
        """Whether the next decode step may replay a captured CUDA graph (minikv.cuda_graph)."""
        return self.static

    def advance(self, n: int) -> None:
        """Commit the n tokens that the last forward pass appended to every sequence."""
        self.lengths = [length + n for length in self.lengths]
        if self._parent is not None:
            parent, first = self._parent
            parent.lengths[first:first + self.batch] = self.lengths

    def rows(self, start: int, stop: int) -> "KVStore":
        """Sequences start .. stop-1 as a store of their own that shares this one's memory: a view
        whose writes and advances are this store's (e.g. to prefill one sequence of a batch)."""
        view = copy.copy(self)
        for name in self.per_sequence:
            value = getattr(self, name)
            setattr(view, name, [t[start:stop] for t in value] if isinstance(value, list) else value[start:stop])
        view.batch, view.lengths, view._parent = stop - start, self.lengths[start:stop], (self, start)
        return view

    def reset(self) -> None:
        self.lengths = [0] * self.batch

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the store occupies (its preallocated buffers, metadata included)."""

    def working_nbytes(self) -> int:
        """Bytes a compute path keeps beside the store (not part of what it holds), e.g. a
        dequantized copy that makes the CPU reference attention one SDPA call."""
        return 0

    def bytes_per_token(self) -> float:
        return self.nbytes() / self.capacity

    # Saving and restoring (sessions). Generic over subclasses: the state is every public
    # Tensor / list-of-Tensor attribute plus every public plain attribute (numbers, strings,
    # lists, dataclass settings), so a new store type is saved correctly without extra code.
    # Tensors are restored into the existing buffers, which fixes device and dtype.

    volatile = ("static",)  # how this process runs the store, not what it holds: never compared
    derived: tuple[str, ...] = ()  # tensor attributes computed from others or from settings: not saved

    def used_part(self, name: str, t: Tensor) -> Tensor:
        """The leading slice of buffer `name` that holds data (saved instead of the whole buffer)."""
        return t

    def restored(self) -> None:
        """Recompute the `derived` data that depends on loaded buffers (e.g. a dequantized mirror)."""

    def _buffers(self) -> dict[str, Tensor]:
        out = {}
        for name, value in vars(self).items():
            if name.startswith("_") or name in self.derived:
                continue
            if isinstance(value, Tensor):
                out[name] = value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(t, Tensor) for t in value):
                out.update({f"{name}.{i}": t for i, t in enumerate(value)})
        return out

    def _plain(self) -> dict[str, Any]:
        out = {}
        for name, value in vars(self).items():
            if name.startswith("_") or name in self.volatile:
                continue
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            try:  # as it will read back from a file: tuples become lists
                out[name] = json.loads(json.dumps(value))
            except (TypeError, ValueError):
                pass  # not plain data (a dtype, a device, a callable)
        return out

    def state_dict(self) -> dict[str, Any]:
        """{"kind", "layout": {name: [full shape, dtype]}, "tensors": {name: used part}, "attrs": {...}}."""
        buffers = self._buffers()
        return {
            "kind": type(self).__name__,
            "layout": {n: [list(t.shape), str(t.dtype)] for n, t in buffers.items()},
            "tensors": {n: self.used_part(n.split(".")[0], t) for n, t in buffers.items()},
            "attrs": self._plain(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` of a store built with the same settings; else MinikvError.

        Buffers must have the same shapes (floating ones may differ in dtype: they are cast);
        plain settings must be equal; counters (ints, lists of ints) are taken from `state`."""
        mine = self.state_dict()
        if state["kind"] != mine["kind"]:
            raise MinikvError(f"it holds a {state['kind']} cache, this one is a {mine['kind']}")
        if set(state["layout"]) != set(mine["layout"]):
            raise MinikvError(f"its cache buffers are {sorted(state['layout'])}, this one's {sorted(mine['layout'])}")
        for name, (shape, dtype) in mine["layout"].items():
            theirs = state["layout"][name]
            if theirs[0] != shape or theirs[1] != dtype and not _both_float(theirs[1], dtype):
                raise MinikvError(f"its cache buffer {name} is {theirs}, this one is {[shape, dtype]}")
        counters = {n for n, v in mine["attrs"].items() if _is_counter(v)}
        for name, value in mine["attrs"].items():
            if name not in state["attrs"] or name not in counters and state["attrs"][name] != value:
                raise MinikvError(f"its cache setting {_difference(name, state['attrs'].get(name), value)}")
        buffers = self._buffers()
        for name, t in state["tensors"].items():
            buffers[name][tuple(slice(0, n) for n in t.shape)].copy_(t)
        for name in counters:
            setattr(self, name, state["attrs"][name])
        self.restored()


def _difference(name: str, theirs: Any, mine: Any) -> str:
    """'NAME is THEIRS, this one is MINE', narrowed to the first field that differs when both are
    dicts (a store's KVSettings), so that the message names e.g. `settings.prerope`."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        for key in sorted(theirs.keys() | mine.keys()):
            if theirs.get(key) != mine.get(key):
                return _difference(f"{name}.{key}", theirs.get(key), mine.get(key))
    return f"{name} is {theirs!r}, this one is {mine!r}"


def _both_float(a: str, b: str) -> bool:
    return all(getattr(torch, d.removeprefix("torch.")).is_floating_point for d in (a, b))


def _is_counter(value: Any) -> bool:
    """Host-side counters (ints, lists of ints) change as tokens arrive; other attributes are settings."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return is_int(value) or isinstance(value, list) and all(is_int(v) for v in value)


class FullPrecisionStore(KVStore):
    """Keys and values kept in the model's dtype, slot = position (gpt-fast's static cache)."""

    derived = ("slot_positions",)
    per_sequence = ("k", "v")

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

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        T = k.shape[2]
        for b, start in enumerate(self.lengths):
            self.k[layer][b, :, start:start + T], self.v[layer][b, :, start:start + T] = k[b], v[b]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def used_part(self, name: str, t: Tensor) -> Tensor:
        return t[:, :, :self.length] if name in ("k", "v") else t
