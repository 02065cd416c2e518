"""Load weights into a `Transformer`: Hugging Face folders (safetensors, sharded or not) and GGUF files.

Tensors are mapped from Hugging Face names to ours, the q/k/v and gate/up projections
fused, and assigned to a model built on the meta device, so no weight is allocated twice.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.gguf_file import GGUFFile
from minikv.model import Transformer

_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.down_proj.bias": "feed_forward.w2.bias",
}
_FUSED = {  # our fused tensor -> the HF tensors concatenated into it, in order
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
}


def from_hf_state(cfg: ModelConfig, get: Callable[[str], Tensor | None]) -> Iterator[tuple[str, Tensor]]:
    """Yield (our name, tensor) from a getter of HF-named tensors (None when absent)."""

    def need(name: str) -> Tensor:
        t = get(name)
        if t is None:
            raise MinikvError(f"the weights lack tensor {name}")
        return t

    yield "tok_embeddings.weight", need("model.embed_tokens.weight")
    yield "norm.weight", need("model.norm.weight")
    if not cfg.tie_embeddings:
        yield "output.weight", need("lm_head.weight")
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for src, dst in _LAYER_NAMES.items():
            t = get(hf + src)
            if t is None and src.endswith(".bias"):
                continue
            yield ours + dst, t if t is not None else need(hf + src)
        for dst, parts in _FUSED.items():
            yield f"{ours}{dst}.weight", torch.cat([need(f"{hf}{p}.weight") for p in parts])
            biases = [get(f"{hf}{p}.bias") for p in parts]
            if all(b is not None for b in biases):
                yield f"{ours}{dst}.bias", torch.cat(biases)


def to_hf_state(model: Transformer) -> dict[str, Tensor]:
    """The inverse of `from_hf_state`: HF-named views of the model's tensors (fused ones split, no copy)."""
    cfg, ours = model.config, model.state_dict()
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    splits = {"attention.wqkv": [q_dim, kv_dim, kv_dim], "feed_forward.w13": [cfg.hidden_dim, cfg.hidden_dim]}
    state = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"],
             "lm_head.weight": ours["output.weight"]}
    for i in range(cfg.n_layers):
        hf, mine = f"model.layers.{i}.", f"layers.{i}."
        state.update({hf + src: ours[mine + dst] for src, dst in _LAYER_NAMES.items() if mine + dst in ours})
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                if f"{mine}{fused}.{kind}" in ours:
                    pieces = ours[f"{mine}{fused}.{kind}"].split(splits[fused])
                    state.update({f"{hf}{p}.{kind}": t for p, t in zip(parts, pieces)})
    return state


def build_model(cfg: ModelConfig, tensors: Iterator[tuple[str, Tensor]], device: str | torch.device,
                dtype: torch.dtype) -> Transformer:
    """Create the model on the meta device and assign each tensor, cast and moved, in turn."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    state = {}
    for name, t in tensors:
        if name not in expected:
            raise MinikvError(f"unexpected tensor {name}")
        state[name] = t.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = expected - set(state)
    if missing:
        raise MinikvError(f"the weights lack {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    for name, t in state.items():
        want = model.state_dict()[name].shape
        if t.shape != want:
            raise MinikvError(f"tensor {name} has shape {tuple(t.shape)}, config implies {tuple(want)}")
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise MinikvError(f"corrupt {index}: {e}") from None
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise MinikvError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")


def load_folder(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                progress: bool = False) -> Transformer:
    """Load a Hugging Face-style folder: config.json plus (sharded) safetensors."""
    from safetensors import SafetensorError, safe_open

    cfg = ModelConfig.from_file(folder / "config.json")
    handles = {}
    try:
        for f in safetensors_files(folder):
            if not f.exists():
                raise MinikvError(f"missing shard {f}")
            h = safe_open(str(f), framework="pt")
            for key in h.keys():
                handles[key] = h
    except SafetensorError as e:
        raise MinikvError(f"corrupt or truncated safetensors in {folder}: {e}") from None

    def get(name: str) -> Tensor | None:
        h = handles.get(name)
        try:
            return None if h is None else h.get_tensor(name)
        except SafetensorError as e:
            raise MinikvError(f"corrupt tensor {name} in {folder}: {e}") from None

    return _load(cfg, get, device, dtype, progress)


def load_gguf(gguf: GGUFFile, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              progress: bool = False) -> Transformer:
    """Load a GGUF file's model, dequantizing one tensor at a time (peak memory: the model plus one tensor)."""
    return _load(gguf.config(), gguf.tensor, device, dtype, progress)


def _load(cfg: ModelConfig, get: Callable[[str], Tensor | None], device: str | torch.device,
          dtype: torch.dtype, progress: bool) -> Transformer:
    from tqdm import tqdm

    n = 2 + (not cfg.tie_embeddings) + cfg.n_layers * (4 + len(_FUSED))  # biases not counted
    bar = tqdm(from_hf_state(cfg, get), total=n, desc="loading weights", unit="tensor", disable=not progress,
               leave=False)
    return build_model(cfg, bar, device, dtype)
