"""Triton helpers shared by the attention kernels: unpack codes and dequantize them in registers.

Channels are always handled in ranges [CH0, CH0 + NCH) so that a key can be read as its two
halves, which is what rotate-half RoPE needs without any register shuffles. Each row's bytes are
loaded once and split with shifts and a reshape (loading, per channel, the byte that holds it
measured 5x slower on an H100).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_plane(rows, ok, BITS: tl.constexpr, BYTE0: tl.constexpr, NCH: tl.constexpr, N: tl.constexpr):
    """Codes (N, NCH) int32 of a plane of BITS-bit fields starting at byte BYTE0 of each row."""
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = NCH // PER
    byt = tl.load(rows[:, None] + BYTE0 + tl.arange(0, NB)[None, :], mask=ok[:, None], other=0).to(tl.int32)
    if PER == 1:
        codes = byt
    else:
        shifts = tl.arange(0, PER) * BITS
        codes = tl.reshape((byt[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (N, NCH))
    return codes


@triton.jit
def unpack(rows, ok, BITS: tl.constexpr, CH0: tl.constexpr, NCH: tl.constexpr, N: tl.constexpr,
           D: tl.constexpr):
    """Codes (N, NCH) as fp32 of channels CH0.. of the rows starting at pointers `rows` (N,)."""
    if BITS == 3:
        lo = _unpack_plane(rows, ok, 2, CH0 // 4, NCH, N)
        hi = _unpack_plane(rows, ok, 1, D // 4 + CH0 // 8, NCH, N)
        codes = lo | (hi << 2)
    else:
        codes = _unpack_plane(rows, ok, BITS, CH0 * BITS // 8, NCH, N)
    return codes.to(tl.float32)


@triton.jit
def dequant_tokens(rows, meta_rows, ok, scale_ptr, zero_ptr, BITS: tl.constexpr, CH0: tl.constexpr,
                   NCH: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """(N, NCH) fp32 of tokens quantized per token in groups of GROUP channels; NG groups cover
    the range (1 when GROUP >= NCH). meta_rows (N,) are offsets of the tokens' scale rows."""
    codes = tl.reshape(unpack(rows, ok, BITS, CH0, NCH, N, D), (N, NG, NCH // NG))
    meta = meta_rows[:, None] + CH0 // GROUP + tl.arange(0, NG)[None, :]
    s = tl.load(scale_ptr + meta, mask=ok[:, None], other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + meta, mask=ok[:, None], other=0.0).to(tl.float32)
    return tl.reshape(codes * s[:, :, None] + z[:, :, None], (N, NCH))


@triton.jit
def dequant_channels(rows, ok, meta_row, scale_ptr, zero_ptr, BITS: tl.constexpr, CH0: tl.constexpr,
                     NCH: tl.constexpr, NBLK: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """(N, NCH) fp32 of tokens quantized per channel: the tile spans NBLK blocks of N/NBLK tokens,
    each with one scale row of D channels, the first at offset meta_row."""
    RB: tl.constexpr = N // NBLK
    codes = tl.reshape(unpack(rows, ok, BITS, CH0, NCH, N, D), (NBLK, RB, NCH))
    blk_ok = tl.max(tl.reshape(ok.to(tl.int32), (NBLK, RB)), 1) > 0
    meta = meta_row + tl.arange(0, NBLK)[:, None] * D + CH0 + tl.arange(0, NCH)[None, :]
    s = tl.load(scale_ptr + meta, mask=blk_ok[:, None], other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + meta, mask=blk_ok[:, None], other=0.0).to(tl.float32)
    return tl.reshape(codes * s[:, None, :] + z[:, None, :], (N, NCH))


@triton.jit
def rope_halves(k_lo, k_hi, cos_ptr, sin_ptr, base, ci, si, D: tl.constexpr):
    """Rotate-half RoPE of keys at positions base + i (i the tile row) from the tables' row
    `base` and the tile-offset tables ci, si (N, D/2), by angle addition: one table row per tile."""
    dh = tl.arange(0, D // 2)
    cb = tl.load(cos_ptr + base * D + dh).to(tl.float32)[None, :]
    sb = tl.load(sin_ptr + base * D + dh).to(tl.float32)[None, :]
    c = cb * ci - sb * si
    s = sb * ci + cb * si
    return k_lo * c - k_hi * s, k_hi * c + k_lo * s
