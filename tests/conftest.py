"""Shared fixtures: the default model's folder (made by `make weights`)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    path = Path(os.environ.get("MINIKV_MODEL", ROOT / "weights" / "smollm2-135m-instruct"))
    if not (path / "model.safetensors").exists():
        pytest.fail(f"default model missing at {path}: run `make weights`")
    return path


@pytest.fixture(scope="session")
def cached_load():
    """minikv.loader.load memoised for the whole test session: each model is read once."""
    from minikv import loader

    real, cache = loader.load, {}

    def load(path=None, device="cpu", dtype=None, progress=True):
        key = (str(path), str(device), dtype)
        if key not in cache:
            cache[key] = real(path, device, dtype, progress=False)
        return cache[key]

    return load
