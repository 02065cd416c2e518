"""kernels.rms_norm against the model's PyTorch RMSNorm: on the CPU through Triton's interpreter at small
widths, with MINIKV_TEST_SHAPES=real on CUDA at model widths (tests/shapes.py)."""
from __future__ import annotations

from tests.shapes import DEVICE, REAL, skip_without_device  # first: sets TRITON_INTERPRET on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from minikv.model import RMSNorm  # noqa: E402

skip_without_device()
pytest.importorskip("triton")
from kernels.rms_norm import rms_norm  # noqa: E402

WIDTHS = (576, 4096) if REAL else (96, 128)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_matches_the_model(width, dtype):
    """Rows of a (B, T, D) batch and a strided view of them (the last token only), against the model's own
    float32-inside form on the CPU; float16 and bfloat16 within the two roundings the form makes (the normalised
    row, then its product with the weight), as the float32 sums may differ in their last bit."""
    g = torch.Generator().manual_seed(width)
    norm = RMSNorm(width, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=g) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(2, 5, width, generator=g) * 3).to(dtype)
    for inp in (x, x[:, -1:]):
        want = norm(inp)  # CPU: the PyTorch form
        got = rms_norm(inp.to(DEVICE), norm.weight.to(DEVICE), norm.eps).cpu()
        assert got.dtype == want.dtype and got.shape == want.shape
        tol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
