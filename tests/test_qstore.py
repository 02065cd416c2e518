"""The quantized store against its definition: attention over sinks ‖ dequantized history ‖ window ‖ new,
where the history is quantize→dequantize of what was appended, in the stored space."""
import argparse

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minikv.calibration import Calibration, fingerprint, save_calibration
from minikv.config import ModelConfig
from minikv.errors import ContextFull, MinikvError
from minikv.model import apply_rope, rope_tables
from minikv.presets import PRESETS, KVSettings, add_kv_arguments, kv_settings_from_args, make_store, presets_help
from minikv.qstore import BUFFERS, LayerPlan, QuantizedStore
from minikv.quant import dequantize_channels, dequantize_tokens, hadamard, quantize_channels, quantize_tokens
from minikv.store import FullPrecisionStore, causal_mask, reference_attention
from tests.hf_reference import VARIANTS, hf_model, minikv_twin


def rope_cfg(head_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=10, dim=4 * head_dim, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=8,
                       head_dim=head_dim)


def fake_quant(x, bits, axis, group, clip):
    if bits == 16 or x.shape[-2] == 0:
        return x
    quant, dequant = (quantize_channels, dequantize_channels) if axis == "channel" else (quantize_tokens,
                                                                                         dequantize_tokens)
    return dequant(*quant(x, bits, group, clip), bits, x.shape[-1])


class Reference:
    """The store's definition, written out: keeps every appended k, v in full precision."""

    def __init__(self, store: QuantizedStore) -> None:
        self.store, self.s = store, store.settings
        self.k = [[] for _ in store.plans]
        self.v = [[] for _ in store.plans]
        self.h = hadamard(store.head_dim)

    def stored_keys(self, layer, k, pos):
        s, x = self.s, k.float()
        if s.prerope:
            x = apply_rope(x, self.store.rope_cos[pos], -self.store.rope_sin[pos])
        if s.rotate_k:
            x = x @ self.h
        perm = self.store.plans[layer].perm
        return x if perm is None else x.gather(-1, perm[None, :, None].expand_as(x))

    def attention_keys(self, layer, x, pos):
        perm = self.store.plans[layer].perm
        if perm is not None:
            x = x.gather(-1, perm.argsort(-1)[None, :, None].expand_as(x))
        if self.s.rotate_k:
            x = x @ self.h
        return apply_rope(x, self.store.rope_cos[pos], self.store.rope_sin[pos]) if self.s.prerope else x

    def expected_raw_history(self, layer):
        """Stored-space history: quantize→dequantize of the appended tokens (MiKV rows at hi bits)."""
        store, s, plan = self.store, self.s, self.store.plans[layer]
        n, lo = store.n_hist(store.length), store.n_sink
        pos = torch.arange(lo, lo + n)
        ks = self.stored_keys(layer, torch.cat(self.k[layer], 2)[:, :, lo:lo + n], pos)
        vs = torch.cat(self.v[layer], 2)[:, :, lo:lo + n].float()
        if s.rotate_v:
            vs = vs @ self.h
        k_group = s.group if s.key_axis == "channel" else s.group_k
        want_k = fake_quant(ks, plan.bits_k, s.key_axis, k_group, plan.clip_k)
        want_v = fake_quant(vs, plan.bits_v, "token", s.group_v, plan.clip_v)
        if store.hi_idx[layer].numel() and n:
            idx = store.hi_idx[layer][:, :, :n // s.group * store.n_hi].long()
            blocks = idx.unflatten(-1, (-1, store.n_hi))
            starts = torch.arange(0, n, s.group)[:, None]
            assert ((blocks >= starts) & (blocks < starts + s.group)).all()  # each row overrides its own block
            assert (blocks.sort(-1).values.diff(dim=-1) > 0).all()  # distinct tokens
            gather = idx[..., None].expand(-1, -1, -1, store.head_dim)
            for want, x, bits, group in ((want_k, ks, plan.bits_k, s.group_k), (want_v, vs, plan.bits_v, s.group_v)):
                if bits < store.hi_bits:
                    want.scatter_(2, gather, fake_quant(x.gather(2, gather), store.hi_bits, "token", group, 1.0))
        return want_k, want_v

    def check_history(self, layer):
        store = self.store
        raw_k, raw_v = store.dequantized_history(layer, raw=True)
        want_k, want_v = self.expected_raw_history(layer)
        torch.testing.assert_close(raw_k, want_k, atol=1e-5, rtol=0)
        torch.testing.assert_close(raw_v, want_v, atol=1e-5, rtol=0)
        n, lo = raw_k.shape[2], store.n_sink
        k, v = store.dequantized_history(layer)
        # An fp16 mirror (quantized history, fp32 model) rounds to nearest: |fp16(x) - x| <= 2^-11 |x|.
        rtol_k, rtol_v = (2 ** -11 if m and m[layer].dtype == torch.float16 else 0
                          for m in (store.view_k, store.view_v))
        torch.testing.assert_close(k, self.attention_keys(layer, raw_k, torch.arange(lo, lo + n)), atol=1e-4,
                                   rtol=rtol_k)
        torch.testing.assert_close(v, raw_v @ self.h if self.s.rotate_v else raw_v, atol=1e-5, rtol=rtol_v)

    def attention(self, layer, q, k, v, positions):
        """Reference attention over sinks ‖ dequantized history ‖ window ‖ new."""
        store = self.store
        L, S = store.length, store.n_sink
        n = store.n_hist(L)
        hk, hv = store.dequantized_history(layer)
        old_k = torch.cat(self.k[layer], 2) if self.k[layer] else k[:, :, :0]
        old_v = torch.cat(self.v[layer], 2) if self.v[layer] else v[:, :, :0]
        keys = torch.cat([old_k[:, :, :min(L, S)], hk, old_k[:, :, S + n:], k], 2)
        values = torch.cat([old_v[:, :, :min(L, S)], hv, old_v[:, :, S + n:], v], 2)
        mask = causal_mask(positions, torch.arange(L + k.shape[2]), store.sliding_window)
        return reference_attention(q, keys, values, mask)


@st.composite
def cases(draw):
    D = draw(st.sampled_from([16, 32]))
    G = draw(st.sampled_from([4, 8]))
    rotate = draw(st.sampled_from(["", "k", "v", "kv"]))
    settings_ = KVSettings(
        bits_k=draw(st.sampled_from([1, 2, 3, 4, 8, 16])), bits_v=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        group=G, group_k=draw(st.sampled_from([8, 16])), group_v=draw(st.sampled_from([8, 16])),
        key_axis=draw(st.sampled_from(["channel", "token"])), window=G * draw(st.integers(1, 3)),
        n_sink=draw(st.integers(0, 3)), rotate_k="k" in rotate, rotate_v="v" in rotate,
        reorder="k" not in rotate and draw(st.booleans()), prerope=draw(st.booleans()),
        mikv=draw(st.sampled_from([None, (8, 0.25), (4, 0.5)])))
    clip = draw(st.sampled_from([1.0, 0.8]))
    n_kv, group_size = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    return dict(settings=settings_, D=D, clip=clip, batch=draw(st.sampled_from([1, 2])), n_kv=n_kv,
                n_q=n_kv * group_size, capacity=draw(st.integers(1, 72)), sliding=draw(st.sampled_from([None, 9])),
                chunks=draw(st.lists(st.integers(1, 24), min_size=1, max_size=8)), mirror=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def build(case) -> QuantizedStore:
    s, D, g = case["settings"], case["D"], torch.Generator().manual_seed(case["seed"])
    plans = [LayerPlan(s.bits_k, s.bits_v, case["clip"], case["clip"],
                       torch.stack([torch.randperm(D, generator=g) for _ in range(case["n_kv"])]) if s.reorder else None),
             LayerPlan(s.bits_v, s.bits_k)]  # layers may differ in bits (a budget split)
    return QuantizedStore(2, case["batch"], case["capacity"], case["n_kv"], D, case["sliding"], torch.float32, "cpu",
                          settings=s, plans=plans, rope=rope_tables(rope_cfg(D), case["capacity"]),
                          mirror=case["mirror"])


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_store_equals_its_definition(case):
    store = build(case)
    ref = Reference(store)
    g = torch.Generator().manual_seed(case["seed"])
    B, D = case["batch"], case["D"]
    for T in case["chunks"]:
        T = min(T, store.room())
        if T == 0:
            with pytest.raises(ContextFull):
                store.positions(1)
            break
        positions = store.positions(T)
        for layer in range(2):
            q = torch.randn(B, case["n_q"], T, D, generator=g)
            k, v = torch.randn(B, case["n_kv"], T, D, generator=g), torch.randn(B, case["n_kv"], T, D, generator=g)
            k[..., 0] *= 5  # an outlier channel
            want = ref.attention(layer, q, k, v, positions)
            got = store.attend(layer, q, k, v, positions)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            ref.k[layer].append(k)
            ref.v[layer].append(v)
        store.advance(T)
        for layer in range(2):
            ref.check_history(layer)
    assert store.n_hist(store.length) <= store.hist_capacity


def test_mikv_keeps_the_most_attended_token_precise():
    """A key every query attends to is the one MiKV keeps at high bits."""
    s = KVSettings(bits_k=2, bits_v=2, group=4, group_k=16, group_v=16, window=4, n_sink=0, mikv=(8, 0.25))
    store = QuantizedStore(1, 1, 32, 1, 16, None, torch.float32, "cpu", settings=s, plans=[LayerPlan(2, 2)],
                           rope=rope_tables(rope_cfg(16), 32))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 12, 16, generator=g) * 0.1, torch.randn(1, 1, 12, 16, generator=g)
    k[:, :, 2] = 3.0  # token 2 dominates every later query's attention
    q = torch.ones(1, 1, 12, 16)
    for t in range(12):
        store.attend(0, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], store.positions(1))
        store.advance(1)
    assert store.n_hist(12) == 8 and store.hi_idx[0][0, 0, 0].item() == 2
    hk, hv = store.dequantized_history(0)
    assert (hv[0, 0, 2] - v[0, 0, 2]).abs().max() < 0.02  # 8-bit error, far below 2-bit's


@pytest.mark.parametrize("mirror", [True, False])
def test_16_bit_reference_attends_in_fp32(mirror):
    """With a bfloat16 model the reference path is fp32 attention over the dequantized history (not
    rounded to bfloat16) and the sinks and ring as held, rounded to bfloat16 once, at the end."""
    s = KVSettings.from_preset("rotatekv", group=8, group_k=16, group_v=16, window=8, n_sink=2)
    store = QuantizedStore(1, 1, 64, 2, 16, None, torch.bfloat16, "cpu", settings=s, plans=[LayerPlan(2, 2)],
                           rope=rope_tables(rope_cfg(16), 64), mirror=mirror)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 41, 16, generator=g).bfloat16() for h in (4, 2, 2))
    store.attend(0, q[:, :, :40], k[:, :, :40], v[:, :, :40], store.positions(40))
    store.advance(40)
    n = store.n_hist(40)
    hk, hv = store.dequantized_history(0)
    assert hk.dtype == torch.float32 and n == 24
    if not mirror:  # the mirror rounds to float16 (2^-11), not to bfloat16 (2^-8)
        assert (hk.bfloat16().float() != hk).any()
    slots = store.ring_slots(2 + n, 40)
    keys = torch.cat([k[:, :, :2].float(), hk, store.win_k[0][:, :, slots].float(), k[:, :, 40:].float()], 2)
    values = torch.cat([v[:, :, :2].float(), hv, store.win_v[0][:, :, slots].float(), v[:, :, 40:].float()], 2)
    want = reference_attention(q[:, :, 40:].float(), keys, values, None).bfloat16()
    got = store.attend(0, q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], store.positions(1))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["kivi2", "mikv", "rotatekv"])
def test_saved_state_restores_the_same_attention(name):
    s = KVSettings.from_preset(name, group=8, group_k=8, group_v=8, window=8, n_sink=2)
    stores = [QuantizedStore(1, 1, 48, 2, 16, None, torch.float32, "cpu", settings=x, plans=[LayerPlan(s.bits_k, 16)],
                             rope=rope_tables(rope_cfg(16), 48))
              for x in (s, s.replace(attention="reference"))]  # how a store attends is not what it holds
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=g) for _ in range(3))
    stores[0].attend(0, q[:, :, :29], k[:, :, :29], v[:, :, :29], stores[0].positions(29))
    stores[0].advance(29)
    state = stores[0].state_dict()
    assert state["tensors"]["hist_k.0"].shape[2] == stores[0].n_hist(29) < 48
    stores[1].load_state_dict(state)
    outs = [st.attend(0, q[:, :, 29:], k[:, :, 29:], v[:, :, 29:], st.positions(1)) for st in stores]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_cpu_working_copy_is_half_an_fp32_cache():
    """On the CPU the mirror of a quantized history is fp16 and one pair of step buffers serves every
    layer: about half an fp32 full cache (an fp32 mirror would equal it). A raw (16-bit) history's
    mirror stays in the model dtype, exact."""
    cfg = ModelConfig(vocab_size=10, dim=256, n_layers=32, n_heads=4, n_kv_heads=2, hidden_dim=8)  # head dim 64
    full = make_store(cfg, "fp16", 1, 2048, torch.float32, "cpu").nbytes()
    store = make_store(cfg, "k4v2", 1, 2048, torch.float32, "cpu")
    assert 0.45 < store.working_nbytes() / full < 0.55
    mixed = QuantizedStore(2, 1, 64, 2, 16, None, torch.float32, "cpu", settings=store.settings,
                           plans=[LayerPlan(4, 16), LayerPlan(16, 2)], rope=rope_tables(rope_cfg(16), 64))
    assert [t.dtype for t in mixed.view_k + mixed.view_v] == [torch.float16, torch.float32, torch.float32,
                                                                torch.float16]


def test_bits_per_element_counts_the_buffers():
    """The reported marginal bits equal the history buffers' real size per history element."""
    s = KVSettings(bits_k=3, bits_v=2, group=8, group_k=8, group_v=16, window=8, n_sink=2, key_axis="token",
                   mikv=(8, 0.25))
    store = QuantizedStore(2, 2, 64, 2, 32, None, torch.float16, "cpu", settings=s,
                           plans=[LayerPlan(3, 2), LayerPlan(4, 16)], rope=rope_tables(rope_cfg(32), 64))
    history = [n for n in BUFFERS if n not in ("sink_k", "sink_v", "win_k", "win_v", "win_mass")]
    nbytes = sum(t.numel() * t.element_size() for n in history for t in getattr(store, n))
    elements = store.hist_capacity * 2 * 2 * 32 * 2 * 2  # C * B * H * D * (k, v) * layers
    assert store.bits_per_element() == pytest.approx(nbytes * 8 / elements)
    assert store.nbytes() > nbytes and not store.view_k or store.nbytes() > nbytes
    assert store.avg_bits_per_element(10) == 16  # nothing quantized yet
    assert store.avg_bits_per_element(64) < 16


@pytest.mark.parametrize("head_dim, bits", [(64, 2.0), (128, 1.875)])
def test_a_channel_group_wider_than_the_head_is_the_whole_head(head_dim, bits):
    """k2v1's 128-wide value groups: one scale per head at head dim 128 and at 64; keys per channel in
    64-token blocks (2 + 32/64 bits), values 1 + 32/min(128, D) bits."""
    cfg = rope_cfg(head_dim)
    store = make_store(cfg, "k2v1", 1, 512, torch.float32, "cpu")
    assert store.settings.group_v == head_dim and store.v_scale[0].shape[-1] == 1
    assert store.bits_per_element() == pytest.approx(bits)
    with pytest.raises(MinikvError, match="does not divide"):
        make_store(cfg, KVSettings.from_preset("k2v1", group_v=48), 1, 512, torch.float32, "cpu")


# ---- through the model ---------------------------------------------------------------------

def run_model(model, store, tokens, chunk):
    outs = []
    with torch.no_grad():
        for s in range(0, tokens.shape[1], chunk):
            part = tokens[:, s:s + chunk]
            outs.append(model(part, store.positions(part.shape[1]), store))
            store.advance(part.shape[1])
    return torch.cat(outs, 1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp16_preset_reproduces_transformers(variant):
    hf, cfg = hf_model(variant)
    ours = minikv_twin(hf, cfg)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(2))
    store = make_store(ours.config, "fp16", 1, 64, torch.float32, "cpu")
    assert isinstance(store, FullPrecisionStore)
    got = run_model(ours, store, tokens, 7)
    with torch.no_grad():
        ref = hf(tokens).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mirror", [True, False])
def test_unquantized_paths_reproduce_full_precision(variant, mirror):
    """A window longer than the text quantizes nothing; a 16-bit history through every transform
    (pre-RoPE, rotation, ring, flushes) loses nothing beyond float rounding."""
    hf, cfg = hf_model(variant)
    ours = minikv_twin(hf, cfg)
    c = ours.config
    tokens = torch.randint(0, cfg["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(2))
    want = run_model(ours, FullPrecisionStore(c.n_layers, 1, 64, c.n_kv_heads, c.head_dim, c.sliding_window,
                                              torch.float32, "cpu"), tokens, 7)
    wide = make_store(c, KVSettings.from_preset("kivi2", window=64, group_k=16, group_v=16), 1, 64, torch.float32, "cpu")
    torch.testing.assert_close(run_model(ours, wide, tokens, 7), want, atol=1e-5, rtol=1e-5)
    s = KVSettings.from_preset("rotatekv", window=4, group=4, group_k=16, group_v=16, n_sink=2)
    lossless = QuantizedStore(c.n_layers, 1, 64, c.n_kv_heads, c.head_dim, c.sliding_window, torch.float32, "cpu",
                              settings=s, plans=[LayerPlan(16, 16)] * c.n_layers, rope=rope_tables(c, 64),
                              mirror=mirror)
    torch.testing.assert_close(run_model(ours, lossless, tokens, 5), want, atol=1e-4, rtol=1e-4)


def test_quantized_preset_stays_close_to_full_precision():
    hf, cfg = hf_model("llama-gqa")
    ours = minikv_twin(hf, cfg)
    c = ours.config
    tokens = torch.randint(0, cfg["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    want = run_model(ours, make_store(c, "fp16", 1, 64, torch.float32, "cpu"), tokens, 8)
    got = run_model(ours, make_store(c, KVSettings.from_preset("int8", window=8, group=8, group_k=8, group_v=8), 1, 64, torch.float32,
                                     "cpu"), tokens, 8)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


# ---- settings, presets, flags --------------------------------------------------------------

CFG = ModelConfig(vocab_size=10, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=8)  # head dim 64


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_store(name, tmp_path):
    perm = torch.arange(64).expand(2, 2, 64)
    calib = Calibration(model=fingerprint(CFG), key_perm=perm, key_perm_prerope=perm,
                        clip={kind: {b: [0.9, 1.0] for b in (1, 2, 3, 4, 8)} for kind in "kv"})
    save_calibration(tmp_path / "c.json", calib)
    store = make_store(CFG, KVSettings.from_preset(name, calib=str(tmp_path / "c.json")), 1, 300, torch.float32,
                       "cpu")
    assert store.nbytes() > 0 and name in presets_help()


@pytest.mark.parametrize("overrides, message", [
    (dict(bits_k=5), "bits"),
    (dict(group_v=20), "does not divide"),
    (dict(window=16, group=32), "multiple of the group"),
    (dict(window=40), "multiple of the group"),
    (dict(clip_k=1.5), "clip ratio"),
    (dict(reorder=True, rotate_k=True), "do not combine"),
    (dict(budget=9), "budget"),
    (dict(mikv=(5, 0.1)), "MiKV"),
])
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(MinikvError, match=message):
        KVSettings.from_preset("kivi2", **overrides).validate(head_dim=48)


def test_model_specific_errors(tmp_path):
    with pytest.raises(MinikvError, match="power-of-two"):
        KVSettings.from_preset("rotatekv", group=8, group_k=8, group_v=8).validate(head_dim=24)
    with pytest.raises(MinikvError, match="calibration"):
        make_store(CFG, "skvq", 1, 64, torch.float32, "cpu")
    other = ModelConfig(vocab_size=10, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=8)
    save_calibration(tmp_path / "c.json", Calibration(model=fingerprint(other, "other-model")))
    with pytest.raises(MinikvError, match="another model"):
        make_store(CFG, KVSettings.from_preset("skvq", calib=str(tmp_path / "c.json")), 1, 64, torch.float32, "cpu")


def test_budget_splits_bits_per_layer(tmp_path):
    save_calibration(tmp_path / "c.json", Calibration(model=fingerprint(CFG), norms={"k": [9.0, 1.0], "v": [1.0, 1.0]}))
    store = make_store(CFG, KVSettings.from_preset("kivi2", budget=3.0, calib=str(tmp_path / "c.json")), 1, 300,
                       torch.float32, "cpu")
    bits = [(p.bits_k, p.bits_v) for p in store.plans]
    assert bits[0][0] > bits[0][1] and sum(map(sum, bits)) <= 12


def test_flags_override_the_preset(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", default=str(tmp_path))
    add_kv_arguments(parser)
    args = parser.parse_args(["--kv", "kivi2", "--kv-bits-k", "4", "--kv-group", "16", "--kv-window", "64",
                              "--kv-rotate", "k", "--kv-clip", "0.9,calib", "--kv-prerope", "--kv-mikv", "8,0.25",
                              "--kv-attention", "reference"])
    s = kv_settings_from_args(args)
    assert (s.bits_k, s.bits_v, s.group, s.group_k, s.window, s.rotate_k, s.rotate_v) == (4, 2, 16, 16, 64, True, False)
    assert (s.clip_k, s.clip_v, s.prerope, s.mikv, s.calib, s.attention) == (0.9, None, True, (8, 0.25), None,
                                                                              "reference")
    (tmp_path / "kv_calibration.json").write_text("{}")
    assert kv_settings_from_args(parser.parse_args([])).calib == str(tmp_path / "kv_calibration.json")
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-bits-k", "5"])


@pytest.mark.parametrize("quantized", [False, True])
def test_rows_of_a_batch_decode_as_separate_stores(quantized):
    """Sequences prefilled one at a time through row views, to different lengths, then decoded
    together: each gives what a store of its own gives (the reference path decodes them one by one)."""
    cfg = rope_cfg(16)
    s = KVSettings.from_preset("kivi2", window=8, group=4, group_k=8, group_v=8, n_sink=2)
    make = (lambda b: make_store(cfg, s, b, 64, torch.float32, "cpu")) if quantized else \
        (lambda b: FullPrecisionStore(1, b, 64, 2, 16, None, torch.float32, "cpu"))
    g = torch.Generator().manual_seed(0)
    batch, alone = make(2), [make(1), make(1)]
    for b, n in enumerate((23, 37)):  # both past a block move, at different ring offsets
        view = batch.rows(b, b + 1)
        q, k, v = torch.randn(1, 4, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g), \
            torch.randn(1, 2, n, 16, generator=g)
        for store in (view, alone[b]):
            store.attend(0, q, k, v, store.positions(n))
            store.advance(n)
    assert batch.lengths == [23, 37]
    for _ in range(6):  # across a block move of each sequence
        q, k, v = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g), \
            torch.randn(2, 2, 1, 16, generator=g)
        got = batch.attend(0, q, k, v, batch.positions(1))
        batch.advance(1)
        for b, store in enumerate(alone):
            want = store.attend(0, q[b:b + 1], k[b:b + 1], v[b:b + 1], store.positions(1))
            store.advance(1)
            torch.testing.assert_close(got[b:b + 1], want)


def test_the_calibration_file_is_found_beside_the_model(tmp_path):
    """Every way to name a preset (flags, the API, the passkey runner) looks beside the model."""
    from minikv.presets import CALIBRATION_FILE, default_calibration

    assert default_calibration(tmp_path) is None
    (tmp_path / CALIBRATION_FILE).write_text("{}")
    (tmp_path / "model.gguf").write_bytes(b"")
    assert default_calibration(tmp_path) == default_calibration(tmp_path / "model.gguf") == \
        str(tmp_path / CALIBRATION_FILE)
