"""`minikv bench` on a tiny random model (CPU smoke test), the transformers twin, and the CUDA graph step."""
import json
import math

import pytest
import torch

from minikv import bench, capacity
from minikv.cli import main as cli_main
from minikv.config import ModelConfig
from minikv.cuda_graph import GraphDecodeStep, enable_cuda_graph
from minikv.errors import ContextFull, MinikvError
from minikv.generate import Engine
from minikv.geometries import GEOMETRIES, random_model
from minikv.model import Transformer
from minikv.presets import KVSettings, make_store
from tests.hf_reference import hf_model, save_folder

TINY = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
# RotateKV (2-bit, rotated, pre-RoPE keys: every path of the history) with a window small enough for tiny stores
SMALL_2BIT = KVSettings.from_preset("rotatekv", group=16, group_k=16, group_v=16, window=32)


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
    assert round(params["mistral-7b"] / 1e9, 2) == round(params["mistral-7b-v0.2"] / 1e9, 2) == 7.24
    assert GEOMETRIES["mistral-7b-v0.2"].sliding_window is None
    assert round(params["llama3-8b"] / 1e9, 2) == 8.03
    assert round(params["smollm2-135m"] / 1e6, 1) == 134.5


def test_fill_store_writes_through_the_store():
    model = tiny()
    store = store_for(model, batch=2, capacity=40)
    bench.fill_store(store, 30, chunk=7)
    assert store.lengths == [30, 30]
    for layer in range(model.config.n_layers):
        written = store.k[layer][:, :, :30].abs().amax(dim=(1, 3))
        assert (written > 0).all() and store.k[layer][:, :, 30:].eq(0).all()
    with pytest.raises(ContextFull):
        bench.fill_store(store, 11)


def test_fill_store_packs_a_quantized_history():
    model = tiny()
    store = make_store(model.config, SMALL_2BIT, 1, 200, torch.float32, "cpu")
    bench.fill_store(store, 150, chunk=64)
    assert store.length == 150 and store.n_hist(150) == 112
    keys, _ = store.dequantized_history(1, raw=True)
    assert keys.shape[2] == 112 and keys.abs().amax(dim=(0, 1, 3)).gt(0).all()  # every history row written


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
    rows = (out / "runs.md").read_text().splitlines()
    assert len(rows) == 4 and "`minikv bench -m " in rows[-1]  # header, rule, two rows, each with its command


@pytest.mark.parametrize("settings", ["fp16", SMALL_2BIT])
def test_capacity_fills_the_budget_and_attention_matches(settings):
    model = tiny()
    factory = lambda b, c, s: make_store(model.config, settings, b, c, torch.float32, "cpu", static=s)  # noqa: E731
    budget = 400_000
    store, search = capacity.find_capacity(model, factory, budget, False, probe=64, margin=0.05)
    reserve = search["reserve_bytes"]
    assert reserve == int(0.05 * budget)  # no decode workspace is measured on the CPU
    assert capacity.footprint(model, store) + reserve <= budget
    assert capacity.footprint(model, factory(1, int(1.05 * store.capacity), False)) + reserve > budget  # nearly all
    record = capacity.run(options(model, capacity={"x": factory}, memory_budget=budget, capacity_probe=64,
                                 capacity_margin=0.05))
    r = record["capacity"]["x"]
    assert r["capacity_tokens"] == store.capacity and r["decode_ms_per_step"] > 0
    check = r["spot_check"]
    assert check["tokens"] == store.capacity and len(check["layers"]) == len(check["kv_heads"]) == 2
    # The CPU reference path attends over an fp16 copy of the history (unit roundoff 2^-11 = 4.9e-4).
    assert check["max_abs_error"] < (1e-5 if settings == "fp16" else 2e-3) * check["max_abs_reference"]
    assert capacity.capacity_rows(record)[0].count("|") == capacity.CAPACITY_HEADER.splitlines()[0].count("|")
    assert "x: " in capacity.summary(record)


def test_spot_check_sees_attention_over_wrong_contents():
    model = tiny()
    store = make_store(model.config, SMALL_2BIT, 1, 300, torch.float32, "cpu")
    bench.fill_store(store, 290)
    for layer in range(model.config.n_layers):  # what the CPU store attends over, not what it holds
        store.view_v[layer][:, :, 100] += 1000.0
    check = capacity.spot_check(store, model.config.n_heads)
    assert check["max_abs_error"] > 1e-2


def test_bench_command_capacity(tmp_path):
    hf, _ = hf_model("llama-gqa")
    save_folder(hf, tmp_path / "model")
    out = tmp_path / "out"
    argv = ["bench", "-m", str(tmp_path / "model"), "--device", "cpu", "-n", "2", "--capacity", "fp16", "kivi2",
            "--kv-group", "8", "--memory-budget", "3000000", "--out", str(out), "--tag", "cap"]
    assert cli_main(argv) == 0
    record = json.loads((out / "cap.json").read_text())
    assert record["mode"] == "capacity" and list(record["capacity"]) == ["fp16", "kivi2"]
    fp16, kivi2 = record["capacity"]["fp16"], record["capacity"]["kivi2"]
    assert fp16["capacity_tokens"] > kivi2["capacity_tokens"] > 1024  # on the CPU the fp32 mirror comes on top
    assert len((out / "capacity.md").read_text().splitlines()) == 4  # header, rule, two rows
    assert cli_main(argv[:-6] + ["--out", "-"]) == 1  # the CPU has no free memory to measure


def test_bench_command_rejects_attention_without_context(capsys):
    assert cli_main(["bench", "--geometry", "smollm2-135m", "--attn-only"]) == 1
    assert "--ctx-fill" in capsys.readouterr().err


def test_cuda_graph_needs_a_static_cuda_store():
    model = tiny()
    with pytest.raises(MinikvError, match="cuda"):
        enable_cuda_graph(Engine(model, None, store_for(model, static=True)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv, compile", [("fp16", False), ("fp16", True), ("kivi2", False), ("kivi2", True),
                                         ("mikv", False)])
def test_graph_decode_matches_eager(kv, compile):
    """20 decode steps replayed as one graph each give the eager logits: a full-precision store, and
    quantized stores through the kernels across two block moves (with MiKV, its rows and mass)."""
    model = tiny("cuda", dim=128)  # head dim 32: the kernels' smallest
    settings = KVSettings.from_preset(kv, group=8, group_k=8, group_v=8, window=8, n_sink=2)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 7), device="cuda")
    outs = []
    for graph in (False, True):
        engine = Engine(model, None, make_store(model.config, settings, 2, 48, torch.float32, "cuda", static=True))
        if graph:
            enable_cuda_graph(engine, compile=compile)
            assert isinstance(engine.decode_step, GraphDecodeStep)
        with torch.inference_mode():
            ids = engine.forward(prompt).argmax(-1, keepdim=True)
            steps = []
            for _ in range(20):
                logits = engine.forward(ids)
                steps.append(logits.clone())
                ids = logits.argmax(-1, keepdim=True)
        outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
