"""Triton helpers shared by the attention kernels: unpack codes and dequantize them in registers.

Channels are always handled in ranges [CH0, CH0 + NCH) so that a key can be read as its two
halves, which is what rotate-half RoPE needs without any register shuffles. Each row's bytes are
loaded once and split in registers (loading, per channel, the byte that holds it measured 5x
slower on an H100).

With HALF the arithmetic runs in float16 (16-bit models; bfloat16 ones too, as their scales are
stored in float16), else in float32. Codes become floats by OR-ing them into the mantissa of a
power of two and subtracting it, exactly: a conversion instruction runs at an eighth of the rate of
arithmetic on recent GPUs, and two of them per element (int -> fp32 -> fp16) made the kernel bound
by conversions. On NVIDIA GPUs, codes narrower than a byte are unpacked by inline PTX (_fields_ptx). Keys
whose scales the decode kernel folds into the query need no offset taken off: subnormal_field leaves a code
as a float16 subnormal.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _fields_ptx(bits: int) -> str:
    """PTX mapping four packed bytes to each of their 8/bits fields, OR-ed into the float16 1024.0:
    output k holds field k of the four bytes as two float16 pairs. prmt spreads bytes 0, 1 (2, 3)
    to the two halves of a register, then one shift and one lop3 ((x & mask) | 0x64006400) give two
    codes, so a code costs one instruction; Triton's own unpacking took about three and a half
    (byte extracts, 16-bit shifts, repacking) on sm_90. That cut kivi2's main loop from 1540 to 1345
    instructions, but its time at B=8, S=32K on an H100 only 4 % (rotatekv 7 %, MiKV 9 %): the kernel
    waits on shared memory more than it issues (docs/SPEED.md)."""
    per = 8 // bits
    mask = hex((1 << bits) - 1 | ((1 << bits) - 1) << 16)
    lines = ["{", ".reg .b32 lo, hi, t;",
             f"prmt.b32 lo, ${2 * per}, 0, 0x4140;", f"prmt.b32 hi, ${2 * per}, 0, 0x4342;"]
    for k in range(per):
        for j, src in enumerate(("lo", "hi")):
            x = src
            if k:
                lines.append(f"shr.b32 t, {src}, {bits * k};")
                x = "t"
            lines.append(f"lop3.b32 ${2 * k + j}, {x}, {mask}, 0x64006400, 0xEA;")
    return "\n".join(lines + ["}"])


def _pairs_ptx(bits: int) -> str:
    """PTX mapping two packed bytes (a 16-bit register) to each of their 8/bits fields, each as a pair of
    float16 subnormals (subnormal_field)."""
    per, mask = 8 // bits, hex((1 << bits) - 1 | ((1 << bits) - 1) << 16)
    lines = ["{", ".reg .b32 x, lo, t;", f"cvt.u32.u16 x, ${per};", "prmt.b32 lo, x, 0, 0x4140;"]
    for k in range(per):
        if k:
            lines.append(f"shr.b32 t, lo, {bits * k};")
        lines.append(f"and.b32 ${k}, {'t' if k else 'lo'}, {mask};")
    return "\n".join(lines + ["}"])


# Inline PTX needs an NVIDIA GPU; Triton's interpreter (the CPU tests) runs the plain-Triton unpacking,
# which gives the same floats.
PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.version.hip is None)
_PTX1 = tl.constexpr(_fields_ptx(1))
_PTX2 = tl.constexpr(_fields_ptx(2))
_PTX4 = tl.constexpr(_fields_ptx(4))
_PTX2_PAIRS = tl.constexpr(_pairs_ptx(2))
_PTX4_PAIRS = tl.constexpr(_pairs_ptx(4))


def _operands(bits: int, pack: int) -> str:
    """Inline-asm constraints of _ptx_field: 8/bits float16 outputs of `pack` elements (pack/2 registers
    each), from `pack` bytes (a 32-bit register for four, a 16-bit one for two)."""
    return ",".join(["=r"] * (8 // bits * pack // 2) + ["r" if pack == 4 else "h"])


_OUT1, _OUT2, _OUT4 = (tl.constexpr(_operands(b, 4)) for b in (1, 2, 4))
_OUT2_PAIRS, _OUT4_PAIRS = (tl.constexpr(_operands(b, 2)) for b in (2, 4))


@triton.jit
def _ptx_field(byt, BITS: tl.constexpr, K: tl.constexpr, PAIRS: tl.constexpr = False):
    """1024.0 + code K of each byte of the uint8 tensor byt, float16; with PAIRS (BITS 2 or 4) the bytes go
    two at a time and the code comes as a float16 subnormal (subnormal_field). The calls for the other
    fields of the same bytes share one PTX block: pure inline assembly with equal operands is computed once."""
    PACK: tl.constexpr = 2 if PAIRS else 4
    if BITS == 4:
        f0, f1 = tl.inline_asm_elementwise(_PTX4_PAIRS if PAIRS else _PTX4, _OUT4_PAIRS if PAIRS else _OUT4, [byt],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=PACK)
        out = f0 if K == 0 else f1
    elif BITS == 2:
        f0, f1, f2, f3 = tl.inline_asm_elementwise(_PTX2_PAIRS if PAIRS else _PTX2, _OUT2_PAIRS if PAIRS else _OUT2,
                                                   [byt], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=PACK)
        out = f0 if K == 0 else f1 if K == 1 else f2 if K == 2 else f3
    else:
        f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
            _PTX1, _OUT1, [byt],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=4)
        out = (f0 if K == 0 else f1 if K == 1 else f2 if K == 2 else f3 if K == 3 else f4 if K == 4 else
               f5 if K == 5 else f6 if K == 6 else f7)
    return out


@triton.jit
def subnormal_field(byt, BITS: tl.constexpr, K: tl.constexpr, HALF: tl.constexpr):
    """Code K (bits K*BITS..) of each byte, BITS 2 or 4, for a product with operands scaled to suit: with HALF
    the float16 subnormal code * 2**-24, exact and with no offset to take off (field's subtraction of 1024.0,
    an add.f16x2 per pair); NVIDIA's tensor cores take float16 subnormals as they are. Else field(). The PTX
    takes the bytes two at a time: where the consumer holds two neighbouring bytes of a row per register,
    as the tensor cores' first operand does (keys by fields), Triton's packing of four bytes for _fields_ptx
    took seven byte permutes (ptxas for sm_90). k4v2's decode kernel at B=8, S=32K on an H100: 0.193 ->
    0.180 ms for the pairs, 0.178 with the subnormals."""
    if HALF and PTX:
        out = _ptx_field(byt, BITS, K, True)
    elif HALF:
        out = ((byt.to(tl.int16) >> (BITS * K)) & ((1 << BITS) - 1)).to(tl.float16, bitcast=True)
    else:
        out = field(byt, BITS, K, HALF)
    return out


@triton.jit
def _ptx_fields(byt, BITS: tl.constexpr, K0: tl.constexpr, STEP: tl.constexpr, N: tl.constexpr):
    """_ptx_field of the N codes K0, K0 + STEP, ... of each byte along a new last axis, in that order. A join
    adds its axis last, so the two halves are the even and the odd codes of the run."""
    if N == 1:
        out = _ptx_field(byt, BITS, K0)
    else:
        out = tl.join(_ptx_fields(byt, BITS, K0, 2 * STEP, N // 2), _ptx_fields(byt, BITS, K0 + STEP, 2 * STEP, N // 2))
    return out


@triton.jit
def field(byt, BITS: tl.constexpr, K: tl.constexpr, HALF: tl.constexpr):
    """Code K (bits K*BITS..) of each byte of the uint8 tensor byt as floats, float16 with HALF: the
    channels K, K + 8/BITS, ... of a row. Elementwise, so a consumer may take any register layout
    (kernels.decode_attention feeds each field straight to the tensor cores)."""
    MAGIC: tl.constexpr = 1024.0 if HALF else 8388608.0  # see _with_magic
    if HALF and PTX and BITS < 8:
        out = _ptx_field(byt, BITS, K)
    else:
        MASK: tl.constexpr = (1 << BITS) - 1
        out = _with_magic((byt.to(tl.int16) if HALF else byt.to(tl.int32)) >> (K * BITS) & MASK, HALF)
    return out - MAGIC


@triton.jit
def _unpack_plane(rows, ok, BITS: tl.constexpr, BYTE0: tl.constexpr, NCH: tl.constexpr, N: tl.constexpr,
                  HALF: tl.constexpr):
    """Codes (N, NCH) of a plane of BITS-bit fields starting at byte BYTE0 of each row, as floats
    offset by the power of two of _with_magic (float16 with HALF, else float32)."""
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = NCH // PER
    byt = tl.load(rows[:, None] + BYTE0 + tl.arange(0, NB)[None, :], mask=ok[:, None], other=0)
    if HALF and PTX and BITS < 8:  # whole bytes: Triton's own OR is as short
        return tl.reshape(_ptx_fields(byt, BITS, 0, 1, PER), (N, NCH))
    byt = byt.to(tl.int16) if HALF else byt.to(tl.int32)
    # Halve the fields until each holds one code. Every split is a join, which keeps a byte's codes
    # in the registers of the thread that loaded it, so the arithmetic runs on packed pairs. Shifting
    # by a range of amounts instead made each thread load the byte again for every code, and its
    # scale too: kivi2 at B=8, S=32K took 0.399 ms on an H100 that way, 0.271 ms this way.
    if PER >= 2:
        byt = tl.join(byt & 0xF, byt >> 4)
    if PER >= 4:
        byt = tl.join(byt & 0x3, byt >> 2)
    if PER == 8:
        byt = tl.join(byt & 0x1, byt >> 1)
    return _with_magic(tl.reshape(byt, (N, NCH)), HALF)


@triton.jit
def unpack(rows, ok, BITS: tl.constexpr, CH0: tl.constexpr, NCH: tl.constexpr, N: tl.constexpr,
           D: tl.constexpr, HALF: tl.constexpr):
    """Codes (N, NCH) as floats (float16 with HALF) of channels CH0.. of the rows at pointers `rows` (N,)."""
    MAGIC: tl.constexpr = 1024.0 if HALF else 8388608.0  # see _with_magic
    if BITS == 3:
        lo = _unpack_plane(rows, ok, 2, CH0 // 4, NCH, N, HALF)
        hi = _unpack_plane(rows, ok, 1, D // 4 + CH0 // 8, NCH, N, HALF)
        codes = (hi - MAGIC) * 4.0 + lo  # magic + lo + 4 hi, exact
    else:
        codes = _unpack_plane(rows, ok, BITS, CH0 * BITS // 8, NCH, N, HALF)
    return codes - MAGIC


@triton.jit
def _with_magic(codes, HALF: tl.constexpr):
    """Non-negative integer codes (int16 with HALF, else int32; below 1024) OR-ed into the mantissa of
    a power of two whose mantissa's unit is 1 (1024.0 in float16, 2**23 in float32): the float is that
    power of two + code, exactly."""
    if HALF:  # 0x6400 is 1024.0
        out = (codes | 0x6400).to(tl.float16, bitcast=True)
    else:  # 0x4B000000 is 2**23
        out = (codes | 0x4B000000).to(tl.float32, bitcast=True)
    return out


@triton.jit
def _meta(ptr, offs, ok, HALF: tl.constexpr):
    """Scales or zero-points (stored as float16) at offs, in the arithmetic's dtype."""
    x = tl.load(ptr + offs, mask=ok, other=0.0)
    return x.to(tl.float16) if HALF else x.to(tl.float32)


@triton.jit
def dequant_tokens(rows, meta_rows, ok, scale_ptr, zero_ptr, BITS: tl.constexpr, CH0: tl.constexpr,
                   NCH: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                   HALF: tl.constexpr):
    """(N, NCH) of tokens quantized per token in groups of GROUP channels; NG groups cover the
    range (1 when GROUP >= NCH). meta_rows (N,) are offsets of the tokens' scale rows."""
    codes = tl.reshape(unpack(rows, ok, BITS, CH0, NCH, N, D, HALF), (N, NG, NCH // NG))
    meta = meta_rows[:, None] + CH0 // GROUP + tl.arange(0, NG)[None, :]
    s = _meta(scale_ptr, meta, ok[:, None], HALF)
    z = _meta(zero_ptr, meta, ok[:, None], HALF)
    return tl.reshape(codes * s[:, :, None] + z[:, :, None], (N, NCH))


@triton.jit
def scale_channels(codes, ok, meta, scale_ptr, zero_ptr, NBLK: tl.constexpr, HALF: tl.constexpr):
    """Codes (N, C) of tokens (visible where ok (N,)) quantized per channel, dequantized: the tile spans
    NBLK blocks of N/NBLK tokens, whose scale and zero-point rows are at offsets meta (NBLK, C)."""
    N: tl.constexpr = codes.shape[0]
    C: tl.constexpr = codes.shape[1]
    RB: tl.constexpr = N // NBLK
    blk_ok = tl.max(tl.reshape(ok.to(tl.int32), (NBLK, RB)), 1) > 0
    s = _meta(scale_ptr, meta, blk_ok[:, None], HALF)
    z = _meta(zero_ptr, meta, blk_ok[:, None], HALF)
    return tl.reshape(tl.reshape(codes, (NBLK, RB, C)) * s[:, None, :] + z[:, None, :], (N, C))


@triton.jit
def dequant_channels(rows, ok, meta_row, scale_ptr, zero_ptr, BITS: tl.constexpr, CH0: tl.constexpr,
                     NCH: tl.constexpr, NBLK: tl.constexpr, N: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    """(N, NCH) of tokens quantized per channel: the tile spans NBLK blocks of N/NBLK tokens,
    each with one scale row of D channels, the first at offset meta_row."""
    codes = unpack(rows, ok, BITS, CH0, NCH, N, D, HALF)
    meta = meta_row + tl.arange(0, NBLK)[:, None] * D + CH0 + tl.arange(0, NCH)[None, :]
    return scale_channels(codes, ok, meta, scale_ptr, zero_ptr, NBLK, HALF)


@triton.jit
def rope_halves(k_lo, k_hi, cos_ptr, sin_ptr, base, ci, si, D: tl.constexpr):
    """Rotate-half RoPE of keys at positions base + i (i the tile row) from the tables' row
    `base` and the tile-offset tables ci, si (N, D/2), by angle addition: one table row per tile.
    The arithmetic runs in the dtype of ci."""
    dh = tl.arange(0, D // 2)
    cb = tl.load(cos_ptr + base * D + dh).to(ci.dtype)[None, :]
    sb = tl.load(sin_ptr + base * D + dh).to(ci.dtype)[None, :]
    c = cb * ci - sb * si
    s = sb * ci + cb * si
    return k_lo * c - k_hi * s, k_hi * c + k_lo * s


@triton.jit
def rope_rows(k_lo, k_hi, cos_ptr, sin_ptr, pos, ok, D: tl.constexpr):
    """Rotate-half RoPE of keys at arbitrary positions pos (N,), one table row each; the arithmetic
    runs in the dtype of k_lo."""
    offs = pos[:, None] * D + tl.arange(0, D // 2)[None, :]
    c = tl.load(cos_ptr + offs, mask=ok[:, None], other=0.0).to(k_lo.dtype)
    s = tl.load(sin_ptr + offs, mask=ok[:, None], other=0.0).to(k_lo.dtype)
    return k_lo * c - k_hi * s, k_hi * c + k_lo * s
