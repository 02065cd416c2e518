"""Published model shapes with random weights, for speed and memory measurements only.

Decode speed depends on the shapes and dtypes of the weights, not on their values, so a
7B-class benchmark needs no 13 GB download. Never use these for accuracy.
"""
from __future__ import annotations

import torch

from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.model import Transformer
from minikv.weights import build_model

GEOMETRIES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                                rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                             max_seq_len=4096),
    "mistral-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                              max_seq_len=32768, sliding_window=4096, architecture="MistralForCausalLM"),
    # v0.2 dropped the sliding window (which the kernels do not support): full attention over 32K.
    "mistral-7b-v0.2": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                   hidden_dim=14336, rope_theta=1e6, max_seq_len=32768,
                                   architecture="MistralForCausalLM"),
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                             rope_theta=500000.0, max_seq_len=8192),
}


def geometry(name: str) -> ModelConfig:
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise MinikvError(f"unknown geometry {name!r} (known: {', '.join(GEOMETRIES)})") from None


def random_model(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A model of `cfg`'s shapes with N(0, 0.02²) matrices and unit norms, made directly on `device`.

    Random rather than zero values, so no kernel gets a data-dependent shortcut."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(cfg).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)

    def tensors():
        for name, shape in shapes.items():
            if cfg.tie_embeddings and name == "output.weight":
                continue  # build_model ties it to the embeddings
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, device=device, dtype=dtype)
            else:
                yield name, (torch.randn(shape, device=device, dtype=dtype, generator=gen) * 0.02)

    return build_model(cfg, tensors(), device, dtype)
