"""Loading model folders: the default model against transformers, sharded checkpoints, and clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from minikv.errors import MinikvError
from minikv.generate import Engine
from minikv.loader import load
from minikv.sampling import SamplingParams
from minikv.store import FullPrecisionStore
from minikv.weights import load_folder
from tests.hf_reference import hf_model, save_folder


def make_store(model, capacity: int = 128) -> FullPrecisionStore:
    c = model.config
    return FullPrecisionStore(c.n_layers, 1, capacity, c.n_kv_heads, c.head_dim, c.sliding_window, torch.float32,
                              "cpu")


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    return load(default_model_dir, progress=False)


def test_default_model_matches_transformers(default_model_dir, default_model):
    import transformers

    model, tok = default_model
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}]))
    tokens = torch.tensor([ids])
    hf = transformers.LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    store = make_store(model)
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens, store.positions(len(ids)), store)
    assert max_rel_err(got, want) <= 1e-4


def test_default_model_answers_sensibly(default_model):
    """Greedy decoding of a ChatML question: a wrongly converted model (e.g. q/k rows left permuted) babbles."""
    model, tok = default_model
    engine = Engine(model, tok, make_store(model))
    logits = engine.ingest(tok.encode(tok.apply_chat_template([{"role": "user",
                                                                  "content": "What is the capital of France?"}])))
    answer = "".join(engine.generate(logits, SamplingParams(temperature=0, max_tokens=16)))
    assert "Paris" in answer
    assert engine.stats.stop_reason == "eos"  # ended by <|im_end|>, which is not part of the text


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers (no tokenizer files: tests add them to copies)."""
    hf, _ = hf_model("llama-gqa")
    folder = tmp_path_factory.mktemp("tiny")
    save_folder(hf, folder)
    return folder


def with_tokenizer(folder: Path, source: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def test_sharded_safetensors_load(tmp_path):
    hf, cfg = hf_model("llama-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_folder(tmp_path)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    store = make_store(model)
    with torch.no_grad():
        assert max_rel_err(model(tokens, store.positions(20), store), hf(tokens).logits) <= 1e-4


def test_missing_folder(tmp_path):
    with pytest.raises(MinikvError, match="no model at"):
        load(tmp_path / "nowhere", progress=False)


def test_missing_config(tmp_path):
    with pytest.raises(MinikvError, match="no config.json"):
        load(tmp_path, progress=False)


def test_default_model_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIKV_MODEL", str(tmp_path / "absent"))
    with pytest.raises(MinikvError, match="make weights"):
        load(None, progress=False)


def test_missing_tokenizer(tiny_folder):
    with pytest.raises(MinikvError, match="no tokenizer"):
        load(tiny_folder, progress=False)


def test_truncated_safetensors(tiny_folder, default_model_dir, tmp_path):
    folder = with_tokenizer(Path(shutil.copytree(tiny_folder, tmp_path / "m")), default_model_dir)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(MinikvError, match="corrupt or truncated"):
        load(folder, progress=False)


def test_unsupported_architecture(tiny_folder, default_model_dir, tmp_path):
    folder = with_tokenizer(Path(shutil.copytree(tiny_folder, tmp_path / "m")), default_model_dir)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(MinikvError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load(folder, progress=False)


def test_tiny_folder_loads_with_tokenizer(tiny_folder, default_model_dir, tmp_path):
    """The same copy, undamaged, loads: the errors above come from the damage alone."""
    folder = with_tokenizer(Path(shutil.copytree(tiny_folder, tmp_path / "m")), default_model_dir)
    model, tok = load(folder, progress=False)
    assert model.config.n_layers == 2 and tok.eos_ids == [2]
