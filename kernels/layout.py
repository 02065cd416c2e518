"""The packed KV-history layout that the kernels read, as a static spec plus a bundle of tensors.

Per layer, every tensor has leading dims (B, Hkv). History token i of a sequence sits in row i:
  k, v                  uint8 codes packed along D: (B, Hkv, C_h, D*bits/8). For bits in {1, 2, 4, 8}
                        byte j holds channels j*(8/bits) .. +8/bits-1, low bits first; 3 bits are a
                        2-bit plane (D/4 bytes, low bits) followed by a 1-bit plane (D/8 bytes, high bit).
  k_scale, k_zero       fp16; keys per channel: (B, Hkv, C_h/G, D), one row per block of G tokens;
                        keys per token: (B, Hkv, C_h, D/k_group).
  v_scale, v_zero       fp16, values per token: (B, Hkv, C_h, D/v_group).
MiKV's high-precision rows (HiRows): of every block of G history rows, `hi_rows` tokens also have
per-token hi_bits codes, which replace their low-bit key and value; n = C_h/G * hi_rows rows,
held as a History (keys per token) and an index:
  rows.k, rows.v        uint8 (B, Hkv, n, D*hi_bits/8), packed as above
  rows.k_scale, k_zero  fp16 (B, Hkv, n, D/k_group); rows.v_scale, v_zero fp16 (B, Hkv, n, D/v_group)
  idx                   int32 (B, Hkv, n): the history row each replaces, rows j*hi_rows.. within block j.
A value is code * scale + zero. Channel permutations and Hadamard rotations are folded into q (and the
output) by the caller, so nothing here ever un-permutes or un-rotates the cache. The exception is keys
stored before RoPE, which must be mapped back before it, tile by tile: through a key matrix per head,
(Hkv, D, D), or, for the normalized Walsh-Hadamard matrix H of D (built as [[A, A], [A, -A]] with
A = H_{D/2} / sqrt(2)), through A alone, (D/2, D/2), as two half-size products (half the work).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from minikv.errors import MinikvError

BITS = (1, 2, 3, 4, 8)


@dataclass(frozen=True)
class Spec:
    """Static facts about one layer's history; each distinct Spec compiles its own kernel variant."""

    head_dim: int
    k_bits: int
    v_bits: int
    k_per_channel: bool  # KIVI: one scale per channel per block of `block` tokens; else per token
    block: int  # G: tokens per key block and per move from the window into the history
    k_group: int  # channels per scale for per-token keys
    v_group: int  # channels per scale for values (always per token)
    hi_bits: int = 0  # MiKV: width of the high-precision rows (HiRows)
    hi_rows: int = 0  # MiKV: high-precision rows per block of `block` tokens; 0 without them

    def __post_init__(self) -> None:
        d = self.head_dim
        if d & (d - 1) or d < 16:
            raise MinikvError(f"head_dim {d} must be a power of two >= 16")
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) not in BITS:
                raise MinikvError(f"{name} must be one of {BITS}")
        for name in ("block", "k_group", "v_group"):
            g = getattr(self, name)
            if g < 1 or g & (g - 1):
                raise MinikvError(f"{name} {g} must be a power of two")
        if d % self.k_group or d % self.v_group:
            raise MinikvError("channel groups must divide head_dim")
        if self.hi_rows and (self.hi_bits not in BITS or self.hi_rows >= self.block):
            raise MinikvError(f"high-precision rows need bits in {BITS} and fewer rows than a block")

    def packed_bytes(self, bits: int) -> int:
        return self.head_dim * bits // 8


class History(NamedTuple):
    """One layer's packed history (shapes in the module docstring)."""

    k: Tensor
    v: Tensor
    k_scale: Tensor
    k_zero: Tensor
    v_scale: Tensor
    v_zero: Tensor


class HiRows(NamedTuple):
    """MiKV's high-precision rows of one layer (shapes in the module docstring): per-token codes
    laid out like a history's, and the history row each replaces."""

    rows: History
    idx: Tensor


class PreRope(NamedTuple):
    """RoPE for history keys stored before it: rotate-half tables (n_pos, D) as built by
    minikv.model.rope_tables, and the position of history row 0 of each sequence, pos0 (B,)."""

    cos: Tensor
    sin: Tensor
    pos0: Tensor
