"""A LLaMA / Mistral decoder in plain PyTorch (the gpt-fast shape).

The model never owns a KV cache: every attention layer hands its new keys and values to a
store object and gets the attention output back (`KVStore.attend`), so full-precision and
quantized stores plug in without touching this file.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minikv.config import ModelConfig
from minikv.store import KVStore


def one_launch(x: Tensor) -> bool:
    """Whether the small steps below run as one Triton launch each (kernels.rms_norm, kernels.rope): on CUDA,
    where the PyTorch forms cost a launch per operation, except inside torch.compile, which fuses them."""
    return x.is_cuda and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if one_launch(x):
            from kernels.rms_norm import rms_norm  # eight kernels in the form below

            return rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 as transformers does, then cast back before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies (head_dim / 2,) with Llama-3 or linear scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(cfg: ModelConfig, n_positions: int) -> tuple[Tensor, Tensor]:
    """cos and sin, each (n_positions, head_dim), in the rotate-half layout of HF checkpoints."""
    freqs = torch.outer(torch.arange(n_positions, dtype=torch.float32), rope_frequencies(cfg))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos, sin: (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, q_dim + 2 * kv_dim, bias=cfg.attention_bias)  # q ‖ k ‖ v, fused at load
        self.wo = nn.Linear(q_dim, cfg.dim, bias=cfg.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, store: KVStore) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if one_launch(q):
            from kernels.rope import rope_qk  # about ten kernels in apply_rope

            q, k = rope_qk(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = store.attend(self.layer, q, k, v, positions)  # (B, n_heads, T, head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden_dim = cfg.hidden_dim
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=cfg.mlp_bias)  # gate ‖ up, fused at load
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, store: KVStore) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, store)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope_cos: Tensor | None = None  # (n_positions, head_dim), built by setup_rope
        self.rope_sin: Tensor | None = None

    def setup_rope(self, n_positions: int) -> None:
        """Precompute RoPE tables for positions [0, n_positions) on the model's device."""
        cos, sin = rope_tables(self.config, n_positions)
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, tokens: Tensor, positions: Tensor, store: KVStore, last_only: bool = False) -> Tensor:
        """tokens, positions: (B, T). Returns logits (B, T, vocab) in fp32, or (B, 1, vocab) if last_only."""
        if self.rope_cos is None or self.rope_cos.shape[0] < store.max_position:
            self.setup_rope(store.max_position)
        x = self.tok_embeddings(tokens)
        dtype = x.dtype
        cos = self.rope_cos[positions].unsqueeze(1).to(dtype)
        sin = self.rope_sin[positions].unsqueeze(1).to(dtype)
        for block in self.layers:
            x = block(x, cos, sin, positions, store)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()
