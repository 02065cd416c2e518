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
