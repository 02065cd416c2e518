"""Low-bit quantization primitives: asymmetric min/max quantizers, bit packing, Hadamard.

Everything here is stateless and works on any leading shape, so the store, the
calibration search and the kernels' reference twins share one definition of a code.

A code c of b bits stands for `c * scale + zero`, with scale and zero rounded to fp16
(what the store keeps) *before* the codes are chosen, so dequantization is exact with
respect to what is stored.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

BITS = (1, 2, 3, 4, 8)  # widths that pack into bytes; 16 means "not quantized"
FP16_MAX = 65504.0


def packed_width(dim: int, bits: int) -> int:
    """Bytes per row of `dim` codes of `bits` bits (dim must be a multiple of 8)."""
    return dim * bits // 8


def _pack_pow2(codes: Tensor, bits: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = codes.unflatten(-1, (codes.shape[-1] // per, per)) << shifts
    return grouped.sum(-1, dtype=torch.uint8)  # disjoint bit fields: the sum is a bitwise or


def _unpack_pow2(packed: Tensor, bits: int) -> Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., D) -> packed bytes (..., D*bits/8), low bits first.

    bits 1, 2, 4, 8: byte j holds channels j*(8/b) .. j*(8/b)+8/b-1, channel c at bit
    offset (c % (8/b))*b. bits 3: a 2-bit plane of the low bits (D/4 bytes) followed by
    a 1-bit plane of the high bit (D/8 bytes), so every plane stays byte-aligned."""
    if bits == 8:
        return codes
    if bits == 3:
        return torch.cat([_pack_pow2(codes & 3, 2), _pack_pow2(codes >> 2, 1)], dim=-1)
    return _pack_pow2(codes, bits)


def unpack(packed: Tensor, bits: int, dim: int) -> Tensor:
    """The inverse of `pack`: (..., dim*bits/8) bytes -> uint8 codes (..., dim)."""
    if bits == 8:
        return packed
    if bits == 3:
        lo, hi = packed.split([dim // 4, dim // 8], dim=-1)
        return _unpack_pow2(lo, 2) | (_unpack_pow2(hi, 1) << 2)
    return _unpack_pow2(packed, bits)


def quantize(x: Tensor, bits: int, dim: int = -1, clip: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max quantization reducing over `dim`.

    Returns uint8 codes (x's shape) and fp16 scale and zero (x's shape with `dim` kept as 1).
    `clip` < 1 shrinks the [min, max] range about its centre (values outside saturate),
    trading clipping error on outliers for resolution on the rest. A group whose fp16
    scale is 0 (constant, or a range below fp16's resolution) gets codes 0 and
    dequantizes to its zero-point."""
    xf = x.float().clamp(-FP16_MAX, FP16_MAX)
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    if clip < 1.0:
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
        lo, hi = mid - half, mid + half
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp(max=FP16_MAX).half()
    zero = lo.half()
    s = scale.float()
    codes = ((xf - zero.float()) / torch.where(s > 0, s, 1.0)).round_().clamp_(0, qmax)
    codes = torch.where(s > 0, codes, 0.0)
    return codes.to(torch.uint8), scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """codes * scale + zero in fp32 (scale/zero broadcast against codes)."""
    return codes.float() * scale.float() + zero.float()


def quantize_tokens(x: Tensor, bits: int, group: int, clip: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token groups of `group` consecutive channels: x (..., T, D) ->
    packed (..., T, D*bits/8), scale and zero (..., T, D/group)."""
    codes, scale, zero = quantize(x.unflatten(-1, (x.shape[-1] // group, group)), bits, -1, clip)
    return pack(codes.flatten(-2), bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_tokens(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, dim: int) -> Tensor:
    codes = unpack(packed, bits, dim).unflatten(-1, (scale.shape[-1], -1))
    return dequantize(codes, scale[..., None], zero[..., None]).flatten(-2)


def quantize_channels(x: Tensor, bits: int, group: int, clip: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel over blocks of `group` tokens (KIVI keys): x (..., T, D), T a multiple of
    group -> packed (..., T, D*bits/8), scale and zero (..., T/group, D)."""
    codes, scale, zero = quantize(x.unflatten(-2, (x.shape[-2] // group, group)), bits, -2, clip)
    return pack(codes.flatten(-3, -2), bits), scale.squeeze(-2), zero.squeeze(-2)


def dequantize_channels(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, dim: int) -> Tensor:
    codes = unpack(packed, bits, dim).unflatten(-2, (scale.shape[-2], -1))
    return dequantize(codes, scale[..., None, :], zero[..., None, :]).flatten(-3, -2)


def heaviest(mass: Tensor, n: int, group: int) -> Tensor:
    """MiKV's pick: of each block of `group` tokens along the last dim of mass (..., blocks * group),
    the n tokens with the most attention mass, heaviest first, ties to the earlier token (a rule the
    packing kernel follows exactly, where topk's order among ties is unspecified), as offsets into
    mass's last dim, block after block: (..., blocks * n)."""
    top = mass.unflatten(-1, (-1, group)).sort(dim=-1, descending=True, stable=True).indices[..., :n]
    return (top + torch.arange(0, mass.shape[-1], group, device=mass.device)[:, None]).flatten(-2)


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(dim: int) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


def hadamard(dim: int, device: torch.device | str = "cpu") -> Tensor:
    """Normalized Walsh-Hadamard matrix (dim, dim), fp32: symmetric and orthogonal (H @ H = I),
    so `x @ H` rotates row vectors and `y @ H` undoes it. dim must be a power of two."""
    if dim & (dim - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, not {dim}")
    return _hadamard_cpu(dim).to(device)


def hadamard_block(dim: int, device: torch.device | str = "cpu") -> Tensor:
    """A with hadamard(dim) == [[A, A], [A, -A]] (Sylvester's construction): hadamard(dim / 2) / sqrt(2)."""
    return hadamard(dim // 2, device) / math.sqrt(2)
