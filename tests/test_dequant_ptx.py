"""The inline-PTX unpacking of kernels.dequant (unpack, field) against minikv.quant, on an NVIDIA GPU.

Triton's interpreter cannot run inline PTX, so the CPU tests cover only the plain-Triton unpacking and
this module skips there. It takes its mode from tests/shapes.py like the other kernel tests (one process
cannot mix the interpreter and the compiler): on a GPU, `MINIKV_TEST_SHAPES=real python -m pytest
tests/test_dequant_ptx.py`, alone or beside them. It covers every bit width, both halves of a row and
one or four warps (different register layouts)."""
from __future__ import annotations

from tests.shapes import DEVICE  # first: sets TRITON_INTERPRET on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kernels import dequant  # noqa: E402
from minikv.quant import unpack as reference_unpack  # noqa: E402

pytestmark = pytest.mark.skipif(not (DEVICE == "cuda" and torch.cuda.is_available() and dequant.PTX),
                                reason="needs an NVIDIA GPU and MINIKV_TEST_SHAPES=real")
D, N = 128, 128


@triton.jit
def _unpack_kernel(x_ptr, o_ptr, BITS: tl.constexpr, CH0: tl.constexpr, NCH: tl.constexpr, N: tl.constexpr,
                   D: tl.constexpr):
    r = tl.arange(0, N)
    codes = dequant.unpack(x_ptr + r * (D * BITS // 8), r < N, BITS, CH0, NCH, N, D, True)
    tl.store(o_ptr + r[:, None] * NCH + tl.arange(0, NCH)[None, :], codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("ch0, nch", [(0, D), (0, D // 2), (D // 2, D // 2)])
@pytest.mark.parametrize("warps", [1, 4])
def test_unpack_matches_reference(bits, ch0, nch, warps):
    packed = torch.randint(0, 256, (N, D * bits // 8), dtype=torch.uint8, device="cuda")
    out = torch.empty(N, nch, dtype=torch.float16, device="cuda")
    _unpack_kernel[(1,)](packed, out, bits, ch0, nch, N, D, num_warps=warps)
    assert torch.equal(out, reference_unpack(packed, bits, D)[:, ch0:ch0 + nch].half())


@triton.jit
def _field_kernel(x_ptr, o_ptr, BITS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NB: tl.constexpr):
    r = tl.arange(0, N)[:, None] * NB + tl.arange(0, NB)[None, :]
    tl.store(o_ptr + r, dequant.field(tl.load(x_ptr + r), BITS, K, True))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_field_matches_reference(bits):
    per, nb = 8 // bits, D * bits // 8
    packed = torch.randint(0, 256, (N, nb), dtype=torch.uint8, device="cuda")
    want = reference_unpack(packed, bits, D).half()
    for k in range(per):
        out = torch.empty(N, nb, dtype=torch.float16, device="cuda")
        _field_kernel[(1,)](packed, out, bits, k, N, nb, num_warps=4)
        assert torch.equal(out, want[:, k::per]), k


@triton.jit
def _subnormal_kernel(x_ptr, o_ptr, BITS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NB: tl.constexpr):
    r = tl.arange(0, N)[:, None] * NB + tl.arange(0, NB)[None, :]
    tl.store(o_ptr + r, dequant.subnormal_field(tl.load(x_ptr + r), BITS, K, True).to(tl.float32))


@pytest.mark.parametrize("bits", [2, 4])
def test_subnormal_field_matches_reference(bits):
    """Codes two bytes at a time, as float16 subnormals: code * 2**-24 exactly."""
    per, nb = 8 // bits, D * bits // 8
    packed = torch.randint(0, 256, (N, nb), dtype=torch.uint8, device="cuda")
    want = reference_unpack(packed, bits, D).float() * 2.0 ** -24
    for k in range(per):
        out = torch.empty(N, nb, dtype=torch.float32, device="cuda")
        _subnormal_kernel[(1,)](packed, out, bits, k, N, nb, num_warps=4)
        assert torch.equal(out, want[:, k::per]), k
