"""Find and load a model: a Hugging Face-style folder or a `.gguf` file, with its tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from minikv.errors import MinikvError
from minikv.gguf_file import GGUFFile
from minikv.model import Transformer
from minikv.tokenizer import Tokenizer, gguf_tokenizer, load_tokenizer
from minikv.weights import load_folder, load_gguf

DEFAULT_NAME = "smollm2-135m-instruct"


def default_model_dir() -> Path:
    """$MINIKV_MODEL, else the checkout's weights/ folder, else the user cache (installed package)."""
    if os.environ.get("MINIKV_MODEL"):
        return Path(os.environ["MINIKV_MODEL"]).expanduser()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists() and (repo / "minikv").is_dir():
        return repo / "weights" / DEFAULT_NAME
    return Path.home() / ".cache" / "minikv" / DEFAULT_NAME


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         progress: bool = True) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer at `path`: a Hugging Face-style folder or a .gguf file (None: the default model)."""
    if path is None:
        path = default_model_dir()
        if not (path / "config.json").exists():
            raise MinikvError(f"the default model is not at {path}: run `make weights` (or `minikv weights`)")
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFFile(path)
        return load_gguf(gguf, device, dtype, progress), gguf_tokenizer(gguf)
    if not path.is_dir():
        raise MinikvError(f"no model at {path} (expected a folder with config.json, or a .gguf file)")
    if not (path / "config.json").exists():
        raise MinikvError(f"{path} has no config.json, so it is not a model folder")
    tokenizer = load_tokenizer(path)  # before the weights, so a missing tokenizer fails fast
    return load_folder(path, device, dtype, progress), tokenizer
