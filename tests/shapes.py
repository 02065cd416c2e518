"""The kernel tests' mode. By default (CI) tiny shapes on the CPU, through Triton's interpreter;
MINIKV_TEST_SHAPES=real: real geometry (head dim 128, window 128, thousands of history tokens) on
CUDA, through the compiled kernels. MINIKV_TEST_DEVICE=cpu runs the real shapes in the interpreter
instead (slow: a few chosen tests, to check the shapes without a GPU)."""
from __future__ import annotations

import os

REAL = os.environ.get("MINIKV_TEST_SHAPES") == "real"
DEVICE = os.environ.get("MINIKV_TEST_DEVICE", "cuda" if REAL else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton (or torch, which may load it) is imported

import pytest  # noqa: E402
import torch  # noqa: E402


def skip_without_device() -> None:
    """Skip the calling test module (at its import) when the mode wants a GPU that is not there."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("MINIKV_TEST_SHAPES=real runs the kernels on a CUDA GPU; none is available",
                    allow_module_level=True)


def on_device(x):
    """Tensors, and tuples (NamedTuples too) and dicts of them, moved to DEVICE (on the CPU: the same
    tensors); anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, dict):
        return {k: on_device(v) for k, v in x.items()}
    if isinstance(x, tuple):
        items = [on_device(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x
