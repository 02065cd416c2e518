"""Plain-PyTorch twins of the Triton kernels: the same functions, written for reading.

They run anywhere (CPU, fp32) and are what the kernels are tested against; the store uses them
wherever the kernels cannot run. Layout and argument meanings: kernels.layout.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.layout import HiRows, History, PreRope, Spec
from minikv.model import apply_rope
from minikv.quant import dequantize_channels, dequantize_tokens, heaviest, quantize_channels, quantize_tokens


def dequantize_history(hist: History, spec: Spec, rope: PreRope | None = None, key_matrix: Tensor | None = None,
                       hi: HiRows | None = None, n_hist: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keys and values (B, Hkv, C_h, D) in fp32, with the high-precision rows `hi` of the
    first n_hist (B,) rows in place of their low-bit ones; keys optionally mapped by a per-head
    matrix (full_key_matrix) and then given RoPE at their positions (pre-RoPE storage)."""
    d = spec.head_dim
    if spec.k_per_channel:
        k = dequantize_channels(hist.k, hist.k_scale, hist.k_zero, spec.k_bits, d)
    else:
        k = dequantize_tokens(hist.k, hist.k_scale, hist.k_zero, spec.k_bits, d)
    v = dequantize_tokens(hist.v, hist.v_scale, hist.v_zero, spec.v_bits, d)
    if hi is not None:
        k, v = (_replace_rows(x, dequantize_tokens(codes, scale, zero, spec.hi_bits, d), hi.idx, n_hist, spec)
                for x, codes, scale, zero in ((k, hi.rows.k, hi.rows.k_scale, hi.rows.k_zero),
                                              (v, hi.rows.v, hi.rows.v_scale, hi.rows.v_zero)))
    if key_matrix is not None:
        k = k @ full_key_matrix(key_matrix).float()[None]
    if rope is not None:
        pos = (rope.pos0[:, None] + torch.arange(k.shape[2], device=k.device)).clamp(max=rope.cos.shape[0] - 1)
        k = apply_rope(k, rope.cos[pos][:, None].float(), rope.sin[pos][:, None].float())
    return k, v


def full_key_matrix(m: Tensor) -> Tensor:
    """A pre-RoPE key matrix as kernels.layout allows it, per head (Hkv, D, D) as it is, or the block
    A (D/2, D/2) of a Walsh-Hadamard matrix, as the (D, D) matrix [[A, A], [A, -A]]."""
    return m if m.dim() == 3 else torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)


def _replace_rows(x: Tensor, rows: Tensor, idx: Tensor, n_hist: Tensor, spec: Spec) -> Tensor:
    """x (B, Hkv, C_h, D) with rows (B, Hkv, n, D) written at history rows idx; rows of blocks
    past n_hist go to a scratch row that is then dropped (their idx is stale)."""
    filled = torch.arange(idx.shape[2], device=idx.device) < (n_hist // spec.block * spec.hi_rows)[:, None, None]
    dest = torch.where(filled, idx.long(), x.shape[2])[..., None].expand_as(rows)
    return torch.cat([x, x[:, :, :1]], 2).scatter(2, dest, rows)[:, :, :-1]


def quantize_hi_rows(k: Tensor, v: Tensor, mass: Tensor, spec: Spec, row0: int = 0) -> HiRows:
    """MiKV's rows of whole blocks of stored-space tokens k, v (B, Hkv, n, D) with attention mass
    (B, Hkv, n): of each block the spec.hi_rows heaviest (minikv.quant.heaviest), as per-token
    hi_bits codes, and the history rows they replace (the block's first row is row0)."""
    local = heaviest(mass, spec.hi_rows, spec.block)
    idx = local[..., None].expand(-1, -1, -1, spec.head_dim)
    kq = quantize_tokens(k.gather(2, idx), spec.hi_bits, spec.k_group)
    vq = quantize_tokens(v.gather(2, idx), spec.hi_bits, spec.v_group)
    return HiRows(History(kq[0], vq[0], kq[1], kq[2], vq[1], vq[2]), (local + row0).to(torch.int32))


def window_valid(lengths: Tensor, n_hist: Tensor, n_sink: int, ring: int) -> Tensor:
    """(B, R) bool: ring slots holding positions n_sink + n_hist .. length-1 (slot = (pos - n_sink) % R)."""
    slots = torch.arange(ring, device=lengths.device)
    return (slots - n_hist[:, None] % ring) % ring < (lengths - n_sink - n_hist)[:, None]


def prefill_attention(q: Tensor, k_new: Tensor, v_new: Tensor, sink_k: Tensor, sink_v: Tensor, lengths: Tensor,
                      hist: History, spec: Spec, n_hist: Tensor, win_k: Tensor, win_v: Tensor, *,
                      q_hist: Tensor | None = None, rope: PreRope | None = None, key_matrix: Tensor | None = None,
                      value_matrix: Tensor | None = None, scale: float | None = None,
                      mass: Tensor | None = None, hi: HiRows | None = None) -> Tensor:
    """T new tokens per sequence attend over what the store holds, then over themselves causally.

    q (B, Hq, T, D) meets the sinks (B, Hkv, n_sink, D), valid below `lengths` (B,: tokens held
    before the chunk), the ring (B, Hkv, R, D), whose valid slots hold positions
    n_sink + n_hist .. lengths-1, and the chunk's own keys and values k_new, v_new (B, Hkv, T, D).
    History rows below n_hist (B,) are in stored space: `q_hist` (default q) meets their keys after
    `key_matrix` (Hkv, D, D: k @ M, before RoPE) and `rope`; their values are mapped back by
    `value_matrix` (D, D: o @ M) once summed; `hi` (MiKV) replaces some of them. If `mass`
    (B, Hkv, R + T) is given, the probability of each ring slot and then of each new token, summed
    over queries and the query heads of its group, is added to it (MiKV's importance).
    Returns (B, Hq, T, D) in q's dtype."""
    B, Hq, T, D = q.shape
    Hkv, n_sink, R = sink_k.shape[1], sink_k.shape[2], win_k.shape[2]
    k_h, v_h = dequantize_history(hist, spec, rope, key_matrix, hi, n_hist)
    cap, dev = k_h.shape[2], q.device
    held = torch.cat([torch.arange(n_sink, device=dev) < lengths[:, None],
                      torch.arange(cap, device=dev) < n_hist[:, None],
                      window_valid(lengths, n_hist, n_sink, R)], dim=1)[:, None, :, None]  # (B, 1, S, 1)
    # empty rows may hold anything, NaN too
    keys = torch.cat([sink_k.float(), k_h, win_k.float(), k_new.float()], dim=2)
    values = torch.cat([sink_v.float(), v_h, win_v.float(), v_new.float()], dim=2)
    n_new = k_new.shape[2]  # T, or 0 when the store already holds the queries' tokens (decode)
    valid = torch.cat([held, held.new_ones(B, 1, n_new, 1)], dim=2)
    keys, values = keys.masked_fill(~valid, 0.0), values.masked_fill(~valid, 0.0)
    qg = q.float().view(B, Hkv, Hq // Hkv, T, D)
    qh = qg if q_hist is None else q_hist.float().view(B, Hkv, Hq // Hkv, T, D)
    h = slice(n_sink, n_sink + cap)  # history columns
    scores = qg @ keys[:, :, None].mT
    scores[..., h] = qh @ keys[:, :, None, h].mT
    causal = torch.ones(T, n_new, dtype=torch.bool, device=dev).tril()
    visible = torch.cat([held[:, :, None, None, :, 0].expand(B, 1, 1, T, -1), causal.expand(B, 1, 1, T, n_new)], -1)
    p = (scores * (scale or 1 / math.sqrt(D))).masked_fill(~visible, float("-inf")).softmax(-1)
    if mass is not None:
        mass += p[..., n_sink + cap:].sum((2, 3))
    hist_out = p[..., h] @ values[:, :, None, h]
    if value_matrix is not None:
        hist_out = hist_out @ value_matrix.float()
    p[..., h] = 0.0
    return (p @ values[:, :, None] + hist_out).reshape(B, Hq, T, D).to(q.dtype)


def decode_attention(q: Tensor, sink_k: Tensor, sink_v: Tensor, lengths: Tensor, hist: History, spec: Spec,
                     n_hist: Tensor, win_k: Tensor, win_v: Tensor, *, q_hist: Tensor | None = None,
                     rope: PreRope | None = None, key_matrix: Tensor | None = None,
                     value_matrix: Tensor | None = None, scale: float | None = None,
                     mass: Tensor | None = None, hi: HiRows | None = None) -> Tensor:
    """One query token per sequence, q (B, Hq, D), that the store already holds: `lengths`
    counts it and its key and value sit in their sink or ring slot; `mass` is (B, Hkv, R), and the
    new token's ring slot, which held an older token, starts from zero. Otherwise as prefill_attention."""
    B, Hkv, D = q.shape[0], sink_k.shape[1], q.shape[-1]
    if mass is not None:
        R, n_sink = win_k.shape[2], sink_k.shape[2]
        slot = torch.arange(R, device=q.device) == ((lengths - 1 - n_sink) % R)[:, None]
        mass.masked_fill_((slot & (lengths > n_sink)[:, None])[:, None], 0.0)
    none = q.new_zeros(B, Hkv, 0, D)
    return prefill_attention(q[:, :, None], none, none, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v,
                             q_hist=None if q_hist is None else q_hist[:, :, None], rope=rope,
                             key_matrix=key_matrix, value_matrix=value_matrix, scale=scale, mass=mass, hi=hi)[:, :, 0]


def quantize_block(k: Tensor, v: Tensor, spec: Spec, clip_k: float = 1.0, clip_v: float = 1.0) -> History:
    """Quantize and pack G tokens (B, Hkv, G, D) of keys and values into history rows."""
    if spec.k_per_channel:
        kq = quantize_channels(k, spec.k_bits, spec.block, clip_k)
    else:
        kq = quantize_tokens(k, spec.k_bits, spec.k_group, clip_k)
    vq = quantize_tokens(v, spec.v_bits, spec.v_group, clip_v)
    return History(kq[0], vq[0], kq[1], kq[2], vq[1], vq[2])
