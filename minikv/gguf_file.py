"""Read llama.cpp's GGUF files: metadata as a `ModelConfig`, tensors in Hugging Face layout, the tokenizer.

GGUF stores LLaMA-family weights under its own names, quantized in blocks, with the q and k
projection rows permuted for llama.cpp's interleaved RoPE. `GGUFFile.tensor` undoes all
three, one tensor at a time, so a caller can convert or load without holding two copies of
the model. Only the `gguf` package's pure-NumPy dequantizers are used.
"""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from minikv.config import ModelConfig
from minikv.errors import MinikvError

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs back to HF's rotate-half halves).

    llama.cpp's converter applies `w.reshape(n_heads, 2, hd // 2, ...).swapaxes(1, 2)`."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _f32(x: float) -> float:
    """GGUF stores floats as float32: recover the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


class GGUFFile:
    """One GGUF file opened as a memory map; tensors are read and dequantized on demand."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise MinikvError(f"no such GGUF file: {self.path}")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
            raise MinikvError(f"corrupt or truncated GGUF file {self.path}: {e}") from None
        self.arch = self.field("general.architecture")
        if self.arch != "llama":  # Mistral GGUFs are "llama" too
            raise MinikvError(f"unsupported GGUF architecture {self.arch!r} in {self.path} (supported: llama)")
        self.tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self.tensors[name] = t
        if "model.embed_tokens.weight" not in self.tensors:
            raise MinikvError(f"{self.path} has no token_embd.weight tensor")

    @cached_property
    def vocab(self) -> list[str]:
        """The token strings (read once: large vocabularies take seconds to decode)."""
        return self.field("tokenizer.ggml.tokens") or []

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def need(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise MinikvError(f"{self.path} lacks the metadata key {key}")
        return value

    def config(self) -> ModelConfig:
        a = self.arch
        n_heads, dim = self.need(f"{a}.attention.head_count"), self.need(f"{a}.embedding_length")
        scaling = None
        kind = self.field(f"{a}.rope.scaling.type", "none")
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": self.need(f"{a}.rope.scaling.factor")}
        elif kind != "none":
            raise MinikvError(f"unsupported GGUF rope scaling {kind!r} in {self.path}")
        if any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise MinikvError(f"{self.path} uses per-frequency RoPE factors (Llama-3.1), which GGUF "
                              "loading does not support: load a Hugging Face folder instead")
        eos = self.field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            vocab_size=self.field(f"{a}.vocab_size") or len(self.vocab),
            dim=dim,
            n_layers=self.need(f"{a}.block_count"),
            n_heads=n_heads,
            n_kv_heads=self.field(f"{a}.attention.head_count_kv", n_heads),
            hidden_dim=self.need(f"{a}.feed_forward_length"),
            head_dim=self.field(f"{a}.attention.key_length") or self.field(f"{a}.rope.dimension_count")
            or dim // n_heads,
            norm_eps=_f32(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=self.field(f"{a}.context_length", 2048),
            tie_embeddings="lm_head.weight" not in self.tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self.tensors,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [eos],
        )

    def tensor(self, name: str) -> Tensor | None:
        """The HF-named tensor, dequantized to fp32 and un-permuted (None when absent)."""
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            return None
        try:
            data = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise MinikvError(f"{self.path}: tensor {t.name} uses {t.tensor_type.name}, "
                              "which cannot be dequantized here") from None
        w = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: F32 data is the read-only map
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_rope(w, self.field(f"{self.arch}.attention.head_count"))
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            heads = self.field(f"{self.arch}.attention.head_count")
            w = unpermute_rope(w, self.field(f"{self.arch}.attention.head_count_kv", heads))
        return w

    def tokenizer(self) -> Any:
        """The vocabulary rebuilt as a `tokenizers.Tokenizer` (byte-level BPE or SentencePiece-style)."""
        kind, tokens = self.field("tokenizer.ggml.model"), self.vocab
        types = self.field("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if not tokens:
            raise MinikvError(f"{self.path} has no tokenizer vocabulary")
        if kind == "gpt2":
            tok = _byte_level_bpe(tokens, self.field("tokenizer.ggml.merges") or [],
                                  self.field("tokenizer.ggml.pre", "default"))
        elif kind == "llama":
            tok = _sentencepiece_bpe(tokens, self.field("tokenizer.ggml.scores"), types,
                                     self.field("tokenizer.ggml.add_space_prefix", True))
        else:
            raise MinikvError(f"unsupported GGUF tokenizer model {kind!r} in {self.path} (supported: gpt2, llama)")
        _add_special_tokens(tok, tokens, types)
        return tok

    def token_text(self, key: str) -> str | None:
        i = self.field(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else self.vocab[i]

    def tokenizer_config(self) -> dict[str, Any]:
        """A Hugging Face `tokenizer_config.json` for the GGUF's tokenizer."""
        kind = self.field("tokenizer.ggml.model")
        cfg: dict[str, Any] = {
            "add_bos_token": bool(self.field("tokenizer.ggml.add_bos_token", kind == "llama")),
            "add_eos_token": bool(self.field("tokenizer.ggml.add_eos_token", False)),
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.field(f"{self.arch}.context_length", 2048),
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
            cfg[f"{key}_token"] = self.token_text(gguf_key)
        template = self.field("tokenizer.chat_template")
        if template:
            cfg["chat_template"] = template
        return {k: v for k, v in cfg.items() if v is not None}

    def generation_config(self) -> dict[str, Any]:
        cfg = {"bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
               "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
               "pad_token_id": self.field("tokenizer.ggml.padding_token_id")}
        return {k: v for k, v in cfg.items() if v is not None}


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str):
    """GPT-2 byte-level BPE; the `smollm`/`starcoder` pre-tokenizers split digits one by one first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if pre not in ("default", "gpt2", "smollm", "starcoder", "refact"):
        raise MinikvError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: gpt2, smollm)")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, types: list[int], space_prefix: bool):
    """SentencePiece BPE (LLaMA/Mistral) as `tokenizers` BPE with byte fallback.

    Merges are recovered from the vocabulary the way transformers converts SentencePiece
    models: every split of a piece into two known pieces, ordered by the merged piece's score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if scores is None:
        raise MinikvError("the GGUF's SentencePiece vocabulary has no scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    by_score = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
    merges = []
    for i in by_score:
        piece = tokens[i]
        if types[i] != _NORMAL or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    unk = next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "▁")]
    if space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens become special added tokens (matched whole in text); user-defined ones plain."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (_CONTROL, _UNKNOWN)]
    added = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
