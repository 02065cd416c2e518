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

from kernels.dequant import rope_rows


@triton.jit
def _rotate(src, dst, cos_row, sin_row, H, sh, dh, HP: tl.constexpr, D: tl.constexpr):
    """Heads h < H of one (sequence, token): head h read at src + h * sh, turned by the table rows at cos_row
    and sin_row (dequant.rope_rows), written at dst + h * dh."""
    h = tl.arange(0, HP)
    ok = h < H
    lo_at = h[:, None] * sh + tl.arange(0, D // 2)[None, :]
    lo, hi = rope_rows(tl.load(src + lo_at, mask=ok[:, None], other=0.0),
                       tl.load(src + lo_at + D // 2, mask=ok[:, None], other=0.0), cos_row, sin_row, h * 0, ok, D)
    out_at = h[:, None] * dh + tl.arange(0, D // 2)[None, :]
    tl.store(dst + out_at, lo, mask=ok[:, None])
    tl.store(dst + out_at + D // 2, hi, mask=ok[:, None])


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, HQ, HK, q_sb, q_sh, q_st, k_sb, k_sh, k_st,
                 c_sb, c_st, HQP: tl.constexpr, HKP: tl.constexpr, D: tl.constexpr):
    """Program (sequence, token): every query and key head of it."""
    b = tl.program_id(0) // T
    t = tl.program_id(0) % T
    row = b * c_sb + t * c_st
    _rotate(q_ptr + b * q_sb + t * q_st, qo_ptr + (b * HQ * T + t) * D, cos_ptr + row, sin_ptr + row, HQ, q_sh, T * D,
            HQP, D)
    _rotate(k_ptr + b * k_sb + t * k_st, ko_ptr + (b * HK * T + t) * D, cos_ptr + row, sin_ptr + row, HK, k_sh, T * D,
            HKP, D)


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """apply_rope(q, cos, sin), apply_rope(k, cos, sin) for q (B, Hq, T, D), k (B, Hk, T, D) with unit stride
    along D, and cos, sin (B, 1, T, D) of their dtype, rotate-half tables whose two halves are equal
    (minikv.model.rope_tables); the results are contiguous."""
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
