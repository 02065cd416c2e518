"""RMSNorm in one launch on CUDA. The model's PyTorch form (minikv.model.RMSNorm: to float32, square, mean,
add, rsqrt, multiply, back to the model's dtype, times the weight) is eight kernels per norm, and at decode
each costs its launch more than its work: on an H100 the 65 norms of a Mistral-7B step at batch 8 took about
1.1 ms of a 13.8 ms step, and 0.12 ms this way (docs/SPEED.md). Same arithmetic and roundings: float32 inside, rounded to the input's dtype before
the weight, as transformers does."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, x_stride, eps, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
    normed = (x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(o_ptr + row * D + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / rms(x)) over the last dimension, as minikv.model.RMSNorm computes it."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = triton.next_power_of_2(D)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), eps, D=D, BLOCK=block,
                                       num_warps=min(16, max(1, block // 512)))
    return out.view(x.shape)
