"""Quantize-and-pack: move blocks of G tokens (e.g. the ring's oldest) into the packed history.

One launch per layer; each program takes one (sequence, KV head, block) and does, in registers:
optional inverse RoPE (pre-RoPE keys) and per-head key matrix / value matrix (rotation and channel
reorder into stored space), clipped min/max, fp16 scale and zero, codes, bit packing, stores; with
MiKV's rows, it also picks the block's heaviest tokens by attention mass and writes their
high-precision codes. Codes follow minikv.quant exactly (scale and zero rounded to fp16 before the
codes are chosen, round half to even), so the twin kernels.reference.quantize_block is bit-identical
without the optional matrices. Layout: kernels.layout.

For 16-bit models the matrix products run as three TF32 tensor-core products ("tf32x3", close to
fp32): in exact fp32 Triton builds them from scalar FMAs that spill registers, and a Llama-2-7B block
move took 0.48 ms per layer on an H100 (0.042 ms at 8 sequences x 8 KV heads with tf32x3), at the
price of a rare code rounding the other way (2e-5 of K4V2's key bytes). fp32 models keep exact fp32:
they are where the kernels are checked against the reference path, code for code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import HiRows, History, PreRope, Spec

FP16_MAX = tl.constexpr(65504.0)  # a constexpr, so kernels may read it


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _codes(x, lo, hi, BITS: tl.constexpr, clip):
    """Codes (as fp32) and fp16 scale, zero of x against its range [lo, hi] (broadcastable)."""
    if clip < 1.0:
        mid = (hi + lo) / 2
        half = (hi - lo) / 2 * clip
        lo = mid - half
        hi = mid + half
    QMAX: tl.constexpr = (1 << BITS) - 1
    scale = tl.minimum((hi - lo) / QMAX, FP16_MAX).to(tl.float16)
    zero = lo.to(tl.float16)
    s = scale.to(tl.float32)
    c = _round_half_even(tl.math.div_rn(x - zero.to(tl.float32), tl.where(s > 0, s, 1.0)))
    c = tl.where(s > 0, tl.minimum(tl.maximum(c, 0.0), QMAX), 0.0)
    return c, scale, zero


@triton.jit
def _pack_plane(codes, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """(G, D) int32 codes of BITS bits -> (G, D*BITS/8) bytes, channel c at bit (c % (8/BITS))*BITS."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        packed = codes
    else:
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(tl.reshape(codes, (G, D // PER, PER)) << shifts[None, None, :], 2)
    return packed.to(tl.uint8)


@triton.jit
def _store_codes(dst_rows, codes, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    c = codes.to(tl.int32)
    if BITS == 3:
        tl.store(dst_rows[:, None] + tl.arange(0, D // 4)[None, :], _pack_plane(c & 3, 2, G, D))
        tl.store(dst_rows[:, None] + D // 4 + tl.arange(0, D // 8)[None, :], _pack_plane(c >> 2, 1, G, D))
    else:
        tl.store(dst_rows[:, None] + tl.arange(0, D * BITS // 8)[None, :], _pack_plane(c, BITS, G, D))


@triton.jit
def _quantize_tokens(x, dst_rows, meta_rows, s_ptr, z_ptr, clip, BITS: tl.constexpr, GROUP: tl.constexpr,
                     G: tl.constexpr, D: tl.constexpr):
    """Per-token groups of GROUP channels: codes to dst_rows (G,), scales/zeros to meta_rows (G,)."""
    NG: tl.constexpr = D // GROUP
    xg = tl.reshape(x, (G, NG, GROUP))
    c, scale, zero = _codes(xg, tl.min(xg, 2)[:, :, None], tl.max(xg, 2)[:, :, None], BITS, clip)
    _store_codes(dst_rows, tl.reshape(c, (G, D)), BITS, G, D)
    meta = meta_rows[:, None] + tl.arange(0, NG)[None, :]
    tl.store(s_ptr + meta, tl.reshape(scale, (G, NG)))
    tl.store(z_ptr + meta, tl.reshape(zero, (G, NG)))


@triton.jit
def _quantize_row(x, row, codes_ptr, s_ptr, z_ptr, BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr):
    """One token x (1, D) to row `row` of per-token codes, scales and zeros, unclipped."""
    one = tl.zeros((1,), tl.int32)
    _quantize_tokens(x, codes_ptr + (row * (D * BITS // 8) + one), row * (D // GROUP) + one, s_ptr, z_ptr, 1.0,
                     BITS, GROUP, 1, D)


@triton.jit
def _write_hi_rows(k, v, mass, row0, hik_ptr, hiv_ptr, hks_ptr, hkz_ptr, hvs_ptr, hvz_ptr, hidx_ptr, hi0,
                   HI_BITS: tl.constexpr, HI_ROWS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
                   G: tl.constexpr, D: tl.constexpr):
    """MiKV: the HI_ROWS tokens of the block (k, v (G, D) in stored space) with the most attention mass
    (G,), heaviest first and ties to the earlier token (minikv.quant.heaviest), get per-token HI_BITS
    codes in rows hi0.. of the high-precision tensors, and their history rows (row0 + offset) in the index."""
    i = tl.arange(0, G)
    for j in range(HI_ROWS):
        top = tl.min(tl.where(mass == tl.max(mass, 0), i, G), 0)
        mass = tl.where(i == top, float("-inf"), mass)
        pick = (i == top)[:, None]
        tl.store(hidx_ptr + hi0 + j, row0 + top)
        _quantize_row(tl.reshape(tl.sum(tl.where(pick, k, 0.0), 0), (1, D)), hi0 + j, hik_ptr, hks_ptr, hkz_ptr,
                      HI_BITS, K_GROUP, D)
        _quantize_row(tl.reshape(tl.sum(tl.where(pick, v, 0.0), 0), (1, D)), hi0 + j, hiv_ptr, hvs_ptr, hvz_ptr,
                      HI_BITS, V_GROUP, D)


@triton.jit
def _load_block(src_ptr, rows, m_ptr, M_ON: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """Rows (G, D) fp32, mapped by the matrix M (D, D) when M_ON: x @ M."""
    x = tl.load(src_ptr + rows[:, None] * D + tl.arange(0, D)[None, :]).to(tl.float32)
    if M_ON:
        m = tl.load(m_ptr + tl.arange(0, D)[:, None] * D + tl.arange(0, D)[None, :]).to(tl.float32)
        x = tl.dot(x, m, input_precision=PREC)
    return x


@triton.jit
def _quantize_pack_kernel(
    kin_ptr, vin_ptr, hk_ptr, hv_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
    cos_ptr, sin_ptr, pos0_ptr, kmat_ptr, vmat_ptr,
    mass_ptr, hik_ptr, hiv_ptr, hks_ptr, hkz_ptr, hvs_ptr, hvz_ptr, hidx_ptr,
    H, S_src, src0, dst0, C_h, C_hi, clip_k, clip_v,
    D: tl.constexpr, G: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr,
    K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, UNROPE: tl.constexpr, KMAT: tl.constexpr, VMAT: tl.constexpr,
    HI_BITS: tl.constexpr, HI_ROWS: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    i = tl.arange(0, G)
    src_rows = bh * S_src + (src0 + blk * G + i) % S_src  # the source may be a ring
    dst = dst0 + blk * G + i
    tok = bh * C_h + dst  # history rows

    if UNROPE:  # keys are stored before RoPE: x*cos + rotate_half(x)*(-sin) at the token's position
        cols = tl.arange(0, D)
        k = tl.load(kin_ptr + src_rows[:, None] * D + cols[None, :]).to(tl.float32)
        partner = tl.load(kin_ptr + src_rows[:, None] * D + ((cols + D // 2) % D)[None, :]).to(tl.float32)
        rotated = tl.where(cols[None, :] < D // 2, -partner, partner)
        tab = (tl.load(pos0_ptr + bh // H) + dst)[:, None] * D + cols[None, :]
        k = k * tl.load(cos_ptr + tab).to(tl.float32) + rotated * -tl.load(sin_ptr + tab).to(tl.float32)
        if KMAT:
            m = kmat_ptr + (bh % H) * D * D + cols[:, None] * D + cols[None, :]
            k = tl.dot(k, tl.load(m).to(tl.float32), input_precision=PREC)
    else:
        k = _load_block(kin_ptr, src_rows, kmat_ptr + (bh % H) * D * D, KMAT, D, PREC)
    k = tl.minimum(tl.maximum(k, -FP16_MAX), FP16_MAX)

    KB: tl.constexpr = D * K_BITS // 8
    if K_PER_CHANNEL:
        c, scale, zero = _codes(k, tl.min(k, 0)[None, :], tl.max(k, 0)[None, :], K_BITS, clip_k)
        _store_codes(hk_ptr + tok * KB, c, K_BITS, G, D)
        meta = (bh * (C_h // G) + dst0 // G + blk) * D + tl.arange(0, D)[None, :]
        tl.store(ks_ptr + meta, scale)
        tl.store(kz_ptr + meta, zero)
    else:
        _quantize_tokens(k, hk_ptr + tok * KB, tok * (D // K_GROUP), ks_ptr, kz_ptr, clip_k, K_BITS, K_GROUP, G, D)

    v = _load_block(vin_ptr, src_rows, vmat_ptr, VMAT, D, PREC)
    v = tl.minimum(tl.maximum(v, -FP16_MAX), FP16_MAX)
    _quantize_tokens(v, hv_ptr + tok * (D * V_BITS // 8), tok * (D // V_GROUP), vs_ptr, vz_ptr, clip_v, V_BITS,
                     V_GROUP, G, D)
    if HI_ROWS > 0:
        _write_hi_rows(k, v, tl.load(mass_ptr + src_rows), dst0 + blk * G, hik_ptr, hiv_ptr, hks_ptr, hkz_ptr,
                       hvs_ptr, hvz_ptr, hidx_ptr, bh * C_hi + (dst0 // G + blk) * HI_ROWS, HI_BITS, HI_ROWS,
                       K_GROUP, V_GROUP, G, D)


def quantize_pack(k_src: Tensor, v_src: Tensor, src0: int, n_tokens: int, hist: History, dst0: int, spec: Spec,
                  clip_k: float = 1.0, clip_v: float = 1.0, *, rope: PreRope | None = None,
                  key_matrix: Tensor | None = None, value_matrix: Tensor | None = None, hi: HiRows | None = None,
                  mass: Tensor | None = None) -> None:
    """Quantize n_tokens (whole blocks of G) rows of k_src, v_src (B, Hkv, S, D), starting at row
    src0 and wrapping modulo S (a ring), into history rows dst0.. of `hist`, in place.

    Keys: inverse RoPE at their positions (history row i sits at rope.pos0 + i) when `rope` is
    given, then x @ key_matrix[h] (Hkv, D, D); values: v @ value_matrix (D, D). The same function
    as kernels.reference.quantize_block applied to the transformed rows. With MiKV's rows `hi`
    (a spec with hi_rows), each block's heaviest tokens by `mass` (B, Hkv, S, indexed like the
    source rows) also go to its rows of `hi`, as kernels.reference.quantize_hi_rows does."""
    B, H, S, D = k_src.shape
    G = spec.block
    if n_tokens % G or dst0 % G:
        raise ValueError("quantize_pack moves whole blocks of G tokens")
    if (hi is None or mass is None) != (spec.hi_rows == 0):
        raise ValueError("MiKV's rows and their attention mass go with a spec that counts them (Spec.hi_rows)")
    hi_tensors = [mass, *hi.rows, hi.idx] if hi is not None else [k_src] * 8  # placeholders without MiKV
    if not all(t.is_contiguous() for t in (k_src, v_src, *hist, *hi_tensors)):
        raise ValueError("quantize_pack needs contiguous tensors")
    cos, sin, pos0 = rope if rope is not None else (k_src, k_src, k_src)  # placeholders when off
    _quantize_pack_kernel[(B * H, n_tokens // G)](
        k_src, v_src, *hist, cos, sin, pos0,
        k_src if key_matrix is None else key_matrix, k_src if value_matrix is None else value_matrix, *hi_tensors,
        H, S, src0, dst0, hist.k.shape[2], 0 if hi is None else hi.idx.shape[2], clip_k, clip_v,
        D=D, G=G, K_BITS=spec.k_bits, V_BITS=spec.v_bits, K_PER_CHANNEL=spec.k_per_channel,
        K_GROUP=spec.k_group, V_GROUP=spec.v_group, UNROPE=rope is not None, KMAT=key_matrix is not None,
        VMAT=value_matrix is not None, HI_BITS=spec.hi_bits, HI_ROWS=spec.hi_rows,
        PREC="ieee" if k_src.dtype == torch.float32 else "tf32x3",
        num_warps=4 if key_matrix is None and value_matrix is None else 8,
    )
