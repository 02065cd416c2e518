"""Attention over the packed store, read in place: decode (one query token per sequence,
flash-decoding) and, through the same kernel, prefill chunks (kernels.prefill_attention).

Each program takes one (sequence, KV head) and one split of the history, with ALL query heads of the
KV group at once, so every packed byte is read from memory once and unpacked once (GQA). Codes are
dequantized in registers (in float16 for 16-bit models, see kernels.dequant), the history's values
one field of the packed bytes at a time so that they reach the tensor cores without a trip through
shared memory (_history_pv), and so are 2- and 4-bit keys after RoPE in decode, with their scales in the
query (_history_qk_t); pre-RoPE keys get RoPE there too, after the key-matrix product, and are the first
operand of the score product (_qk_t). MiKV's high-precision rows are attended tile by tile in place of the low-bit rows they
replace, and the attention mass of the ring (and of a chunk's own tokens) is recomputed afterwards
from the log-sum-exp. The last split covers
the window ring (and a prefill chunk's own tokens) and split 0 the sinks; with RING_SPLIT the last
split holds no history and covers the sinks too, so that no program does a history split's work plus
the ring's. Partial (max, sum, acc) per split are merged by a second small kernel, or written
directly when there is one split.
Lengths live on the device, so a launch is valid for any fill level and can be captured in a
CUDA graph. Its plain-PyTorch twin is kernels.reference.decode_attention.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dequant import _meta, dequant_channels, dequant_tokens, field, rope_halves, rope_rows, subnormal_field
from kernels.layout import HiRows, History, PreRope, Spec

LOG2E = 1.4426950408889634
CAPPED_REGISTERS, CAPPED_PER_SM = 168, 3  # see register_capped


@triton.jit
def _qk(q_lo, q_hi, k_lo, k_hi, PREC: tl.constexpr):
    """Scores (GP, N) of queries and keys given as halves (N, D/2)."""
    dt = q_lo.dtype
    s = tl.dot(q_lo, tl.trans(k_lo.to(dt)), input_precision=PREC)
    return s + tl.dot(q_hi, tl.trans(k_hi.to(dt)), input_precision=PREC)


@triton.jit
def _qk_t(q_lo, q_hi, k_lo, k_hi, PREC: tl.constexpr):
    """Scores transposed, (N, GP): the keys are the first operand, so keys that come out of a product
    (pre-RoPE keys through the key matrix) reach the tensor cores in registers, where as the second
    operand they went through shared memory."""
    dt = q_lo.dtype
    s = tl.dot(k_lo.to(dt), tl.trans(q_lo), input_precision=PREC)
    return s + tl.dot(k_hi.to(dt), tl.trans(q_hi), input_precision=PREC)


@triton.jit
def _rescale(m_i, m_tile):
    """Online softmax with a tile whose scores peak at m_tile: the new max, the reference the tile's
    exponents subtract (0 while nothing is seen, to keep exp2 finite) and the rescale of what came before."""
    m_new = tl.maximum(m_i, m_tile)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_ref, tl.exp2(m_i - m_ref)


@triton.jit
def _softmax_step(s, ok, m_i, l_i):
    """Online softmax over a tile with visibility `ok` (broadcast to the scores): probabilities
    (log2 domain), the rescale of what came before, the new max and sum."""
    s = tl.where(ok, s, float("-inf"))
    m_new, m_ref, alpha = _rescale(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_ref[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _softmax_step_t(st, ok, m_i, l_i):
    """_softmax_step over transposed scores st (N, M) with visibility ok (broadcast to them); the
    probabilities come back as (M, N). Only the small probability tile is transposed."""
    st = tl.where(ok, st, float("-inf"))
    m_new, m_ref, alpha = _rescale(m_i, tl.max(st, 0))
    pt = tl.exp2(st - m_ref[None, :])
    return tl.trans(pt), alpha, m_new, l_i * alpha + tl.sum(pt, 0)


@triton.jit
def _softmax_step_hi(s, ok, sh, okh, m_i, l_i):
    """_softmax_step over a history tile's low-bit rows (s, ok) and MiKV's high-precision rows (sh, okh)
    at once: one rescale per tile instead of two (0.473 -> 0.462 ms at B=8, S=32K on an H100)."""
    s = tl.where(ok, s, float("-inf"))
    sh = tl.where(okh, sh, float("-inf"))
    m_new, m_ref, alpha = _rescale(m_i, tl.maximum(tl.max(s, 1), tl.max(sh, 1)))
    p = tl.exp2(s - m_ref[:, None])
    ph = tl.exp2(sh - m_ref[:, None])
    return p, ph, alpha, m_new, l_i * alpha + tl.sum(p, 1) + tl.sum(ph, 1)


@triton.jit
def _merge_slots(m_i, l_i, acc, acc_h, SLOTS: tl.constexpr):
    """Rows (SLOTS * R,) of partial softmaxes over disjoint tokens merged into (R,): max, sum, both accumulators."""
    R: tl.constexpr = m_i.shape[0] // SLOTS
    D: tl.constexpr = acc.shape[1]
    m3 = tl.reshape(m_i, (SLOTS, R))
    m_new = tl.max(m3, 0)
    _, _, w = _rescale(m3, m_new[None, :])  # each slot's weight against the merged max
    l_new = tl.sum(tl.reshape(l_i, (SLOTS, R)) * w, 0)
    acc = tl.sum(tl.reshape(acc, (SLOTS, R, D)) * w[:, :, None], 0)
    acc_h = tl.sum(tl.reshape(acc_h, (SLOTS, R, D)) * w[:, :, None], 0)
    return m_new, l_new, acc, acc_h


@triton.jit
def _accumulate(acc, acc_h, alpha, pv, SPLIT_V: tl.constexpr):
    """Rescale both accumulators and add a history tile's p @ v, kept apart in stored space with SPLIT_V."""
    if SPLIT_V:
        acc, acc_h = acc * alpha[:, None], acc_h * alpha[:, None] + pv
    else:
        acc = acc * alpha[:, None] + pv
    return acc, acc_h


@triton.jit
def _ring_ok(slot, n_hist, length, n_sink, R):
    """Which ring slots hold a token: slot (pos - n_sink) % R holds positions n_sink + n_hist .. length-1."""
    return (slot - n_hist % R + R) % R < length - n_sink - n_hist


@triton.jit
def _full_tile(k_ptr, v_ptr, rows, ok, D: tl.constexpr):
    """Keys as halves and values of full-precision rows (sinks, window)."""
    dh = tl.arange(0, D // 2)
    k_lo = tl.load(k_ptr + rows[:, None] * D + dh[None, :], mask=ok[:, None], other=0.0)
    k_hi = tl.load(k_ptr + rows[:, None] * D + D // 2 + dh[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(v_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
    return k_lo, k_hi, v


@triton.jit
def _load_q(q_ptr, qrow, head_ok, qk_scale, CH0: tl.constexpr, NCH: tl.constexpr, D: tl.constexpr,
            HALF: tl.constexpr):
    """Channels CH0.. (M, NCH) of the queries, pre-scaled into the log2 domain, in q's dtype, or float16
    with HALF."""
    rows = q_ptr + qrow[:, None] * D + CH0 + tl.arange(0, NCH)[None, :]
    q = tl.load(rows, mask=head_ok[:, None], other=0.0).to(tl.float32) * qk_scale
    return q.to(tl.float16) if HALF else q.to(q_ptr.dtype.element_ty)


@triton.jit
def _history_keys(hk_ptr, ks_ptr, kz_ptr, kmat_ptr, cos_ptr, sin_ptr, tok, ok, meta_row, base, ci, si, hk,
                  K_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, K_GROUP: tl.constexpr, K_NG: tl.constexpr,
                  ROPE: tl.constexpr, KMAT: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                  NBLK: tl.constexpr, PREC: tl.constexpr, HALF: tl.constexpr):
    """Dequantized history keys of one tile as halves (N, D/2), in attention space, float16 with
    HALF. KMAT 1: through a per-head key matrix; 2: through the block A of a Walsh-Hadamard matrix
    [[A, A], [A, -A]], two half-size products (kernels.layout). With HALF the key matrix product also
    runs in float16, accumulating too (its error stays well under the 4-bit codes'; 2-3 % faster than
    accumulating in float32 on an H100)."""
    KB: tl.constexpr = D * K_BITS // 8
    rows = hk_ptr + tok * KB
    if KMAT == 1:  # stored space -> pre-RoPE attention space through a per-head matrix, then RoPE
        if K_PER_CHANNEL:
            k = dequant_channels(rows, ok, meta_row, ks_ptr, kz_ptr, K_BITS, 0, D, NBLK, BLOCK_N, D, HALF)
        else:
            k = dequant_tokens(rows, tok * (D // K_GROUP), ok, ks_ptr, kz_ptr, K_BITS, 0, D, K_GROUP,
                               D // K_GROUP, BLOCK_N, D, HALF)
        m = kmat_ptr + hk * D * D + tl.arange(0, D)[:, None] * D + tl.arange(0, D // 2)[None, :]
        if HALF:
            k_lo = tl.dot(k, tl.load(m).to(tl.float16), out_dtype=tl.float16)
            k_hi = tl.dot(k, tl.load(m + D // 2).to(tl.float16), out_dtype=tl.float16)
        else:
            k_lo = tl.dot(k, tl.load(m).to(k.dtype), input_precision=PREC).to(k.dtype)
            k_hi = tl.dot(k, tl.load(m + D // 2).to(k.dtype), input_precision=PREC).to(k.dtype)
    elif K_PER_CHANNEL:
        k_lo = dequant_channels(rows, ok, meta_row, ks_ptr, kz_ptr, K_BITS, 0, D // 2, NBLK, BLOCK_N, D, HALF)
        k_hi = dequant_channels(rows, ok, meta_row, ks_ptr, kz_ptr, K_BITS, D // 2, D // 2, NBLK, BLOCK_N, D, HALF)
    else:
        meta = tok * (D // K_GROUP)
        k_lo = dequant_tokens(rows, meta, ok, ks_ptr, kz_ptr, K_BITS, 0, D // 2, K_GROUP, K_NG, BLOCK_N, D, HALF)
        k_hi = dequant_tokens(rows, meta, ok, ks_ptr, kz_ptr, K_BITS, D // 2, D // 2, K_GROUP, K_NG, BLOCK_N, D,
                              HALF)
    if KMAT == 2:  # [k_lo, k_hi] @ [[A, A], [A, -A]]
        m = tl.load(kmat_ptr + tl.arange(0, D // 2)[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :])
        if HALF:
            u = tl.dot(k_lo, m.to(tl.float16), out_dtype=tl.float16)
            w = tl.dot(k_hi, m.to(tl.float16), out_dtype=tl.float16)
        else:
            u = tl.dot(k_lo, m.to(k_lo.dtype), input_precision=PREC).to(k_lo.dtype)
            w = tl.dot(k_hi, m.to(k_lo.dtype), input_precision=PREC).to(k_lo.dtype)
        k_lo, k_hi = u + w, u - w
    if ROPE:
        k_lo, k_hi = rope_halves(k_lo, k_hi, cos_ptr, sin_ptr, base, ci, si, D)
    return k_lo, k_hi


@triton.jit
def _fields_qk_t(q, byt, BITS: tl.constexpr, K0: tl.constexpr, STEP: tl.constexpr, N: tl.constexpr,
                 PREC: tl.constexpr, HALF: tl.constexpr):
    """Transposed scores (N_tok, M) of the queries q against the codes in the N fields K0, K0 + STEP, ... of
    the bytes byt (N_tok, NB). q's columns are the channels of those fields, interleaved; its even and odd
    columns are the two halves of the run, as in _fields_pv."""
    if N == 1:
        k = subnormal_field(byt, BITS, K0, HALF)
        out = tl.dot(k, tl.trans(q.to(k.dtype)), input_precision=PREC)
    else:
        q_even, q_odd = tl.split(tl.reshape(q, (q.shape[0], q.shape[1] // 2, 2)))
        out = _fields_qk_t(q_even, byt, BITS, K0, 2 * STEP, N // 2, PREC, HALF)
        out += _fields_qk_t(q_odd, byt, BITS, K0 + STEP, 2 * STEP, N // 2, PREC, HALF)
    return out


@triton.jit
def _history_qk_t(q, hk_ptr, ks_ptr, kz_ptr, tok, ok, meta_row, K_BITS: tl.constexpr, NBLK: tl.constexpr,
                  D: tl.constexpr, PREC: tl.constexpr, HALF: tl.constexpr):
    """Transposed scores (N, M) of q (M, D) against a tile of per-channel keys, one product per field of the
    packed bytes (field k holds channels k, k + 8/K_BITS, ...), each field's codes reaching the tensor cores
    in registers as the first operand (keys_by_fields says where this pays). Row r of q belongs to block
    slot r // (M / NBLK) of the tile, and the scales and zero-points of that block are folded into it:
    q·(s∘c + z) = (q∘s)·c + q·z, so only the codes are unpacked per element. Scaling each code instead
    took an fma.f16x2 per pair of codes, and the scales, gathered per field and paired per register,
    about as many byte permutes again (ptxas for sm_90). Scores of a row against the other blocks' tokens
    are meaningless; the caller masks them."""
    KB: tl.constexpr = D * K_BITS // 8
    PER: tl.constexpr = 8 // K_BITS
    M: tl.constexpr = q.shape[0]
    byt = tl.load(hk_ptr + tok[:, None] * KB + tl.arange(0, KB)[None, :], mask=ok[:, None], other=0)
    meta = meta_row + tl.arange(0, NBLK)[:, None] * D + tl.arange(0, D)[None, :]
    blk_live = tl.max(tl.reshape(ok.to(tl.int32), (NBLK, tok.shape[0] // NBLK)), 1) > 0
    s = tl.reshape(tl.broadcast_to(_meta(ks_ptr, meta, blk_live[:, None], HALF)[:, None, :], (NBLK, M // NBLK, D)),
                   (M, D))
    z = tl.reshape(tl.broadcast_to(_meta(kz_ptr, meta, blk_live[:, None], HALF)[:, None, :], (NBLK, M // NBLK, D)),
                   (M, D))
    bias = tl.sum(q.to(tl.float32) * z.to(tl.float32), 1)
    UNIT: tl.constexpr = 2.0 ** -24 if HALF else 1.0  # what a code of 1 is worth (dequant.subnormal_field)
    return _fields_qk_t(q * s, byt, K_BITS, 0, 1, PER, PREC, HALF) * (1.0 / UNIT) + bias[None, :]


@triton.jit
def _fields_pv(p, byt, s, z, BITS: tl.constexpr, K0: tl.constexpr, STEP: tl.constexpr, N: tl.constexpr,
               PAIRS: tl.constexpr, PREC: tl.constexpr, HALF: tl.constexpr):
    """p @ (the values of field k of the bytes byt (N_tok, D*BITS/8), dequantized by per-byte s and z) for
    the N fields k = K0, K0 + STEP, ..., stacked along a new last axis in that order. A join adds its
    axis last, so the two halves are the even and the odd fields of the run. With PAIRS each product
    takes fields k and k + 4 side by side, columns (byte, k or k + 4), and s and z twice as wide."""
    if N == 1:
        codes = field(byt, BITS, K0, HALF)
        if PAIRS:
            codes = tl.reshape(tl.join(codes, field(byt, BITS, K0 + 4, HALF)), (byt.shape[0], 2 * byt.shape[1]))
        v = codes * s + z
        out = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    else:
        out = tl.join(_fields_pv(p, byt, s, z, BITS, K0, 2 * STEP, N // 2, PAIRS, PREC, HALF),
                      _fields_pv(p, byt, s, z, BITS, K0 + STEP, 2 * STEP, N // 2, PAIRS, PREC, HALF))
    return out


@triton.jit
def _history_pv(p, hv_ptr, vs_ptr, vz_ptr, tok, ok, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
                V_NG: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                HALF: tl.constexpr):
    """p (M, N) @ the history values of a tile (N, D), one product per field of the packed bytes: field k
    holds channels k, k + 8/V_BITS, ... Each field is dequantized elementwise from the bytes, so it
    reaches the tensor cores in registers; dequantizing the whole (N, D) tile first made it go through
    shared memory, which bounded the kernel (docs/SPEED.md). The products' columns are interleaved back
    into channel order. Needs groups of whole bytes and V_BITS in {1, 2, 4, 8}. 1-bit codes go in pairs
    of fields, four (N × 2D/8) products instead of eight (N × D/8): the eight spilled registers, and
    k2v1 at B=8, S=32K on an H100 took 0.633 ms against 0.461 in pairs (docs/SPEED.md)."""
    NB: tl.constexpr = D * V_BITS // 8
    byt = tl.load(hv_ptr + tok[:, None] * NB + tl.arange(0, NB)[None, :], mask=ok[:, None], other=0)
    meta = tok[:, None] * V_NG + tl.arange(0, V_NG)[None, :]
    s = _meta(vs_ptr, meta, ok[:, None], HALF)  # (N, V_NG), spread to the bytes of each group
    z = _meta(vz_ptr, meta, ok[:, None], HALF)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, V_NG, NB // V_NG)), (BLOCK_N, NB))
    z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, V_NG, NB // V_NG)), (BLOCK_N, NB))
    PAIRS: tl.constexpr = V_BITS == 1
    if PAIRS:  # the products stack as (byte, which of k and k + 4, k): channel 8 * byte + 4 * which + k
        s = tl.reshape(tl.join(s, s), (BLOCK_N, 2 * NB))
        z = tl.reshape(tl.join(z, z), (BLOCK_N, 2 * NB))
    N_PRODUCTS: tl.constexpr = 4 if PAIRS else 8 // V_BITS
    return tl.reshape(_fields_pv(p, byt, s, z, V_BITS, 0, 1, N_PRODUCTS, PAIRS, PREC, HALF), (p.shape[0], D))


@triton.jit
def _hi_tile(hk_ptr, hv_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, idx_ptr, kmat_ptr, cos_ptr, sin_ptr, bh, C_hi, t,
             n_hist, pos0, ci, si, hk, HI_BITS: tl.constexpr, HI_ROWS: tl.constexpr, HP: tl.constexpr,
             G: tl.constexpr, K_GROUP: tl.constexpr, K_NG: tl.constexpr, V_GROUP: tl.constexpr, V_NG: tl.constexpr,
             ROPE: tl.constexpr, KMAT: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
             HALF: tl.constexpr):
    """MiKV: the high-precision rows of history tile t, as (history row each replaces (HP,), -1
    where none; key halves; values). They are the rows of the blocks the tile covers (of the one
    block holding it when tiles are smaller than blocks) whose history row falls in the tile."""
    j = (t * BLOCK_N // G) * HI_ROWS + tl.arange(0, HP)
    filled = (tl.arange(0, HP) < tl.maximum(BLOCK_N // G, 1) * HI_ROWS) & (j < n_hist // G * HI_ROWS)
    row = tl.load(idx_ptr + bh * C_hi + j, mask=filled, other=-1)
    ok = filled & (row >= t * BLOCK_N) & (row < t * BLOCK_N + BLOCK_N)
    row = tl.where(ok, row, -1)
    tok = bh * C_hi + j
    k_lo, k_hi = _history_keys(hk_ptr, ks_ptr, kz_ptr, kmat_ptr, cos_ptr, sin_ptr, tok, ok, 0, 0, ci, si, hk,
                               HI_BITS, False, K_GROUP, K_NG, False, KMAT, HP, D, 1, PREC, HALF)
    if ROPE:
        k_lo, k_hi = rope_rows(k_lo, k_hi, cos_ptr, sin_ptr, pos0 + row, ok, D)
    v = dequant_tokens(hv_ptr + tok * (D * HI_BITS // 8), tok * (D // V_GROUP), ok, vs_ptr, vz_ptr, HI_BITS, 0, D,
                       V_GROUP, V_NG, HP, D, HALF)
    return row, k_lo, k_hi, v


@triton.jit
def _replaced(idx_ptr, bh, C_hi, t, rows, n_hist, HI_ROWS: tl.constexpr, HI_P: tl.constexpr, G: tl.constexpr,
              NBLK: tl.constexpr, BLOCK_N: tl.constexpr):
    """MiKV: which rows of history tile t have high-precision twins. Each row is compared with its own
    block's HI_ROWS indices only (against all the tile's: 7 % slower at B=8, S=32K on an H100)."""
    blk = t * BLOCK_N // G + tl.arange(0, NBLK)
    r = tl.arange(0, HI_P)
    live = (r[None, :] < HI_ROWS) & (blk[:, None] < n_hist // G)
    idx = tl.load(idx_ptr + bh * C_hi + blk[:, None] * HI_ROWS + r[None, :], mask=live, other=-1)
    hit = tl.reshape(rows, (NBLK, BLOCK_N // NBLK))[:, :, None] == idx[:, None, :]
    return tl.reshape(tl.max(hit.to(tl.int32), 2), (BLOCK_N,)) > 0


@triton.jit
def _attention_kernel(
    q_ptr, qh_ptr, kn_ptr, vn_ptr, sk_ptr, sv_ptr, len_ptr,
    hk_ptr, hv_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, nh_ptr,
    wk_ptr, wv_ptr,
    cos_ptr, sin_ptr, pos0_ptr, kmat_ptr,
    hik_ptr, hiv_ptr, hks_ptr, hkz_ptr, hvs_ptr, hvz_ptr, hidx_ptr,
    o_ptr, oh_ptr, m_ptr, l_ptr,
    qk_scale, Hkv, T, n_sink, R, C_h, n_pos, C_hi,
    GROUP: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, SINK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLITS: tl.constexpr, NBLK: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, G: tl.constexpr,
    K_GROUP: tl.constexpr, K_NG: tl.constexpr, V_GROUP: tl.constexpr, V_NG: tl.constexpr,
    ROPE: tl.constexpr, KMAT: tl.constexpr, SPLIT_V: tl.constexpr, DIRECT: tl.constexpr, CHUNK: tl.constexpr,
    RING_SPLIT: tl.constexpr, K_FIELDS: tl.constexpr,
    HI_BITS: tl.constexpr, HI_ROWS: tl.constexpr, HP: tl.constexpr, HI_P: tl.constexpr, PREC: tl.constexpr,
    HALF: tl.constexpr,
):
    """Program (sequence x KV head, query block, split). Its M = GP * BM rows are the GP query heads
    of the KV group times BM query tokens, so every key and value tile is loaded once for them all. With
    keys by fields the rows are SLOTS = NBLK copies of those, slot j attending block j of each history tile
    (_history_qk_t) and slot 0 the full-precision rows; the copies are merged like splits at the end."""
    M: tl.constexpr = GP * BM
    SLOTS: tl.constexpr = NBLK if K_FIELDS else 1
    bh = tl.program_id(0)
    qb = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // Hkv
    r = tl.arange(0, M)
    slot = r // (M // SLOTS)
    head = r % (M // SLOTS) // BM
    tq = qb * BM + r % BM  # query token within the chunk
    row_ok = (head < GROUP) & (tq < T)
    qrow = (bh * GROUP + head) * T + tq  # flat (sequence, query head, token)
    first = (slot == 0)[:, None]  # the rows that attend the sinks, the ring and a chunk's own tokens
    # Every tile's arithmetic, the full-precision rows' (sinks, ring, a chunk's own tokens) as the history's:
    # float16 for 16-bit models (in bfloat16 the scaled queries and the probabilities would keep 3 bits fewer).
    q_lo = _load_q(q_ptr, qrow, row_ok, qk_scale, 0, D // 2, D, HALF)
    q_hi = _load_q(q_ptr, qrow, row_ok, qk_scale, D // 2, D // 2, D, HALF)
    dt = q_lo.dtype
    length = tl.load(len_ptr + b)
    n_hist = tl.load(nh_ptr + b)

    m_i = tl.full((M,), float("-inf"), tl.float32)
    l_i = tl.zeros((M,), tl.float32)
    acc = tl.zeros((M, D), tl.float32)  # everything but the history when SPLIT_V
    acc_h = tl.zeros((M, D), tl.float32)  # history values kept in their stored (rotated) space

    HIST_SPLITS: tl.constexpr = SPLITS - 1 if RING_SPLIT else SPLITS
    if SINK_P > 0:
        if split == (SPLITS - 1 if RING_SPLIT else 0):
            rows = tl.arange(0, SINK_P)
            ok = (rows < n_sink) & (rows < length)
            k_lo, k_hi, v = _full_tile(sk_ptr + bh * n_sink * D, sv_ptr + bh * n_sink * D, rows, ok, D)
            p, alpha, m_i, l_i = _softmax_step(_qk(q_lo, q_hi, k_lo, k_hi, PREC), ok[None, :] & first, m_i, l_i)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt), input_precision=PREC)

    # History: this split's share of the tiles the sequence holds.
    if K_FIELDS:  # whole rows, split by field in _history_qk_t
        qh = _load_q(qh_ptr, qrow, row_ok, qk_scale, 0, D, D, HALF)
    else:  # halves, for RoPE
        qh_lo = _load_q(qh_ptr, qrow, row_ok, qk_scale, 0, D // 2, D, HALF)
        qh_hi = _load_q(qh_ptr, qrow, row_ok, qk_scale, D // 2, D // 2, D, HALF)
    n_tiles = tl.cdiv(n_hist, BLOCK_N)
    per_split = tl.cdiv(n_tiles, HIST_SPLITS)  # with RING_SPLIT the last split starts past the end
    t_end = tl.minimum(split * per_split + per_split, n_tiles)
    VB: tl.constexpr = D * V_BITS // 8
    # Values one field at a time (_history_pv) in decode; prefill chunks, whose M query rows make the
    # interleaving of the products cost more, kept the whole-tile form (512-token chunk over 32K tokens
    # on an H100, K4V2 before RoPE: 4.0 ms whole-tile, 5.1 ms by fields).
    V_FIELDS: tl.constexpr = V_BITS != 3 and V_GROUP * V_BITS >= 8 and not CHUNK
    pos0 = 0
    ci = tl.zeros((BLOCK_N, D // 2), dt)
    si = tl.zeros((BLOCK_N, D // 2), dt)
    if ROPE:  # tables of the in-tile offsets; each tile adds its base angle
        pos0 = tl.load(pos0_ptr + b)
        offs = tl.arange(0, BLOCK_N)[:, None] * D + tl.arange(0, D // 2)[None, :]
        in_table = tl.arange(0, BLOCK_N)[:, None] < n_pos
        ci = tl.load(cos_ptr + offs, mask=in_table, other=0.0).to(dt)
        si = tl.load(sin_ptr + offs, mask=in_table, other=0.0).to(dt)
    for t in range(split * per_split, t_end):
        rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rows < n_hist
        tok = bh * C_h + rows
        meta_row = (bh * (C_h // G) + t * BLOCK_N // G) * D
        if K_FIELDS:
            in_slot = ok[:, None] & ((tl.arange(0, BLOCK_N) // G)[:, None] == slot[None, :])
            p, alpha, m_i, l_i = _softmax_step_t(_history_qk_t(qh, hk_ptr, ks_ptr, kz_ptr, tok, ok, meta_row, K_BITS,
                                                               NBLK, D, PREC, HALF), in_slot, m_i, l_i)
        else:
            k_lo, k_hi = _history_keys(hk_ptr, ks_ptr, kz_ptr, kmat_ptr, cos_ptr, sin_ptr, tok, ok, meta_row,
                                       pos0 + t * BLOCK_N, ci, si, bh % Hkv, K_BITS, K_PER_CHANNEL, K_GROUP, K_NG,
                                       ROPE, KMAT, BLOCK_N, D, NBLK, PREC, HALF)
            if HI_ROWS > 0:  # MiKV: rows with high-precision twins are attended through those instead
                hrow, hk_lo, hk_hi, hv = _hi_tile(hik_ptr, hiv_ptr, hks_ptr, hkz_ptr, hvs_ptr, hvz_ptr, hidx_ptr,
                                                  kmat_ptr, cos_ptr, sin_ptr, bh, C_hi, t, n_hist, pos0, ci, si,
                                                  bh % Hkv, HI_BITS, HI_ROWS, HP, G, K_GROUP, K_NG, V_GROUP, V_NG,
                                                  ROPE, KMAT, BLOCK_N, D, PREC, HALF)
                ok = ok & ~_replaced(hidx_ptr, bh, C_hi, t, rows, n_hist, HI_ROWS, HI_P, G, NBLK, BLOCK_N)
                p, ph, alpha, m_i, l_i = _softmax_step_hi(_qk(qh_lo, qh_hi, k_lo, k_hi, PREC), ok[None, :],
                                                          _qk(qh_lo, qh_hi, hk_lo, hk_hi, PREC), (hrow >= 0)[None, :],
                                                          m_i, l_i)
            elif KMAT > 0 and not CHUNK:  # keys out of a product: scores transposed (_qk_t); prefill not timed
                p, alpha, m_i, l_i = _softmax_step_t(_qk_t(qh_lo, qh_hi, k_lo, k_hi, PREC), ok[:, None], m_i, l_i)
            else:
                p, alpha, m_i, l_i = _softmax_step(_qk(qh_lo, qh_hi, k_lo, k_hi, PREC), ok[None, :], m_i, l_i)
        if V_FIELDS:
            pv = _history_pv(p, hv_ptr, vs_ptr, vz_ptr, tok, ok, V_BITS, V_GROUP, V_NG, BLOCK_N, D, PREC, HALF)
        else:  # the whole tile dequantized first
            v = dequant_tokens(hv_ptr + tok * VB, tok * V_NG, ok, vs_ptr, vz_ptr, V_BITS, 0, D, V_GROUP, V_NG,
                               BLOCK_N, D, HALF)
            pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if HI_ROWS > 0:
            pv += tl.dot(ph.to(hv.dtype), hv, input_precision=PREC)
        acc, acc_h = _accumulate(acc, acc_h, alpha, pv, SPLIT_V)

    if split == SPLITS - 1:
        # The ring: the slots that hold a token (_ring_ok).
        for w0 in range(0, R, BLOCK_W):
            rows = w0 + tl.arange(0, BLOCK_W)
            ok = (rows < R) & _ring_ok(rows, n_hist, length, n_sink, R)
            k_lo, k_hi, v = _full_tile(wk_ptr + bh * R * D, wv_ptr + bh * R * D, rows, ok, D)
            p, alpha, m_i, l_i = _softmax_step(_qk(q_lo, q_hi, k_lo, k_hi, PREC), ok[None, :] & first, m_i, l_i)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt), input_precision=PREC)
            acc_h = acc_h * alpha[:, None]
        if CHUNK:  # the chunk's own tokens, causally
            for j0 in range(0, tl.minimum(T, qb * BM + BM), BLOCK_W):
                rows = j0 + tl.arange(0, BLOCK_W)
                ok = rows < T
                k_lo, k_hi, v = _full_tile(kn_ptr + bh * T * D, vn_ptr + bh * T * D, rows, ok, D)
                vis = ok[None, :] & (rows[None, :] <= tq[:, None])
                p, alpha, m_i, l_i = _softmax_step(_qk(q_lo, q_hi, k_lo, k_hi, PREC), vis, m_i, l_i)
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt), input_precision=PREC)
                acc_h = acc_h * alpha[:, None]

    if SLOTS > 1:  # merge the slots' partial softmaxes, as the combine kernel merges splits
        m_i, l_i, acc, acc_h = _merge_slots(m_i, l_i, acc, acc_h, SLOTS)
        qrow = tl.reshape(qrow, (SLOTS, M // SLOTS)).max(0)
        row_ok = tl.reshape(row_ok.to(tl.int32), (SLOTS, M // SLOTS)).max(0) > 0
    dd = tl.arange(0, D)
    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + qrow[:, None] * D + dd[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (qrow * SPLITS + split)[:, None] * D + dd[None, :]
        tl.store(o_ptr + part, acc, mask=row_ok[:, None])
        if SPLIT_V:
            tl.store(oh_ptr + part, acc_h, mask=row_ok[:, None])
    tl.store(m_ptr + qrow * SPLITS + split, m_i, mask=row_ok)
    tl.store(l_ptr + qrow * SPLITS + split, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(part_ptr, part_h_ptr, vmat_ptr, m_ptr, l_ptr, o_ptr, lse_ptr, SPLITS: tl.constexpr,
                    SPLITS_P: tl.constexpr, D: tl.constexpr, SPLIT_V: tl.constexpr, CHUNK: tl.constexpr):
    """Merge the splits of one query row (sequence, head, token); with SPLIT_V the history part of the output
    is mapped back from stored space by the matrix vmat (D, D). Leaves the log2-sum-exp for MiKV."""
    h = tl.program_id(0)
    sp = tl.arange(0, SPLITS_P)
    sp_ok = sp < SPLITS
    m = tl.load(m_ptr + h * SPLITS + sp, mask=sp_ok, other=float("-inf"))
    l = tl.load(l_ptr + h * SPLITS + sp, mask=sp_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_ref)
    total = tl.sum(l * w, 0)
    dd = tl.arange(0, D)
    rows = (h * SPLITS + sp)[:, None] * D
    acc = tl.load(part_ptr + rows + dd[None, :], mask=sp_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0)
    if SPLIT_V:
        for c0 in range(0, D, CHUNK):
            cc = c0 + tl.arange(0, CHUNK)
            acc_h = tl.load(part_h_ptr + rows + cc[None, :], mask=sp_ok[:, None], other=0.0)
            x = tl.sum(acc_h * w[:, None], 0)
            mat = tl.load(vmat_ptr + cc[:, None] * D + dd[None, :]).to(tl.float32)
            out += tl.sum(x[:, None] * mat, 0)
    out = out / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + h * D + dd, out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + h, m_ref + tl.log2(total))


@functools.cache
def _multiprocessors() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 8


def num_splits(batch: int, n_kv_heads: int, n_tokens: int, block_n: int, min_tiles: int = 1, per_sm: int = 4) -> int:
    """Splits enough for about `per_sm` programs per multiprocessor but not more (a few programs
    spilling into a second wave cost 20 % on an H100), none with fewer than `min_tiles` tiles.
    At batch 1 the shortest programs win: K4V2 over 1K tokens took 43 us with 4 tiles per split,
    26 us with one (fp16 SDPA: 12 us)."""
    by_occupancy = per_sm * _multiprocessors() // (batch * n_kv_heads)
    by_work = triton.cdiv(triton.cdiv(n_tokens, block_n), min_tiles)
    return max(1, min(by_occupancy, by_work, 256))


def keys_by_fields(spec: Spec, rope: PreRope | None) -> bool:
    """Whether decode attends the history's keys one field at a time (_history_qk_t): 2- and 4-bit
    per-channel keys after RoPE. On an H100 at B=8, S=32K, with the scales folded into the query and the
    codes unpacked two bytes at a time: K4V2 0.178 ms (0.218 by fields before those two, 0.311 as whole
    tiles), kivi2 0.176 (0.202 as whole tiles; by fields it lost, 0.249, while it gathered its scales per
    field). 8-bit keys went from 0.286 to 0.361 ms by fields (int8) and keep whole tiles. A field's product
    needs 16 bytes a row or more (the tensor cores' shortest reduction), so 2-bit keys need head dim 64."""
    return (rope is None and spec.k_per_channel and spec.k_bits in (2, 4) and spec.hi_rows == 0
            and spec.head_dim * spec.k_bits >= 128)


def register_capped(spec: Spec, rope: PreRope | None, dtype: torch.dtype) -> bool:
    """Whether a decode launch is capped at CAPPED_REGISTERS and split for one wave of CAPPED_PER_SM programs
    per multiprocessor: keys by fields and 4-bit pre-RoPE keys, of 16-bit models (where it was measured;
    fp32 tiles take twice the registers). The cap spills a few bytes but fits three programs per
    multiprocessor instead of two. On an H100 at B=8, S=32K: 4-bit keys after RoPE (K4V2's bits) 0.247 ms
    uncapped, 0.218 capped, 0.223 capped in two waves; K4V2 before RoPE 0.502 -> 0.465 ms (at B=1 over 4K tokens 0.032
    -> 0.029, over 1K 0.0220 -> 0.0226); rotatekv's 2-bit pre-RoPE keys would spill 828 bytes."""
    four_bit_pre_rope = rope is not None and spec.k_bits == 4 and spec.hi_rows == 0
    return dtype != torch.float32 and (keys_by_fields(spec, rope) or four_bit_pre_rope)


def attention(q: Tensor, k_new: Tensor | None, v_new: Tensor | None, sink_k: Tensor, sink_v: Tensor,
              lengths: Tensor, hist: History, spec: Spec, n_hist: Tensor, win_k: Tensor, win_v: Tensor, *,
              q_hist: Tensor | None, rope: PreRope | None, key_matrix: Tensor | None, value_matrix: Tensor | None,
              scale: float | None, mass: Tensor | None, hi: HiRows | None, splits: int, block_m: int, block_n: int,
              block_w: int, num_warps: int, num_stages: int | None = None, ring_split: bool = False,
              maxnreg: int | None = None) -> Tensor:
    """Launch for q (B, Hq, T, D): decode (T = 1, no k_new) or a prefill chunk (k_new, v_new (B, Hkv, T, D)),
    the history in `splits` splits, and with `ring_split` one more for the sinks and the ring."""
    splits += ring_split
    B, Hq, T, D = q.shape
    Hkv, n_sink, R, C_h = sink_k.shape[1], sink_k.shape[2], win_k.shape[2], hist.k.shape[2]
    group = Hq // Hkv
    q_hist = q if q_hist is None else q_hist
    chunk = k_new is not None
    k_new, v_new = (k_new, v_new) if chunk else (q, q)  # placeholders for decode
    hi_tensors = [*hi.rows, hi.idx] if hi is not None else [hist.k] * 7  # placeholders without MiKV
    if not all(t.is_contiguous() for t in (q, q_hist, k_new, v_new, sink_k, sink_v, *hist, win_k, win_v, *hi_tensors)):
        raise ValueError("the attention kernels need contiguous tensors")
    if (hi is None) != (spec.hi_rows == 0):
        raise ValueError("high-precision rows go with a spec that counts them (Spec.hi_rows)")
    if key_matrix is not None and rope is None:
        raise ValueError("without pre-RoPE keys, fold the key matrix into q_hist")
    split_v = value_matrix is not None
    direct = splits == 1 and not split_v
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 models: exact fp32 dots
    qk_scale = (scale or 1 / math.sqrt(D)) * LOG2E
    f32 = dict(device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    part = out if direct else torch.empty(B, Hq, T, splits, D, **f32)
    part_h = torch.empty(B, Hq, T, splits, D, **f32) if split_v else part
    m = torch.empty(B, Hq, T, splits, **f32)
    l = torch.empty(B, Hq, T, splits, **f32)
    cos, sin, pos0 = rope if rope is not None else (q, q, lengths)  # placeholders when ROPE is off
    gp = triton.next_power_of_2(group)
    bm = max(block_m, 16 // gp) if chunk else 1
    k_fields = not chunk and keys_by_fields(spec, rope)
    nblk = max(1, block_n // spec.block)  # blocks a history tile spans; with k_fields, copies of the rows
    _attention_kernel[(B * Hkv, triton.cdiv(T, bm), splits)](
        q, q_hist, k_new, v_new, sink_k, sink_v, lengths, *hist, n_hist, win_k, win_v, cos, sin, pos0,
        q if key_matrix is None else key_matrix, *hi_tensors, part, part_h, m, l,
        qk_scale, Hkv, T, n_sink, R, C_h, cos.shape[0], 0 if hi is None else hi.idx.shape[2],
        GROUP=group, GP=gp if chunk else max(16, gp * (nblk if k_fields else 1)), BM=bm, D=D,
        SINK_P=0 if n_sink == 0 else max(16, triton.next_power_of_2(n_sink)),
        BLOCK_N=block_n, BLOCK_W=block_w, SPLITS=splits, NBLK=nblk,
        K_BITS=spec.k_bits, V_BITS=spec.v_bits, K_PER_CHANNEL=spec.k_per_channel, G=spec.block,
        K_GROUP=spec.k_group, K_NG=max(1, D // 2 // spec.k_group), V_GROUP=spec.v_group, V_NG=D // spec.v_group,
        ROPE=rope is not None, KMAT=0 if key_matrix is None else 1 if key_matrix.dim() == 3 else 2,
        SPLIT_V=split_v, DIRECT=direct, CHUNK=chunk,
        RING_SPLIT=ring_split, K_FIELDS=k_fields,
        HI_BITS=spec.hi_bits, HI_ROWS=spec.hi_rows,
        HP=max(16, triton.next_power_of_2(nblk * spec.hi_rows)),
        HI_P=triton.next_power_of_2(max(1, spec.hi_rows)),
        PREC=prec, HALF=q.dtype != torch.float32, num_warps=num_warps,
        **({} if num_stages is None else dict(num_stages=num_stages)),
        **({} if maxnreg is None else dict(maxnreg=maxnreg)),
    )
    if direct:
        lse = m[..., 0] + torch.log2(l[..., 0]) if mass is not None else None
    else:
        lse = torch.empty(B, Hq, T, **f32)
        _combine_kernel[(B * Hq * T,)](part, part_h, q if value_matrix is None else value_matrix, m, l, out, lse,
                                       SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits), D=D,
                                       SPLIT_V=split_v, CHUNK=min(D, 32), num_warps=4)
    if mass is not None:  # MiKV: the ring's (and the chunk's) mass, recomputed from the log-sum-exp
        if mass.stride(2) != 1 or mass.stride(0) != Hkv * mass.stride(1):
            raise ValueError("mass must be (B, Hkv, N) with contiguous rows")
        for keys, n, ring in ((win_k, R, True), (k_new, T, False))[:1 + chunk]:
            _mass_kernel[(B * Hkv, triton.cdiv(n, 64))](
                q, keys, lse, mass if ring else mass[:, :, R:], lengths, n_hist, qk_scale, Hkv, T, n, n_sink,
                mass.stride(1), GROUP=group, D=D, RING=ring, FRESH=ring and not chunk, BLOCK_Q=16, BLOCK_K=64,
                PREC=prec, num_warps=4)
    return out


def decode_attention(q: Tensor, sink_k: Tensor, sink_v: Tensor, lengths: Tensor, hist: History, spec: Spec,
                     n_hist: Tensor, win_k: Tensor, win_v: Tensor, *, q_hist: Tensor | None = None,
                     rope: PreRope | None = None, key_matrix: Tensor | None = None,
                     value_matrix: Tensor | None = None, scale: float | None = None, mass: Tensor | None = None,
                     hi: HiRows | None = None, splits: int | None = None, block_n: int | None = None,
                     block_w: int = 64, num_warps: int | None = None, num_stages: int | None = None,
                     ring_split: bool | None = None) -> Tensor:
    """Same arguments and result as kernels.reference.decode_attention, plus launch settings:
    `splits` (default: from the history's capacity, so one launch fits every fill level; for one wave of
    programs where register_capped),
    `block_n` and `num_stages` (default 128 tokens, pipelined by Triton's default; with pre-RoPE keys,
    whose key-matrix product needs the registers, 64-token tiles unless the keys are narrower than 4 bits
    and every split loops over four 128-token tiles or more, which then run unpipelined: on an H100 at
    B=8, S=32K rotatekv took 0.474 ms that way against 0.533 with 64-token tiles, and K4V2 before RoPE
    0.574 against 0.523, while over 1K tokens at B=1 64-token tiles were best, 25 against 33 us) and `num_warps`
    (default 4, or 8 without a key matrix when the programs do not fill the multiprocessors: Llama-2-7B
    at B=1 over 1K tokens decoded 2-4 % faster with int8, kivi2 and k4v4, and 6 % slower with K4V2 before RoPE; at
    B=8, S=32K 8 warps were slower),
    `ring_split` (default: when the history is split into splits of at most two tiles) a split of
    their own for the sinks and the ring, so that the program of the last history split does not also
    attend them: short splits are where that program's extra tiles set the kernel's time."""
    B, Hq, D = q.shape
    Hkv, C_h = sink_k.shape[1], hist.k.shape[2]
    pre_rope = key_matrix is not None or rope is not None
    long_splits = pre_rope and spec.k_bits < 4 and 4 * num_splits(B, Hkv, C_h, 128) <= triton.cdiv(C_h, 128)
    block_n = block_n or (64 if pre_rope and not long_splits else 128)
    if long_splits and block_n == 128:
        num_stages = num_stages or 1
    capped = register_capped(spec, rope, q.dtype)
    if splits is None:
        splits = num_splits(B, Hkv, C_h, block_n, per_sm=CAPPED_PER_SM if capped else 4)
    few_programs = B * Hkv * splits < _multiprocessors()
    num_warps = num_warps or (8 if few_programs and not pre_rope else 4)
    if ring_split is None:
        ring_split = 1 < splits and triton.cdiv(triton.cdiv(C_h, block_n), splits) <= 2
    return attention(q[:, :, None], None, None, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v,
                     q_hist=None if q_hist is None else q_hist[:, :, None], rope=rope, key_matrix=key_matrix,
                     value_matrix=value_matrix, scale=scale, mass=mass, hi=hi, splits=splits, block_m=1,
                     block_n=block_n, block_w=block_w, num_warps=num_warps, num_stages=num_stages,
                     ring_split=ring_split, maxnreg=CAPPED_REGISTERS if capped else None)[:, :, 0]


@triton.jit
def _mass_kernel(q_ptr, k_ptr, lse_ptr, mass_ptr, len_ptr, nh_ptr, qk_scale, Hkv, T, N, n_sink, mass_stride,
                 GROUP: tl.constexpr, D: tl.constexpr, RING: tl.constexpr, FRESH: tl.constexpr,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """Program (sequence x KV head, block of keys): add each key's probability, summed over the
    queries and the query heads of its group, to its mass. RING: the keys are the ring's N slots,
    visible to every query where they hold a token; else a chunk's own N = T tokens, causally.
    FRESH (decode): the new token's slot held an older token, whose mass is dropped first."""
    bh = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, D)
    key_ok = j < N
    length = tl.load(len_ptr + bh // Hkv)
    k = tl.load(k_ptr + (bh * N + j)[:, None] * D + dd[None, :], mask=key_ok[:, None], other=0.0)
    if RING:
        key_ok = key_ok & _ring_ok(j, tl.load(nh_ptr + bh // Hkv), length, n_sink, N)
    total = tl.zeros((BLOCK_K,), tl.float32)
    for r0 in range(0, GROUP * T, BLOCK_Q):
        r = r0 + tl.arange(0, BLOCK_Q)
        qrow = bh * GROUP * T + r  # (sequence, KV head, head of the group, token), flat
        row_ok = r < GROUP * T
        q = tl.load(q_ptr + qrow[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + qrow, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * qk_scale
        vis = row_ok[:, None] & key_ok[None, :]
        if not RING:
            vis = vis & (j[None, :] <= (r % T)[:, None])
        total += tl.sum(tl.where(vis, tl.exp2(s - lse[:, None]), 0.0), 0)
    ptr = mass_ptr + bh * mass_stride + j
    before = tl.load(ptr, mask=key_ok, other=0.0)
    if FRESH:
        before = tl.where(j == (length - 1 - n_sink) % N, 0.0, before)
    tl.store(ptr, before + total, mask=key_ok)
