"""Rotate-half RoPE of a step's queries and keys in one launch on CUDA. The model's PyTorch form
(minikv.model.apply_rope: a negation, a concatenation, two products and a sum, on strided views) is about
five kernels per tensor, ten per layer; on an H100 they took about 0.9 ms of a Mistral-7B step at batch 8
over 32K tokens, and this kernel 0.06 ms (docs/SPEED.md).
Same roundings: each product and the sum rounded to the model's dtype, as the PyTorch form does (FMA
contraction off)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate(src, dst, c_lo, c_hi, s_lo, s_hi, H, sh, dh, HP: tl.constexpr, D: tl.constexpr):
    """Heads h < H of one (sequence, token): head h read at src + h * sh, written at dst + h * dh."""
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, D // 2)[None, :]
    ok = h < H
    lo = tl.load(src + h * sh + d, mask=ok, other=0.0)
    hi = tl.load(src + h * sh + D // 2 + d, mask=ok, other=0.0)
    tl.store(dst + h * dh + d, lo * c_lo - hi * s_lo, mask=ok)
    tl.store(dst + h * dh + D // 2 + d, hi * c_hi + lo * s_hi, mask=ok)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, HQ, HK, q_sb, q_sh, q_st, k_sb, k_sh, k_st,
                 c_sb, c_st, HQP: tl.constexpr, HKP: tl.constexpr, D: tl.constexpr):
    """Program (sequence, token): every query and key head of it, with one read of its cos and sin rows."""
    b = tl.program_id(0) // T
    t = tl.program_id(0) % T
    d = tl.arange(0, D // 2)[None, :]
    row = b * c_sb + t * c_st
    c_lo, c_hi = tl.load(cos_ptr + row + d), tl.load(cos_ptr + row + D // 2 + d)
    s_lo, s_hi = tl.load(sin_ptr + row + d), tl.load(sin_ptr + row + D // 2 + d)
    _rotate(q_ptr + b * q_sb + t * q_st, qo_ptr + (b * HQ * T + t) * D, c_lo, c_hi, s_lo, s_hi, HQ, q_sh, T * D,
            HQP, D)
    _rotate(k_ptr + b * k_sb + t * k_st, ko_ptr + (b * HK * T + t) * D, c_lo, c_hi, s_lo, s_hi, HK, k_sh, T * D,
            HKP, D)


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """apply_rope(q, cos, sin), apply_rope(k, cos, sin) for q (B, Hq, T, D), k (B, Hk, T, D) with unit stride
    along D, and cos, sin (B, 1, T, D) of their dtype; the results are contiguous."""
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rope_qk needs unit stride along the head dimension and cos, sin of one layout")
    qo = torch.empty(B, HQ, T, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(B, HK, T, D, dtype=k.dtype, device=k.device)
    _rope_kernel[(B * T,)](q, k, cos, sin, qo, ko, T, HQ, HK, *q.stride()[:3], *k.stride()[:3], cos.stride(0),
                           cos.stride(2), HQP=triton.next_power_of_2(HQ), HKP=triton.next_power_of_2(HK), D=D,
                           enable_fp_fusion=False)
    return qo, ko
