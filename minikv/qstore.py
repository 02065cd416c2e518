"""The quantized KV store: full-precision sinks and recent window, packed low-bit history.

Layout, per layer l (B sequences, H KV heads, head dim D, G = settings.group, W = window,
C = history capacity in tokens, a multiple of G). The Triton kernels read these directly.

  sink_k[l], sink_v[l]  (B, H, n_sink, D) model dtype  positions 0 .. n_sink-1
  win_k[l], win_v[l]    (B, H, R, D) model dtype       ring, R = W + G: the token at position p
                                                       sits in slot (p - n_sink) % R
  hist_k[l]             (B, H, C, D*bk/8) uint8        codes packed along D (minikv.quant.pack);
  hist_v[l]             (B, H, C, D*bv/8) uint8        with bits 16: (B, H, C, D) model dtype, raw
  k_scale[l], k_zero[l] fp16; key_axis "channel": (B, H, C/G, D), per channel per G-token block;
                              key_axis "token":   (B, H, C, D/gk), gk consecutive channels
  v_scale[l], v_zero[l] fp16 (B, H, C, D/gv)
  dequantized value = code * scale + zero (empty (0,) tensors where bits are 16)

History slot i holds the token at position hist_pos0 + i, hist_pos0 = n_sink. With n tokens
held, the history holds n_hist(n) = G * max(0, (n - n_sink - W) // G) tokens and the ring the
other n - n_sink - n_hist(n) (W .. W+G-1 once full): a block of G tokens moves to the history
as soon as the ring holds W + G. Every layer and sequence follows this same schedule.

Stored space. History keys are k_s = perm(H_k(unrope_p(k))), each step optional: unrope
(prerope) undoes RoPE at the token's position p; H_k (rotate_k) is `k @ Hd` with Hd the
normalized Walsh-Hadamard matrix (symmetric, Hd @ Hd = I); perm (reorder) gathers channels,
k_s[..., j] = k[..., perm[l][h, j]]. Values: v_s = v @ Hd (rotate_v). So the attention-space
key of history slot i is RoPE_p(unperm(k_s) @ Hd) with p = hist_pos0 + i; with post-RoPE keys
that folds into the query, q·k = perm(q @ Hd)·k_s, and values fold into the output,
o = (Σ_s prob_s v_s) @ Hd. Reorder and key rotation are exclusive.

MiKV (settings.mikv = (hi_bits, hi_fraction)): of every G-token block moved to the history,
the n_hi = round(hi_fraction * G) tokens with the most attention mass also get per-token
hi_bits codes that override their low-bit rows (the low-bit codes stay, and are counted):
  hi_k[l] (B, H, C/G*n_hi, D*hb/8) uint8, hk_scale[l], hk_zero[l] (B, H, C/G*n_hi, D/gk) fp16
  hi_v[l], hv_scale[l], hv_zero[l] likewise with gv
  hi_idx[l] (B, H, C/G*n_hi) int32: the history slot each row overrides
  win_mass[l] (B, H, R) fp32: attention mass of the ring's tokens, summed over the new queries
  and over the query heads sharing the KV head, while the token sits in the ring.

Capacity policy: the store holds `capacity` positions and C = G * ((capacity - n_sink - W) // G),
enough that the history never overflows; `room()` is what is left of `capacity` and appending
past it raises ContextFull (the caller decides what to drop), so nothing is evicted or
silently overwritten.

Attention runs through the Triton kernels (kernels.store_attention; by default on CUDA) or
through the PyTorch reference below (`kernels` chooses). Through the kernels a decode step (one
token per sequence) reads every fill level from the device, from `positions`: the new token goes
into its ring slot by device-side indexing and the kernel gets per-sequence lengths and history
sizes, so the sequences of a batch may hold different lengths and the step can be replayed as one
CUDA graph (`static`). The blocks such a step fills move to the history in `advance()`, on the
host, outside the graph; until then the ring (R = W + G) still has room for them. Sinks are
written by prefill, or by eager decode steps that read the host lengths: a replayable step needs
every sequence past its sinks (`replayable()`). Chunks of several tokens, and the reference path,
need every sequence at the same length.

With the reference path on the CPU the store also keeps a mirror `view_k/view_v` (B, H, C, D),
indexed like the history, of the history in attention space, dequantized once when it is written:
without it the CPU path would dequantize the whole history at every step. A quantized history's
mirror is float16 (half the size of fp32, the CPU's dtype): its values are a few-bit codes times
fp16 scales, and fp16 rounding (2^-11 relative) is far below their quantization error. A raw
(bits 16) history's mirror stays in the model dtype, exact. Attention stays one masked SDPA call
per layer, in fp32 whatever the model dtype, over keys and values built for the step: sinks
(sink_k/v) ‖ mirror upcast ‖ ring in position order (win_k/v) ‖ new tokens, in `_step_k/v`
(B, H, capacity, D), one fp32 pair shared by all layers; sinks and ring are read from the store's
own buffers, exact. Mirror and step buffers are a compute aid, not counted in nbytes
(`working_nbytes()` reports them: about half an fp32 full cache, plus 1/n_layers of one).

The reference is the store's definition, attention over its dequantized contents, so with a 16-bit
model it adds no rounding of its own: the history is dequantized and attended in fp32, and only the
output is rounded to the model dtype (the kernels dequantize in float16 and accumulate in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from minikv.model import apply_rope
from minikv.quant import (dequantize_channels, dequantize_tokens, hadamard, heaviest, packed_width,
                          quantize_channels, quantize_tokens)
from minikv.store import KVStore, causal_mask, reference_attention

if TYPE_CHECKING:
    from minikv.presets import KVSettings

# Every buffer of the layout above: what nbytes() counts.
BUFFERS = ("sink_k", "sink_v", "win_k", "win_v", "hist_k", "hist_v", "k_scale", "k_zero", "v_scale", "v_zero",
           "hi_k", "hi_v", "hk_scale", "hk_zero", "hv_scale", "hv_zero", "hi_idx", "win_mass")


@dataclass
class LayerPlan:
    """What one layer's history uses, once presets, calibration and the bit budget are resolved."""

    bits_k: int
    bits_v: int
    clip_k: float = 1.0
    clip_v: float = 1.0
    perm: Tensor | None = None  # (H, D) key channel permutation


def attention_with_mass(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """reference_attention that also returns each key's attention mass (B, Hkv, S), summed over
    the queries and the query heads of its group (query head i reads KV head i // group)."""
    B, Hq, T, D = q.shape
    H = k.shape[1]
    qg = q.float().view(B, H, Hq // H, T, D)
    scores = qg @ k.float()[:, :, None].transpose(-1, -2) * D ** -0.5  # (B, H, g, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(-1)
    out = (probs @ v.float()[:, :, None]).view(B, Hq, T, D).to(q.dtype)
    return out, probs.sum((2, 3))


def cat_into(out: Tensor, parts: list[Tensor]) -> Tensor:
    """torch.cat(parts, 2) written into out, one copy_ per part: an fp16 mirror is upcast within its copy."""
    i = 0
    for p in parts:
        out[:, :, i:i + p.shape[2]].copy_(p)
        i += p.shape[2]
    return out


class QuantizedStore(KVStore):
    derived = ("rope_cos", "rope_sin", "hadamard", "perms", "inv_perms", "view_k", "view_v", "pos0", "step_lengths",
               "step_n_hist")
    per_sequence = BUFFERS + ("view_k", "view_v", "_step_k", "_step_v", "pos0", "step_lengths", "step_n_hist", "_slot")

    def __init__(self, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                 window: int | None, dtype: torch.dtype, device: torch.device | str, *, settings: KVSettings,
                 plans: list[LayerPlan], rope: tuple[Tensor, Tensor], kernels: bool | None = None,
                 mirror: bool | None = None) -> None:
        """rope: the model's (cos, sin) tables covering `capacity` positions (minikv.model.rope_tables).
        kernels: attend through the Triton kernels where they cover a layer (default: on CUDA; on the
        CPU they need TRITON_INTERPRET=1), else through the PyTorch reference.
        mirror: keep the dequantized mirror for the reference path (default: on the CPU without kernels;
        a store with the mirror never uses the kernels)."""
        super().__init__(n_layers, batch, capacity, n_kv_heads, head_dim, window, dtype, device)
        s = self.settings = settings.for_head_dim(head_dim)
        self.plans = plans
        self.n_sink, self.window, self.group = s.n_sink, s.window, s.group
        self.ring = s.window + s.group
        self.hist_pos0 = s.n_sink
        self.hist_capacity = max(0, (capacity - s.n_sink - s.window) // s.group) * s.group
        self.rope_cos, self.rope_sin = (t[:capacity].to(self.device) for t in rope)
        self.hadamard = hadamard(head_dim, self.device) if s.rotate_k or s.rotate_v else None
        self.hi_bits = s.mikv[0] if s.mikv else 0
        self.n_hi = round(s.mikv[1] * s.group) if s.mikv else 0
        self.perms = [None if p.perm is None else p.perm.to(self.device) for p in plans]
        self.inv_perms = [None if p is None else p.argsort(-1) for p in self.perms]
        for name in BUFFERS:
            setattr(self, name, [])
        for plan in plans:
            self._allocate(plan)
        use_kernels = self.device.type == "cuda" if kernels is None else kernels
        mirror = self.device.type == "cpu" and not use_kernels if mirror is None else mirror
        if mirror and kernels:
            raise ValueError("the dequantized mirror serves the reference path, not the kernels")
        shape = (batch, n_kv_heads, self.hist_capacity, head_dim)
        self.view_k = [self._zeros(shape, self._mirror_dtype(p.bits_k)) for p in plans] if mirror else []
        self.view_v = [self._zeros(shape, self._mirror_dtype(p.bits_v)) for p in plans] if mirror else []
        # The step's keys and values for the reference SDPA, reused by every layer: a fresh tensor per
        # layer and step measured up to 2.6x slower attention (page faults as malloc returns it).
        step_shape = (batch, n_kv_heads, capacity, head_dim) if mirror else (batch, n_kv_heads, 0, head_dim)
        self._step_k, self._step_v = self._zeros(step_shape, torch.float32), self._zeros(step_shape, torch.float32)
        self._kernels = None  # kernels.store_attention, imported only when used (Triton)
        if use_kernels and not mirror:
            from kernels import store_attention

            self._kernels = store_attention
            # torch.compile (GraphDecodeStep) runs the kernel path as it is: Triton launches, host bookkeeping.
            # Not a decorator: importing torch._dynamo imports Triton, which must follow TRITON_INTERPRET;
            # unbound, so that the store holds no reference to itself.
            self._kernel_path = torch.compiler.disable(QuantizedStore._kernel_attend)
        self._fast = [self._kernels is not None and self._kernels.supported(self, layer) for layer in range(n_layers)]
        self._first_fast = self._fast.index(True) if any(self._fast) else -1
        # A graph replays the kernel path's decode step only: every layer on it, on CUDA.
        self.static = all(self._fast) and self.device.type == "cuda"
        # The decode step's fill levels on the device, set once per step from `positions` (_begin_step):
        # fixed buffers, so a captured graph reads them at the same addresses.
        int32 = dict(dtype=torch.int32, device=self.device)
        self.pos0 = torch.full((batch,), self.hist_pos0, **int32)  # history row 0's position, per sequence
        self.step_lengths = torch.zeros(batch, **int32)  # tokens held after the new one
        self.step_n_hist = torch.zeros(batch, **int32)
        self._slot = torch.zeros(batch, dtype=torch.long, device=self.device)  # the new token's ring slot
        self._stepped: list[int] | None = None  # the host lengths the step was set for
        self._rows = torch.arange(batch, device=self.device)
        self._kernel_constants: dict = {}  # kernels.store_attention's per-layer constants (shared by row views)
        self._row_views: dict[int, QuantizedStore] = {}  # reference decode of sequences at different lengths

    # ---- allocation and sizes ---------------------------------------------------------------

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def _allocate(self, plan: LayerPlan) -> None:
        B, H, D, C, G, s = self.batch, self.n_kv_heads, self.head_dim, self.hist_capacity, self.group, self.settings
        none = self._zeros((0,), torch.float16)

        def codes(n: int, bits: int) -> Tensor:
            if bits == 16:
                return self._zeros((B, H, n, D), self.dtype)
            return self._zeros((B, H, n, packed_width(D, bits)), torch.uint8)

        def meta(shape: tuple[int, ...], bits: int) -> Tensor:
            return none if bits == 16 else self._zeros(shape, torch.float16)

        k_meta = (B, H, C // G, D) if s.key_axis == "channel" else (B, H, C, D // s.group_k)
        for name, t in (("sink_k", (B, H, self.n_sink, D)), ("sink_v", (B, H, self.n_sink, D)),
                        ("win_k", (B, H, self.ring, D)), ("win_v", (B, H, self.ring, D))):
            getattr(self, name).append(self._zeros(t, self.dtype))
        self.hist_k.append(codes(C, plan.bits_k))
        self.hist_v.append(codes(C, plan.bits_v))
        for name in ("k_scale", "k_zero"):
            getattr(self, name).append(meta(k_meta, plan.bits_k))
        for name in ("v_scale", "v_zero"):
            getattr(self, name).append(meta((B, H, C, D // s.group_v), plan.bits_v))
        n_hi = C // G * self.n_hi
        hk, hv = self._hi(plan.bits_k), self._hi(plan.bits_v)
        self.hi_k.append(codes(n_hi, self.hi_bits) if hk else none)
        self.hi_v.append(codes(n_hi, self.hi_bits) if hv else none)
        for name in ("hk_scale", "hk_zero"):
            getattr(self, name).append(self._zeros((B, H, n_hi, D // s.group_k), torch.float16) if hk else none)
        for name in ("hv_scale", "hv_zero"):
            getattr(self, name).append(self._zeros((B, H, n_hi, D // s.group_v), torch.float16) if hv else none)
        self.hi_idx.append(self._zeros((B, H, n_hi), torch.int32) if hk or hv else none)
        self.win_mass.append(self._zeros((B, H, self.ring), torch.float32) if self.n_hi else none)

    def _mirror_dtype(self, bits: int) -> torch.dtype:
        """float16 for a quantized history (codes times float16 scales: its rounding is far below the
        quantization error, and finer than bfloat16's); the model dtype for a raw one, which must stay exact."""
        return torch.float16 if bits < 16 else self.dtype

    def _hi(self, bits: int) -> bool:
        """Whether a tensor of this width gets MiKV's high-precision rows."""
        return self.n_hi > 0 and bits < self.hi_bits

    def mikv_layer(self, layer: int) -> bool:
        """Whether this layer's keys or values get MiKV's rows (so its attention mass is kept)."""
        return self._hi(self.plans[layer].bits_k) or self._hi(self.plans[layer].bits_v)

    def used_part(self, name: str, t: Tensor) -> Tensor:
        """Saved sessions keep only the filled part of the history buffers."""
        if t.dim() < 3:
            return t
        n = self.n_hist(self.length)
        if name in ("hist_k", "hist_v", "v_scale", "v_zero") or name in ("k_scale", "k_zero") and \
                self.settings.key_axis == "token":
            return t[:, :, :n]
        if name in ("k_scale", "k_zero"):
            return t[:, :, :n // self.group]
        if name.startswith(("hi_", "hk_", "hv_")) and t.dim() >= 3:
            return t[:, :, :n // self.group * self.n_hi]
        return t

    def restored(self) -> None:
        """Rebuild the CPU mirror from loaded buffers."""
        h = self.n_hist(self.length)
        for layer in range(len(self.view_k)):
            self.view_k[layer][:, :, :h], self.view_v[layer][:, :, :h] = self.history(layer, 0, h)

    def _plain(self) -> dict:
        """How it attends is not what it holds: a session saved one way loads the other."""
        out = super()._plain()
        out["settings"].pop("attention", None)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for name in BUFFERS for t in getattr(self, name))

    def working_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.view_k, *self.view_v, self._step_k, self._step_v])

    def n_hist(self, n: int) -> int:
        """History tokens when n tokens are held (the schedule in the module docstring)."""
        return max(0, (n - self.n_sink - self.window) // self.group) * self.group

    def _element_bits(self, bits: int, group: int) -> float:
        """Marginal bits per element of one history tensor: codes + fp16 scale and zero."""
        if bits == 16:
            return torch.finfo(self.dtype).bits
        return bits + 32 / group

    def bits_per_element(self) -> float:
        """Bits one more history token costs per stored element (K and V, all layers averaged):
        codes, scales and zero-points, and MiKV's share of high-precision rows and their index."""
        s, D = self.settings, self.head_dim
        k_group = s.group if s.key_axis == "channel" else s.group_k
        total = 0.0
        share = self.n_hi / s.group  # of history tokens that also have high-precision rows
        for plan in self.plans:
            for bits, group, hi_group in ((plan.bits_k, k_group, s.group_k), (plan.bits_v, s.group_v, s.group_v)):
                total += self._element_bits(bits, group)
                if self._hi(bits):
                    total += share * self._element_bits(self.hi_bits, hi_group)
            if self._hi(plan.bits_k) or self._hi(plan.bits_v):
                total += share * 32 / D  # hi_idx, one int32 per row shared by K and V
        return total / (2 * len(self.plans))

    def avg_bits_per_element(self, n_tokens: int) -> float:
        """Bits per element over n_tokens held: sinks and window at the model dtype, history as above."""
        h = self.n_hist(n_tokens)
        full = torch.finfo(self.dtype).bits
        return (full * (n_tokens - h) + self.bits_per_element() * h) / max(n_tokens, 1)

    # ---- stored space <-> attention space ----------------------------------------------------

    def _key_to_stored(self, layer: int, k: Tensor, pos: Tensor) -> Tensor:
        x = k.float()
        if self.settings.prerope:
            x = apply_rope(x, self.rope_cos[pos], -self.rope_sin[pos])  # the inverse rotation
        if self.settings.rotate_k:
            x = x @ self.hadamard
        if self.perms[layer] is not None:
            x = x.gather(-1, self.perms[layer][None, :, None].expand_as(x))
        return x

    def _key_from_stored(self, layer: int, x: Tensor, pos: Tensor) -> Tensor:
        if self.inv_perms[layer] is not None:
            x = x.gather(-1, self.inv_perms[layer][None, :, None].expand_as(x))
        if self.settings.rotate_k:
            x = x @ self.hadamard
        if self.settings.prerope:
            x = apply_rope(x, self.rope_cos[pos], self.rope_sin[pos])
        return x

    def _value_rotate(self, v: Tensor) -> Tensor:
        """v -> v @ Hd with rotate_v (its own inverse), else v; fp32."""
        return v.float() @ self.hadamard if self.settings.rotate_v else v.float()

    # ---- history: quantize and dequantize ---------------------------------------------------

    def _write(self, layer: int, kind: str, x: Tensor, a: int, b: int, clip: float) -> None:
        """Quantize stored-space rows x for history slots [a, b)."""
        bits = self.plans[layer].bits_k if kind == "k" else self.plans[layer].bits_v
        hist = (self.hist_k if kind == "k" else self.hist_v)[layer]
        if bits == 16:
            hist[:, :, a:b] = x.to(self.dtype)
            return
        scale, zero = (self.k_scale, self.k_zero) if kind == "k" else (self.v_scale, self.v_zero)
        if kind == "k" and self.settings.key_axis == "channel":
            G = self.group
            hist[:, :, a:b], scale[layer][:, :, a // G:b // G], zero[layer][:, :, a // G:b // G] = \
                quantize_channels(x, bits, G, clip)
        else:
            group = self.settings.group_k if kind == "k" else self.settings.group_v
            hist[:, :, a:b], scale[layer][:, :, a:b], zero[layer][:, :, a:b] = quantize_tokens(x, bits, group, clip)

    def _write_important(self, layer: int, ks: Tensor, vs: Tensor, a: int, b: int, mass: Tensor,
                         rows: slice = slice(None)) -> None:
        """MiKV: the n_hi heaviest tokens of each G-block also get hi_bits per-token codes
        (stored-space ks, vs (B', H, b-a, D) and their mass of the sequences `rows`)."""
        G, n_hi, s = self.group, self.n_hi, self.settings
        local = heaviest(mass, n_hi, G)  # (B, H, n), offsets into the slots [a, b)
        j0, j1 = a // G * n_hi, b // G * n_hi
        self.hi_idx[layer][rows, :, j0:j1] = (local + a).to(torch.int32)
        idx = local[..., None].expand(-1, -1, -1, self.head_dim)
        for x, bits, codes, scale, zero, group in (
                (ks, self.plans[layer].bits_k, self.hi_k, self.hk_scale, self.hk_zero, s.group_k),
                (vs, self.plans[layer].bits_v, self.hi_v, self.hv_scale, self.hv_zero, s.group_v)):
            if self._hi(bits):
                codes[layer][rows, :, j0:j1], scale[layer][rows, :, j0:j1], zero[layer][rows, :, j0:j1] = \
                    quantize_tokens(x.gather(2, idx), self.hi_bits, group)

    def _read(self, layer: int, kind: str, a: int, b: int) -> Tensor:
        """Dequantized stored-space rows of history slots [a, b) (multiples of G), fp32."""
        bits = self.plans[layer].bits_k if kind == "k" else self.plans[layer].bits_v
        hist = (self.hist_k if kind == "k" else self.hist_v)[layer][:, :, a:b]
        D, G, s = self.head_dim, self.group, self.settings
        if a == b:
            return self._zeros((self.batch, self.n_kv_heads, 0, D), torch.float32)
        if bits == 16:
            return hist.float()
        if kind == "k" and s.key_axis == "channel":
            x = dequantize_channels(hist, self.k_scale[layer][:, :, a // G:b // G],
                                    self.k_zero[layer][:, :, a // G:b // G], bits, D)
        else:
            scale, zero = (self.k_scale, self.k_zero) if kind == "k" else (self.v_scale, self.v_zero)
            x = dequantize_tokens(hist, scale[layer][:, :, a:b], zero[layer][:, :, a:b], bits, D)
        if self._hi(bits):
            j0, j1 = a // G * self.n_hi, b // G * self.n_hi
            codes, scale, zero = ((self.hi_k, self.hk_scale, self.hk_zero) if kind == "k"
                                  else (self.hi_v, self.hv_scale, self.hv_zero))
            rows = dequantize_tokens(codes[layer][:, :, j0:j1], scale[layer][:, :, j0:j1],
                                     zero[layer][:, :, j0:j1], self.hi_bits, D)
            idx = (self.hi_idx[layer][:, :, j0:j1].long() - a)[..., None].expand(-1, -1, -1, D)
            x = x.scatter(2, idx, rows)
        return x

    def ring_slots(self, a: int, b: int) -> Tensor:
        """The ring slots of positions a .. b-1 (none when b <= a): slot (p - n_sink) % R."""
        return (torch.arange(a, max(a, b), device=self.device) - self.n_sink) % self.ring

    def history(self, layer: int, a: int, b: int) -> tuple[Tensor, Tensor]:
        """Attention-space keys and values of history slots [a, b), fp32."""
        pos = torch.arange(self.hist_pos0 + a, self.hist_pos0 + b, device=self.device)
        return self._key_from_stored(layer, self._read(layer, "k", a, b), pos), \
            self._value_rotate(self._read(layer, "v", a, b))

    def dequantized_history(self, layer: int, raw: bool = False) -> tuple[Tensor, Tensor]:
        """The history held now, (B, H, n_hist, D) keys and values: in attention space (post-RoPE,
        unrotated, unpermuted; what attention sees), or with raw=True in stored space; fp32."""
        n = self.n_hist(self.length)
        if raw:
            return self._read(layer, "k", 0, n), self._read(layer, "v", 0, n)
        if self.view_k:
            return self.view_k[layer][:, :, :n].float(), self.view_v[layer][:, :, :n].float()
        return self.history(layer, 0, n)

    def _flush(self, layer: int, k: Tensor, v: Tensor, a: int, b: int, mass: Tensor | None) -> None:
        """Move full-precision tokens k, v (B, H, b-a, D) into history slots [a, b)."""
        if self._fast[layer]:  # one fused quantize-and-pack launch, MiKV's rows included
            self._kernels.flush(self, layer, k, v, a, b, mass=mass if self.mikv_layer(layer) else None)
            return
        plan = self.plans[layer]
        pos = torch.arange(self.hist_pos0 + a, self.hist_pos0 + b, device=self.device)
        ks, vs = self._key_to_stored(layer, k, pos), self._value_rotate(v)
        self._write(layer, "k", ks, a, b, plan.clip_k)
        self._write(layer, "v", vs, a, b, plan.clip_v)
        if mass is not None and self.mikv_layer(layer):
            self._write_important(layer, ks, vs, a, b, mass)
        if self.view_k:
            self.view_k[layer][:, :, a:b], self.view_v[layer][:, :, a:b] = self.history(layer, a, b)

    # ---- the seam --------------------------------------------------------------------------

    def _visible(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Keys and values at positions 0 .. start+T-1 as the new queries see them (attention space,
        fp32): sinks ‖ history (the mirror, else dequantized now) ‖ ring ‖ new."""
        h = self.n_hist(start)
        w0 = self.hist_pos0 + h
        slots = self.ring_slots(w0, start)
        hk, hv = (self.view_k[layer][:, :, :h], self.view_v[layer][:, :, :h]) if self.view_k else \
            self.history(layer, 0, h)
        n_sink = min(start, self.n_sink)
        keys = [self.sink_k[layer][:, :, :n_sink], hk, self.win_k[layer][:, :, slots], k]
        values = [self.sink_v[layer][:, :, :n_sink], hv, self.win_v[layer][:, :, slots], v]
        if not self.view_k:
            return torch.cat([t.float() for t in keys], 2), torch.cat([t.float() for t in values], 2)
        end = start + k.shape[2]
        return cat_into(self._step_k[:, :, :end], keys), cat_into(self._step_v[:, :, :end], values)

    def _start(self) -> int:
        """The length every sequence holds: chunks of several tokens (and the reference path) need one."""
        start = self.lengths[0]
        if self.lengths.count(start) != self.batch:
            raise ValueError("the sequences of a quantized store take chunks of several tokens together")
        return start

    def rows(self, start: int, stop: int) -> "QuantizedStore":
        view = super().rows(start, stop)
        view._rows, view._stepped, view._row_views = self._rows[:stop - start], None, {}
        return view

    def _row(self, b: int) -> "QuantizedStore":
        """Sequence b as a store of its own (cached), its length refreshed from ours."""
        if b not in self._row_views:
            self._row_views[b] = self.rows(b, b + 1)
        view = self._row_views[b]
        view.lengths = self.lengths[b:b + 1]
        return view

    def replayable(self) -> bool:
        return self.static and min(self.lengths) >= self.n_sink

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        if self._fast[layer]:
            return self._kernel_path(self, layer, q, k, v, positions)
        if k.shape[2] == 1 and len(set(self.lengths)) > 1:  # sequences at different lengths: one at a time
            return torch.cat([self._row(b).attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1], positions[b:b + 1])
                              for b in range(self.batch)])
        start, T = self._start(), k.shape[2]
        keys, values = self._visible(layer, k, v, start)
        single = T == 1 and self.sliding_window is None
        mask = None if single else causal_mask(positions, torch.arange(start + T, device=self.device),
                                               self.sliding_window)
        mass = None
        if self.n_hi:
            out, mass = attention_with_mass(q, keys, values, mask)
            w0 = self.hist_pos0 + self.n_hist(start)
            if start > w0:
                slots = self.ring_slots(w0, start)
                self.win_mass[layer].index_add_(2, slots, mass[:, :, w0:start])
            mass = mass[:, :, start:]
        else:
            out = reference_attention(q.float(), keys, values, mask).to(q.dtype)
        self._append(layer, k, v, start, mass)
        return out

    def _kernel_attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Through the Triton kernels: a decode step from the device-side fill levels, or a chunk."""
        if k.shape[2] == 1:
            if layer == self._first_fast or self._stepped != self.lengths:  # eager callers may skip layers
                self._begin_step(positions[:, 0])
            self._put(layer, k, v)
            return self._kernels.decode(self, layer, q)
        start = self._start()
        out, mass = self._kernels.attend(self, layer, q, k, v, start)
        self._append(layer, k, v, start, mass)
        return out

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Through attend's write path. MiKV picks its high-precision rows by attention mass, which
        writing has none of: they go to arbitrary tokens of each block."""
        T = k.shape[2]
        if self._fast[layer] and T == 1:
            self._begin_step(self.positions(1)[:, 0])
            self._put(layer, k, v)
            if self.mikv_layer(layer):  # the slot's mass was its previous token's (decode drops it in the kernel)
                self.win_mass[layer][self._rows, :, self._slot] = 0.0
            return
        start = self._start()
        mass = torch.zeros(k.shape[:3], device=self.device) if self.n_hi else None
        self._append(layer, k, v, start, mass)

    def advance(self, n: int) -> None:
        """A single token through the kernels was only written to the ring: the blocks it filled move
        to the history now, one quantize-and-pack launch per layer and run of neighbouring sequences
        that move the same block (a slice of the batch is a view), MiKV's rows picked by the ring's
        attention mass in the same launch."""
        if n == 1 and self._first_fast >= 0:
            runs: list[list[int]] = []  # [first sequence, past the last, history row of the block they move]
            for b, length in enumerate(self.lengths):
                if self.n_hist(length + 1) > self.n_hist(length):
                    a = self.n_hist(length)
                    if runs and runs[-1][1:] == [b, a]:
                        runs[-1][1] = b + 1
                    else:
                        runs.append([b, b + 1, a])
            for layer in (layer for layer, fast in enumerate(self._fast) if fast):
                for start, stop, a in runs:
                    rows = None if stop - start == self.batch else slice(start, stop)  # None: all, no views
                    self._kernels.flush(self, layer, self.win_k[layer], self.win_v[layer], a, a + self.group,
                                        src0=a % self.ring, rows=rows,
                                        mass=self.win_mass[layer] if self.mikv_layer(layer) else None)
        super().advance(n)

    def _begin_step(self, start: Tensor) -> None:
        """A decode step's fill levels from its positions (B,), on the device (the schedule in the
        module docstring, per sequence); set once per step, read by every layer."""
        S, W, G = self.n_sink, self.window, self.group
        self._stepped = list(self.lengths)
        self.step_lengths.copy_(start + 1)
        self.step_n_hist.copy_((start - S - W).div(G, rounding_mode="floor").clamp(min=0) * G)
        self._slot.copy_((start - S) % self.ring)

    def _put(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write one new token per sequence, k, v (B, H, 1, D), into its ring slot by device-side
        indexing; while a sequence is still in its sinks (never in a replayed step), by host lengths."""
        if min(self.lengths) >= self.n_sink:
            self.win_k[layer][self._rows, :, self._slot] = k[:, :, 0]
            self.win_v[layer][self._rows, :, self._slot] = v[:, :, 0]
            return
        for b, p in enumerate(self.lengths):
            bk, bv, slot = (self.sink_k, self.sink_v, p) if p < self.n_sink else \
                (self.win_k, self.win_v, (p - self.n_sink) % self.ring)
            bk[layer][b, :, slot], bv[layer][b, :, slot] = k[b, :, 0], v[b, :, 0]

    def _append(self, layer: int, k: Tensor, v: Tensor, start: int, mass: Tensor | None) -> None:
        """Place new tokens at positions start.. : sinks, then the ring, flushing full blocks."""
        S, end = self.n_sink, start + k.shape[2]
        if start < S:
            n = min(S, end) - start
            self.sink_k[layer][:, :, start:start + n], self.sink_v[layer][:, :, start:start + n] = \
                k[:, :, :n], v[:, :, :n]
        a, b = self.n_hist(start), self.n_hist(end)
        if b > a:  # positions S+a .. S+b-1 leave the ring (or skip it) for the history
            lo, hi = S + a, S + b
            slots = self.ring_slots(lo, min(hi, start))
            new = slice(max(lo, start) - start, max(hi, start) - start)
            kb = torch.cat([self.win_k[layer][:, :, slots], k[:, :, new]], 2)
            vb = torch.cat([self.win_v[layer][:, :, slots], v[:, :, new]], 2)
            mb = None if mass is None else torch.cat([self.win_mass[layer][:, :, slots], mass[:, :, new]], 2)
            self._flush(layer, kb, vb, a, b, mb)
        p0 = max(start, S + b)
        if end > p0:
            slots = self.ring_slots(p0, end)
            self.win_k[layer].index_copy_(2, slots, k[:, :, p0 - start:])
            self.win_v[layer].index_copy_(2, slots, v[:, :, p0 - start:])
            if mass is not None:
                self.win_mass[layer].index_copy_(2, slots, mass[:, :, p0 - start:])
