"""The bridge between minikv.qstore.QuantizedStore and the kernels: attention of one layer's new
tokens (a decode step, or a chunk), and moving full blocks from the window into the history.

The store keeps history keys in a stored space (pre-RoPE, Hadamard-rotated, channel-permuted, each
optional). Post-RoPE keys fold all of that into the query once; pre-RoPE keys hand the kernel a
per-head matrix back to pre-RoPE attention space, applied in registers before RoPE. Rotated values
are mapped back once, on the summed output. Those matrices are computed once per layer and kept on
the store, so a decode step allocates nothing but the kernels' outputs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from kernels.decode_attention import decode_attention
from kernels.layout import HiRows, History, PreRope, Spec
from kernels.prefill_attention import prefill_attention
from kernels.quantize_pack import quantize_pack
from minikv.quant import hadamard_block

T = TypeVar("T")


def supported(store, layer: int) -> bool:
    """Whether the kernels cover this layer's settings, else the store's reference path runs:
    not unquantized (16-bit) history, sliding-window models, head dims that are not a power of
    two >= 32 (tensor-core tiles need halves of >= 16 channels), or MiKV rows for only one of keys
    and values (a row replaces both or neither)."""
    plan = store.plans[layer]
    D = store.head_dim
    return (store.sliding_window is None and 16 not in (plan.bits_k, plan.bits_v) and D >= 32 and D & (D - 1) == 0
            and store._hi(plan.bits_k) == store._hi(plan.bits_v))


def spec(store, layer: int) -> Spec:
    """The layer's static layout (with MiKV's rows where it has them), made once per store."""
    def make() -> Spec:
        s, plan, hi = store.settings, store.plans[layer], store.mikv_layer(layer)
        return Spec(store.head_dim, plan.bits_k, plan.bits_v, s.key_axis == "channel", s.group, s.group_k,
                    s.group_v, store.hi_bits if hi else 0, store.n_hi if hi else 0)

    return _cached(store, ("spec", layer), make)


def _take(t: Tensor, rows: slice | None) -> Tensor:
    """The sequences `rows` of t (a view: the batch is the leading dim), or t itself for None: block
    moves are host work, and making 16 views per layer took 1.9 ms of a 5.4 ms MiKV move at
    Llama-2-7B on an H100."""
    return t if rows is None else t[rows]


def _history(store, layer: int, rows: slice | None = None) -> History:
    """One layer's packed history, of the sequences `rows` (default all)."""
    return History(*(_take(t[layer], rows) for t in (store.hist_k, store.hist_v, store.k_scale, store.k_zero,
                                                     store.v_scale, store.v_zero)))


def _hi_rows(store, layer: int, rows: slice | None = None) -> HiRows | None:
    """One layer's MiKV rows, of the sequences `rows` (default all), if it has them."""
    if not store.mikv_layer(layer):
        return None
    return HiRows(History(*(_take(t[layer], rows) for t in (store.hi_k, store.hi_v, store.hk_scale, store.hk_zero,
                                                            store.hv_scale, store.hv_zero))),
                  _take(store.hi_idx[layer], rows))


def _cached(store, key: tuple, make: Callable[[], T]) -> T:
    """A per-layer constant (a Spec, a key matrix), made once per store: not again at every step."""
    if key not in store._kernel_constants:
        store._kernel_constants[key] = make()
    return store._kernel_constants[key]


def _permutation_matrices(perm: Tensor) -> Tensor:
    """(H, D) permutations -> (H, D, D) matrices P with x @ P = x[..., perm]."""
    return torch.eye(perm.shape[-1], device=perm.device)[:, perm].permute(1, 0, 2)


def _to_stored(store, layer: int) -> Tensor | None:
    """(H, D, D) fp32 matrices M with perm(x @ Hd) = x @ M: what moves an attention-space key
    (pre-RoPE for pre-RoPE keys) into stored space; None when that is the identity. M is
    orthogonal (a Hadamard rotation, a permutation), so M^T maps stored keys back."""
    def make() -> Tensor | None:
        perm = store.perms[layer]
        if perm is None and not store.settings.rotate_k:
            return None
        m = torch.eye(store.head_dim, device=store.device).expand(store.n_kv_heads, -1, -1)
        if store.settings.rotate_k:
            m = m @ store.hadamard
        if perm is not None:
            m = m @ _permutation_matrices(perm)
        return m.contiguous()

    return _cached(store, ("to_stored", layer), make)


def _query_to_stored(store, layer: int, q: Tensor) -> Tensor:
    """q (B, Hq, T, D) -> the query that meets post-RoPE stored keys, q @ M per KV head: one
    matrix product with a per-layer constant in the model's dtype."""
    B, Hq, T, D = q.shape
    m = _cached(store, ("q_to_stored", layer), lambda: _to_stored(store, layer).to(q.dtype))
    return (q.reshape(B, store.n_kv_heads, -1, D) @ m).view(B, Hq, T, D)


def _kwargs(store, layer: int, q: Tensor) -> dict:
    """The attention kernels' keyword arguments that fold the stored space away."""
    s = store.settings
    kw = {}
    if s.prerope:
        kw["rope"] = PreRope(store.rope_cos, store.rope_sin, store.pos0)
        if s.rotate_k and store.perms[layer] is None:  # H alone, symmetric: its block (kernels.layout)
            kw["key_matrix"] = _cached(store, ("hadamard_block",), lambda: hadamard_block(store.head_dim, store.device))
        elif store.perms[layer] is not None:  # a permutation, rotated or not
            kw["key_matrix"] = _cached(store, ("to_prerope", layer), lambda: _to_stored(store, layer).mT.contiguous())
    elif s.rotate_k or store.perms[layer] is not None:
        kw["q_hist"] = _query_to_stored(store, layer, q)
    if s.rotate_v:
        kw["value_matrix"] = store.hadamard
    return kw


def attend(store, layer: int, q: Tensor, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor | None]:
    """Attention of a chunk of T new tokens per sequence (q (B, Hq, T, D), k, v (B, H, T, D) at
    positions start.., the same for every sequence) over what the store holds plus, causally,
    themselves; the store's append writes them next. With MiKV rows the ring's attention mass is
    added to the store's and the new tokens' (B, H, T) is returned beside the output."""
    B, T = q.shape[0], q.shape[2]
    full = lambda n: torch.full((B,), n, device=q.device, dtype=torch.int32)  # noqa: E731
    hi = _hi_rows(store, layer)
    mass = None if hi is None else torch.zeros(B, store.n_kv_heads, store.ring + T, device=q.device)
    out = prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), store.sink_k[layer], store.sink_v[layer],
                            full(start), _history(store, layer), spec(store, layer), full(store.n_hist(start)),
                            store.win_k[layer], store.win_v[layer], mass=mass, hi=hi, **_kwargs(store, layer, q))
    if mass is None:
        return out, None
    store.win_mass[layer] += mass[:, :, :store.ring]
    return out, mass[:, :, store.ring:]


def decode(store, layer: int, q: Tensor) -> Tensor:
    """Attention of one new token per sequence, q (B, Hq, 1, D), already written into its ring slot,
    over what the store holds; with MiKV rows it adds the ring's attention mass to the store's.
    Fill levels come from the device (store.step_lengths, step_n_hist), so the launch fits any
    lengths, per sequence, and a CUDA graph can replay it; the split count follows the history's
    capacity, not its fill."""
    kw = _kwargs(store, layer, q)
    if "q_hist" in kw:
        kw["q_hist"] = kw["q_hist"][:, :, 0]
    hi = _hi_rows(store, layer)
    return decode_attention(q[:, :, 0].contiguous(), store.sink_k[layer], store.sink_v[layer], store.step_lengths,
                            _history(store, layer), spec(store, layer), store.step_n_hist, store.win_k[layer],
                            store.win_v[layer], mass=None if hi is None else store.win_mass[layer], hi=hi,
                            **kw)[:, :, None]


def flush(store, layer: int, k: Tensor, v: Tensor, a: int, b: int, src0: int = 0, rows: slice | None = None,
          mass: Tensor | None = None) -> None:
    """Quantize attention-space keys and values of positions hist_pos0+a.. into history rows a..b-1
    of the sequences `rows` (default all), in one launch (the store's _write and _write_important,
    fused): b-a rows of k, v (B, H, S, D) from row src0 on, wrapping modulo S (so straight from the
    ring); in a MiKV layer, `mass` (B, H, S) picks each block's high-precision rows. k, v and mass
    hold every sequence; `rows` selects from them as from the store."""
    s, plan = store.settings, store.plans[layer]
    kw = {}
    if s.prerope:
        kw["rope"] = PreRope(store.rope_cos, store.rope_sin, _take(store.pos0, rows))
    kw["key_matrix"] = _to_stored(store, layer)
    if s.rotate_v:
        kw["value_matrix"] = store.hadamard
    quantize_pack(_take(k, rows).contiguous(), _take(v, rows).contiguous(), src0, b - a, _history(store, layer, rows),
                  a, spec(store, layer), plan.clip_k, plan.clip_v, hi=_hi_rows(store, layer, rows),
                  mass=None if mass is None else _take(mass, rows).contiguous(), **kw)
