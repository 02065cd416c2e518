"""The model's logits against transformers' on the same random weights."""
import pytest
import torch

from minikv.store import FullPrecisionStore
from tests.hf_reference import VARIANTS, hf_model, minikv_twin


def make_store(model, capacity=64, batch=1):
    c = model.config
    return FullPrecisionStore(c.n_layers, batch, capacity, c.n_kv_heads, c.head_dim, c.sliding_window,
                              torch.float32, "cpu")


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_logits_match_transformers(variant):
    hf, cfg = hf_model(variant)
    ours = minikv_twin(hf, cfg)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        store = make_store(ours, batch=2)
        got = ours(tokens, store.positions(40), store)
    assert max_rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("chunk", [1, 7])
def test_chunked_and_decode_logits_match_transformers(variant, chunk):
    """Feeding the same tokens in chunks through the store gives the one-shot logits."""
    hf, cfg = hf_model(variant)
    ours = minikv_twin(hf, cfg)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(2))
    store = make_store(ours)
    outs = []
    with torch.no_grad():
        ref = hf(tokens).logits
        for s in range(0, 30, chunk):
            part = tokens[:, s:s + chunk]
            outs.append(ours(part, store.positions(part.shape[1]), store))
            store.advance(part.shape[1])
    assert max_rel_err(torch.cat(outs, 1), ref) <= 1e-4


def test_static_store_matches_dynamic():
    """The capacity-wide masked path (used under CUDA graphs) equals the sliced path."""
    hf, cfg = hf_model("llama-gqa")
    ours = minikv_twin(hf, cfg)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(3))
    results = []
    for static in (False, True):
        c = ours.config
        store = FullPrecisionStore(c.n_layers, 1, 32, c.n_kv_heads, c.head_dim, None, torch.float32, "cpu",
                                   static=static)
        with torch.no_grad():
            ours(tokens[:, :8], store.positions(8), store)
            store.advance(8)
            for i in range(8, 12):
                out = ours(tokens[:, i:i + 1], store.positions(1), store)
                store.advance(1)
        results.append(out)
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_hf_state_round_trips():
    """to_hf_state is the inverse of the loader's mapping: HF names back to the same model."""
    from minikv.weights import build_model, from_hf_state, to_hf_state

    hf, cfg = hf_model("llama-gqa")
    ours = minikv_twin(hf, cfg)
    state = to_hf_state(ours)
    assert set(state) == set(hf.state_dict())
    again = build_model(ours.config, from_hf_state(ours.config, state.get), "cpu", torch.float32)
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
