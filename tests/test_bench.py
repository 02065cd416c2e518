"""`minikv bench` on a tiny random model (CPU smoke test), the transformers twin, and the CUDA graph step."""
import json
import math

import pytest
import torch

from minikv import bench
from minikv.cli import main as cli_main
from minikv.config import ModelConfig
from minikv.cuda_graph import GraphDecodeStep, enable_cuda_graph
from minikv.errors import MinikvError
from minikv.generate import Engine
from minikv.geometries import GEOMETRIES, random_model
from minikv.model import Transformer
from tests.hf_reference import hf_model, save_folder

TINY = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)


def tiny(device="cpu", **overrides):
    return random_model(ModelConfig(**{**TINY, **overrides}), device, torch.float32, seed=1)


def store_for(model, batch=1, capacity=64, static=False):
    return bench.full_precision_store(model, batch, capacity, static)


def options(model, **kw):
    return bench.BenchOptions(model=model, model_name="tiny", make_store=lambda b, c, s: store_for(model, b, c, s),
                              **{"prompt_len": 6, "new_tokens": 3, "repeats": 1, **kw})


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "n_kv_heads": 4},
                                       {"architecture": "MistralForCausalLM", "sliding_window": 4}])
def test_transformers_twin_computes_our_logits(overrides):
    model = tiny(**overrides)
    twin = bench.transformers_twin(model)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    store = store_for(model, batch=2)
    with torch.no_grad():
        ours = model(tokens, store.positions(9), store)
        ref = twin(tokens).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_random_model_is_random_and_tied():
    model = random_model(ModelConfig(**TINY, tie_embeddings=True), "cpu", torch.float32)
    assert model.output.weight is model.tok_embeddings.weight
    w = model.layers[0].attention.wqkv.weight
    assert 0.01 < w.std().item() < 0.03
    assert model.layers[0].attention_norm.weight.eq(1).all()


def test_geometries_have_published_sizes():
    with torch.device("meta"):
        params = {name: sum(t.numel() for t in Transformer(cfg).parameters()) for name, cfg in GEOMETRIES.items()}
    assert round(params["llama2-7b"] / 1e9, 2) == 6.74
    assert round(params["mistral-7b"] / 1e9, 2) == 7.24
    assert round(params["llama3-8b"] / 1e9, 2) == 8.03
    assert round(params["smollm2-135m"] / 1e6, 1) == 134.5


def test_fill_store_writes_through_the_store():
    model = tiny()
    store = store_for(model, batch=2, capacity=40)
    bench.fill_store(store, 30, model.config.n_heads, chunk=7)
    assert store.lengths == [30, 30]
    for layer in range(model.config.n_layers):
        written = store.k[layer][:, :, :30].abs().amax(dim=(1, 3))
        assert (written > 0).all() and store.k[layer][:, :, 30:].eq(0).all()


def test_decode_bench_record_and_row():
    record = bench.run(options(tiny(), batch=2))
    ours, hf = record["ours"], record["transformers"]
    assert ours["prefill_tps"] > 0 and ours["decode_tps"] > 0 and ours["decode_ms_per_step"] > 0
    assert hf["prefill_tps"] > 0 and math.isfinite(hf["decode_tps"])  # a difference of two times: noisy when tiny
    assert record["copy_bandwidth"] > 0 and record["floor_ms_per_step"] > 0
    assert ours["store_bytes"] == 2 * 2 * 2 * 2 * 9 * 16 * 4  # k and v, layers, batch, heads, tokens, dim, fp32
    assert record["graph"] == "no"  # CPU
    row = bench.markdown_row(record)
    assert row.count("|") == bench.TABLE_HEADER.splitlines()[0].count("|")
    assert "minikv" in bench.summary(record) and "transformers" in bench.summary(record)


def test_attention_bench_record():
    record = bench.run(options(tiny(), attn_only=True, ctx_fill=20))
    a = record["attention"]
    assert a["store_us"] > 0 and a["sdpa_us"] > 0 and a["store_fraction_of_copy"] > 0
    assert a["sdpa_bytes"] == 2 * 2 * 21 * 16 * 4
    assert "attention over 20 tokens" in bench.summary(record)


def test_bench_command_writes_json_and_row(tmp_path):
    hf, _ = hf_model("llama-gqa")
    save_folder(hf, tmp_path / "model")
    out = tmp_path / "out"
    argv = ["bench", "-m", str(tmp_path / "model"), "--device", "cpu", "--prompt-len", "5", "-n", "2",
            "--repeats", "1", "--no-transformers", "--kv", "kivi2", "--kv-group", "8", "--out", str(out), "--tag", "t"]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0
    record = json.loads((out / "t.json").read_text())
    assert record["model"] == "model" and record["ours"]["decode_tps"] > 0
    assert len((out / "runs.md").read_text().splitlines()) == 4  # header, rule, two rows


def test_bench_command_rejects_attention_without_context(capsys):
    assert cli_main(["bench", "--geometry", "smollm2-135m", "--attn-only"]) == 1
    assert "--ctx-fill" in capsys.readouterr().err


def test_cuda_graph_needs_a_static_cuda_store():
    model = tiny()
    with pytest.raises(MinikvError, match="cuda"):
        enable_cuda_graph(Engine(model, None, store_for(model, static=True)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_graph_decode_matches_eager(compile):
    model = tiny("cuda")
    prompt = torch.randint(0, TINY["vocab_size"], (2, 7), device="cuda")
    outs = []
    for graph in (False, True):
        engine = Engine(model, None, store_for(model, batch=2, capacity=32, static=True))
        if graph:
            enable_cuda_graph(engine, compile=compile)
            assert isinstance(engine.decode_step, GraphDecodeStep)
        with torch.inference_mode():
            ids = engine.forward(prompt).argmax(-1, keepdim=True)
            steps = []
            for _ in range(5):
                logits = engine.forward(ids)
                steps.append(logits.clone())
                ids = logits.argmax(-1, keepdim=True)
        outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
