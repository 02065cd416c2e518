"""kernels.rope against the model's PyTorch RoPE (minikv.model.apply_rope): on the CPU through Triton's
interpreter at small shapes, with MINIKV_TEST_SHAPES=real on CUDA at model shapes (tests/shapes.py)."""
from __future__ import annotations

from tests.shapes import DEVICE, REAL, skip_without_device  # first: sets TRITON_INTERPRET on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from minikv.model import apply_rope  # noqa: E402

skip_without_device()
pytest.importorskip("triton")
from kernels.rope import rope_qk  # noqa: E402

HQ, HK, D = (32, 8, 128) if REAL else (6, 2, 16)


BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter computes "
                                                             "bfloat16 arithmetic wrongly (NaN)"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("T", [1, 5])
def test_rope_matches_the_model(dtype, T):
    """Queries and keys as the model has them, transposed views of one (B, T, heads, D) projection; positions
    differ per sequence. Equal to the PyTorch form, roundings included."""
    g = torch.Generator().manual_seed(T)
    B = 3
    qkv = torch.randn(B, T, HQ + 2 * HK, D, generator=g).to(dtype)
    q, k = qkv[:, :, :HQ].transpose(1, 2), qkv[:, :, HQ:HQ + HK].transpose(1, 2)
    angles = torch.rand(B, 1, T, D // 2, generator=g) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    got_q, got_k = rope_qk(*(x.to(DEVICE) for x in (q, k, cos, sin)))
    assert got_q.is_contiguous() and got_k.is_contiguous()
    torch.testing.assert_close(got_q.cpu(), apply_rope(q, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(got_k.cpu(), apply_rope(k, cos, sin), rtol=0, atol=0)
