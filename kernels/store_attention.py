"""The bridge between minikv.qstore.QuantizedStore and the kernels: attention of one layer's new
tokens (decode or a prefill chunk), and moving full blocks from the window into the history.

The store keeps history keys in a stored space (pre-RoPE, Hadamard-rotated, channel-permuted, each
optional). Post-RoPE keys fold all of that into the query once; pre-RoPE keys hand the kernel a
per-head matrix back to pre-RoPE attention space, applied in registers before RoPE. Rotated values
are mapped back once, on the summed output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.decode_attention import decode_attention
from kernels.layout import History, PreRope, Spec
from kernels.prefill_attention import prefill_attention
from kernels.quantize_pack import quantize_pack


def supported(store, layer: int) -> bool:
    """Whether the kernels cover this layer's settings, else the store's reference path runs:
    not MiKV's high-precision rows, unquantized (16-bit) history, sliding-window models, or head
    dims that are not a power of two >= 32 (tensor-core tiles need halves of >= 16 channels)."""
    plan = store.plans[layer]
    D = store.head_dim
    return (store.n_hi == 0 and store.sliding_window is None and 16 not in (plan.bits_k, plan.bits_v)
            and D >= 32 and D & (D - 1) == 0)


def spec(store, layer: int) -> Spec:
    s, plan = store.settings, store.plans[layer]
    return Spec(store.head_dim, plan.bits_k, plan.bits_v, s.key_axis == "channel", s.group, s.group_k, s.group_v)


def _history(store, layer: int) -> History:
    return History(store.hist_k[layer], store.hist_v[layer], store.k_scale[layer], store.k_zero[layer],
                   store.v_scale[layer], store.v_zero[layer])


def _query_to_stored(store, layer: int, q: Tensor) -> Tensor:
    """q (B, Hq, T, D) -> the query that meets post-RoPE stored keys: perm(q @ Hd), per KV head."""
    B, Hq, T, D = q.shape
    H = store.n_kv_heads
    x = q.float().view(B, H, Hq // H, T, D)
    if store.settings.rotate_k:
        x = x @ store.hadamard
    perm = store.perms[layer]
    if perm is not None:
        x = x.gather(-1, perm[None, :, None, None].expand_as(x))
    return x.view(B, Hq, T, D).to(q.dtype).contiguous()


def _permutation_matrices(perm: Tensor) -> Tensor:
    """(H, D) permutations -> (H, D, D) matrices P with x @ P = x[..., perm]."""
    return torch.eye(perm.shape[-1], device=perm.device)[:, perm].permute(1, 0, 2)


def _stored_to_prerope(store, layer: int) -> Tensor | None:
    """(H, D, D) matrices M with unperm(x) @ Hd = x @ M, or None when stored keys need neither."""
    inv = store.inv_perms[layer]
    if inv is None and not store.settings.rotate_k:
        return None
    m = torch.eye(store.head_dim, device=store.device).expand(store.n_kv_heads, -1, -1)
    if inv is not None:
        m = _permutation_matrices(inv)
    if store.settings.rotate_k:
        m = m @ store.hadamard
    return m.contiguous()


def _prerope_to_stored(store, layer: int) -> Tensor | None:
    """(H, D, D) matrices with perm(x @ Hd) = x @ M: what moves a key into stored space after RoPE
    is undone; None when that is the identity."""
    perm = store.perms[layer]
    if perm is None and not store.settings.rotate_k:
        return None
    m = torch.eye(store.head_dim, device=store.device).expand(store.n_kv_heads, -1, -1)
    if store.settings.rotate_k:
        m = m @ store.hadamard
    if perm is not None:
        m = m @ _permutation_matrices(perm)
    return m.contiguous()


def attend(store, layer: int, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Attention of T new tokens per sequence (q (B, Hq, T, D), k, v (B, H, T, D) at positions
    start..) over what the store holds plus, causally, themselves. A single token is written into
    its sink or ring slot first (the ring always has a free slot for it) and read from there; the
    store's append, which the caller runs next, writes it again and moves full blocks."""
    B, T = q.shape[0], q.shape[2]
    s = store.settings
    n_hist = store.n_hist(start)
    full = lambda n: torch.full((B,), n, device=q.device, dtype=torch.int32)  # noqa: E731
    kw = {}
    if s.prerope:
        kw["rope"] = PreRope(store.rope_cos, store.rope_sin, full(store.hist_pos0))
        kw["key_matrix"] = _stored_to_prerope(store, layer)
    elif s.rotate_k or store.perms[layer] is not None:
        kw["q_hist"] = _query_to_stored(store, layer, q)
    if s.rotate_v:
        kw["value_matrix"] = store.hadamard
    held = (store.sink_k[layer], store.sink_v[layer])
    ring = (store.win_k[layer], store.win_v[layer])
    if T > 1:
        return prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), *held, full(start),
                                 _history(store, layer), spec(store, layer), full(n_hist), *ring, **kw)
    if start < store.n_sink:
        store.sink_k[layer][:, :, start], store.sink_v[layer][:, :, start] = k[:, :, 0], v[:, :, 0]
    else:
        slot = (start - store.n_sink) % store.ring
        store.win_k[layer][:, :, slot], store.win_v[layer][:, :, slot] = k[:, :, 0], v[:, :, 0]
    if "q_hist" in kw:
        kw["q_hist"] = kw["q_hist"][:, :, 0]
    return decode_attention(q[:, :, 0].contiguous(), *held, full(start + 1), _history(store, layer),
                            spec(store, layer), full(n_hist), *ring, n_tokens_hint=n_hist, **kw)[:, :, None]


def flush(store, layer: int, k: Tensor, v: Tensor, a: int, b: int) -> None:
    """Quantize attention-space keys and values (B, H, b-a, D) of positions hist_pos0+a.. into
    history rows a..b-1, in one launch (the store's _write, fused)."""
    s, plan = store.settings, store.plans[layer]
    B = k.shape[0]
    kw = {}
    if s.prerope:
        kw["rope"] = PreRope(store.rope_cos, store.rope_sin,
                             torch.full((B,), store.hist_pos0, device=k.device, dtype=torch.int32))
    kw["key_matrix"] = _prerope_to_stored(store, layer)
    if s.rotate_v:
        kw["value_matrix"] = store.hadamard
    quantize_pack(k.contiguous(), v.contiguous(), 0, b - a, _history(store, layer), a, spec(store, layer),
                  plan.clip_k, plan.clip_v, **kw)
