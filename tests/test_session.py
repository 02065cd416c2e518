"""Sessions: a saved and reloaded store continues exactly like the live one, and bad files are refused."""
from types import SimpleNamespace

import pytest
import torch

from minikv.errors import MinikvError
from minikv.generate import Engine
from minikv.presets import KVSettings, make_store
from minikv.sampling import SamplingParams
from minikv.session import continuation_ids, load_session, save_session
from minikv.store import FullPrecisionStore
from tests.hf_reference import hf_model, minikv_twin

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
TOKENIZER = SimpleNamespace(eos_ids=[])  # random models: never stop early


@pytest.fixture(scope="module")
def model():
    hf, cfg = hf_model("llama-gqa")
    return minikv_twin(hf, cfg)


def engine_for(model, capacity=64, store_cls=FullPrecisionStore, **kwargs):
    c = model.config
    store = store_cls(c.n_layers, 1, capacity, c.n_kv_heads, c.head_dim, c.sliding_window, torch.float32, "cpu",
                      **kwargs)
    return Engine(model, TOKENIZER, store, prefill_chunk=8)


def prompt(n=21, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_saved_session_continues_like_the_live_store(model, tmp_path):
    live = engine_for(model)
    live.ingest(prompt())
    size = save_session(tmp_path / "s.mkv", live, {"source": "doc.txt"})
    used = sum(t[:, :, :21].numel() * 4 for t in live.store.k + live.store.v)
    assert used <= size < used + 64 * 1024  # the used part of the cache plus a small header

    loaded = engine_for(model)
    loaded.ingest(prompt(5, seed=9))  # whatever it held before is replaced
    assert load_session(tmp_path / "s.mkv", loaded) == {"source": "doc.txt"}
    assert loaded.tokens == live.tokens and loaded.store.lengths == [21]

    question = prompt(6, seed=1)
    outs = [list(e.generate_ids(e.ingest(question), GREEDY)) for e in (live, loaded)]
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_static_store_loads_a_dynamic_session(model, tmp_path):
    """How a store is run (CUDA-graph static shapes) is not part of what it holds."""
    live = engine_for(model)
    live.ingest(prompt())
    save_session(tmp_path / "s.mkv", live)
    static = engine_for(model, static=True)
    load_session(tmp_path / "s.mkv", static)
    q = prompt(4, seed=2)
    assert torch.allclose(live.ingest(q), static.ingest(q), atol=1e-5)


def test_refuses_another_model(model, tmp_path):
    live = engine_for(model)
    live.ingest(prompt())
    save_session(tmp_path / "s.mkv", live)
    hf, cfg = hf_model("llama-gqa", seed=1)  # same shapes, other weights
    with pytest.raises(MinikvError, match="another model"):
        load_session(tmp_path / "s.mkv", engine_for(minikv_twin(hf, cfg)))


def test_refuses_other_cache_settings(model, tmp_path):
    live = engine_for(model)
    live.ingest(prompt())
    save_session(tmp_path / "s.mkv", live)
    with pytest.raises(MinikvError, match="other KV cache settings"):
        load_session(tmp_path / "s.mkv", engine_for(model, capacity=32))


def test_names_the_kv_setting_that_differs(model, tmp_path):
    """A session of k4v2 with its keys before RoPE (k4v2's layout until it kept them after RoPE), loaded
    into today's k4v2: the error names the one field, not two whole settings dumps."""
    c = model.config

    def engine(settings):
        return Engine(model, TOKENIZER, make_store(c, settings, 1, 64, torch.float32, "cpu"), prefill_chunk=8)

    old = engine(KVSettings.from_preset("k4v2", prerope=True, window=8, group=8))
    old.ingest(prompt())
    save_session(tmp_path / "s.mkv", old)
    with pytest.raises(MinikvError, match=r"settings\.prerope is True, this one is False$"):
        load_session(tmp_path / "s.mkv", engine(KVSettings.from_preset("k4v2", window=8, group=8)))


@pytest.mark.parametrize("content", [b"", b"not a session at all", None])
def test_refuses_bad_files(model, tmp_path, content):
    path = tmp_path / "bad.mkv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MinikvError, match="not found" if content is None else "session file"):
        load_session(path, engine_for(model))


def test_refuses_a_safetensors_file_that_is_not_a_session(model, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(MinikvError, match="not a minikv session"):
        load_session(tmp_path / "w.safetensors", engine_for(model))


class CharTokenizer:
    """One token per character, except that "\\n\\n" is one token (as BPE merges whitespace runs)."""

    def encode(self, text, add_bos=None):
        out, i = [], 0
        while i < len(text):
            two = text[i:i + 2] == "\n\n"
            out.append(0 if two else ord(text[i]))
            i += 2 if two else 1
        return out

    def decode(self, ids):
        return "".join("\n\n" if i == 0 else chr(i) for i in ids)


def test_continuation_tokenizes_like_the_joined_text():
    tok = CharTokenizer()
    held = tok.encode("doc\n")
    assert held + continuation_ids(tok, held, "ok") == tok.encode("doc\nok")
    # "\n" + "\n" would merge across the boundary: the held tokens cannot change, so the text goes alone
    assert continuation_ids(tok, held, "\nok") == tok.encode("\nok")
    assert continuation_ids(tok, [], "ab") == tok.encode("ab")


def test_run_with_a_loaded_session_equals_the_joined_prompt(default_model_dir, tmp_path, capsys, monkeypatch):
    """`run -f DOC -n 0 --save-session S` then `run --load-session S -p Q` is `run -f DOC+Q` (greedy, fp16)."""
    from minikv.cli import main

    monkeypatch.setenv("MINIKV_MODEL", str(default_model_dir))
    doc = ("The museum opened in 1889 with three rooms of fossils. A fire in 1921 destroyed the east wing, "
           "and the collection was moved to a former railway station, where it still is today.\n")
    question = "Question: where is the collection today? Answer:"
    (tmp_path / "doc.txt").write_text(doc)
    (tmp_path / "joined.txt").write_text(doc + question)
    common = ["-c", "256", "--kv", "fp16", "--temp", "0", "--device", "cpu"]
    session = str(tmp_path / "doc.session")
    assert main(["run", "-f", str(tmp_path / "doc.txt"), "-n", "0", "--save-session", session, *common]) == 0
    capsys.readouterr()
    assert main(["run", "--load-session", session, "-p", question, "-n", "16", *common]) == 0
    resumed = capsys.readouterr().out
    assert main(["run", "-f", str(tmp_path / "joined.txt"), "-n", "16", *common]) == 0
    assert resumed == capsys.readouterr().out and resumed.strip()
