"""Small random transformers models and their minikv twins, for logits comparisons."""
from __future__ import annotations

from pathlib import Path

import torch

from minikv.config import ModelConfig
from minikv.weights import build_model, from_hf_state

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False)

VARIANTS = {
    "llama-gqa": dict(architectures=["LlamaForCausalLM"], rope_theta=10000.0),
    "llama-mha-tied": dict(architectures=["LlamaForCausalLM"], num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope-scaling": dict(architectures=["LlamaForCausalLM"], rope_theta=500000.0, max_position_embeddings=512,
                                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral-sliding-window": dict(architectures=["MistralForCausalLM"], sliding_window=8, num_key_value_heads=1),
}


def hf_model(variant: str, seed: int = 0):
    """A random transformers model for a named variant (fp32, eval mode)."""
    import transformers

    cfg = {**BASE, **VARIANTS[variant]}
    cls = getattr(transformers, cfg["architectures"][0])
    conf_cls = transformers.MistralConfig if "Mistral" in cfg["architectures"][0] else transformers.LlamaConfig
    torch.manual_seed(seed)
    model = cls(conf_cls(**cfg)).eval()
    with torch.no_grad():  # random norms, so the test can tell the two norms apart
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, cfg


def minikv_twin(hf, cfg: dict):
    state = hf.state_dict()
    config = ModelConfig.from_hf(cfg)
    return build_model(config, from_hf_state(config, state.get), "cpu", torch.float32)


def save_folder(hf, folder: Path) -> None:
    hf.save_pretrained(folder, safe_serialization=True)
