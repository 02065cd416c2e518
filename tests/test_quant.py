"""Quantizers, bit packing, Hadamard rotation, and the calibration helpers."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minikv.calibration import (Calibration, compute_permutation, fingerprint, load_calibration, save_calibration,
                                search_clip, split_budget)
from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.quant import (BITS, dequantize, dequantize_channels, dequantize_tokens, hadamard, pack, packed_width,
                          quantize, quantize_channels, quantize_tokens, unpack)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, packed_width(32, bits))
    assert torch.equal(unpack(packed, bits, 32), codes)


def test_pack_layout_low_bits_first():
    """The documented byte layout the kernels rely on."""
    codes = torch.tensor([1, 2, 3, 0, 3, 2, 1, 0], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 3 | 2 << 2 | 1 << 4]
    assert pack(codes, 4).tolist() == [1 | 2 << 4, 3, 3 | 2 << 4, 1]
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10001101]
    three = torch.tensor([5, 7, 0, 2, 4, 1, 3, 6], dtype=torch.uint8)
    assert pack(three, 3).tolist() == pack(three & 3, 2).tolist() + pack(three >> 2, 1).tolist()


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), magnitude=st.sampled_from([1e-8, 1e-3, 1.0, 1e4]),
       clip=st.sampled_from([1.0, 0.9, 0.6]), seed=st.integers(0, 2**16))
def test_quantization_error_within_half_a_step(bits, magnitude, clip, seed):
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(seed)) * magnitude
    codes, scale, zero = quantize(x, bits, clip=clip)
    y = dequantize(codes, scale, zero)
    assert torch.isfinite(y).all() and int(codes.max()) < (1 << bits)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    clipped = (1 - clip) * (hi - lo) / 2  # values beyond the clipped range saturate
    qmax = (1 << bits) - 1  # fp16-rounded scale and zero (subnormal below 6e-5: absolute steps of 2^-24)
    fp16_slack = (zero.float().abs() + scale.float() * qmax) * 2 ** -10 + (qmax + 1) * 2 ** -24
    assert ((y - x).abs() <= scale.float() / 2 + clipped + fp16_slack).all()


@pytest.mark.parametrize("bits", BITS)
def test_constant_and_zero_groups_are_exact(bits):
    x = torch.tensor([[0.0] * 8, [3.0] * 8, [-1e4] * 8])
    codes, scale, zero = quantize(x, bits)
    y = dequantize(codes, scale, zero)
    assert torch.isfinite(y).all() and torch.equal(y, x)


def test_grouped_quantizers_shapes_and_accuracy():
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    packed, scale, zero = quantize_channels(x, 4, 16)
    assert packed.shape == (2, 3, 64, 16) and scale.shape == (2, 3, 4, 32)
    y = dequantize_channels(packed, scale, zero, 4, 32)
    step = scale.float().repeat_interleave(16, dim=-2)
    assert ((y - x).abs() <= step / 2 + 1e-3).all()
    packed, scale, zero = quantize_tokens(x, 3, 8)
    assert packed.shape == (2, 3, 64, 12) and scale.shape == (2, 3, 64, 4)
    y = dequantize_tokens(packed, scale, zero, 3, 32)
    step = scale.float().repeat_interleave(8, dim=-1)
    assert ((y - x).abs() <= step / 2 + 1e-3).all()


@pytest.mark.parametrize("dim", [1, 2, 16, 64])
def test_hadamard_orthogonal_and_self_inverse(dim):
    h = hadamard(dim)
    assert torch.allclose(h @ h.T, torch.eye(dim), atol=1e-6) and torch.equal(h, h.T)
    x = torch.randn(5, dim)
    assert torch.allclose((x @ h) @ h, x, atol=1e-5)


def test_hadamard_spreads_an_outlier():
    x = torch.zeros(1, 64)
    x[0, 3] = 8.0
    assert (x @ hadamard(64)).abs().max() == pytest.approx(1.0)


def test_hadamard_rejects_other_sizes():
    with pytest.raises(ValueError):
        hadamard(24)


# ---- calibration -----------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=10, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32)


def test_calibration_round_trip(tmp_path):
    perm = torch.stack([torch.stack([torch.randperm(16) for _ in range(2)]) for _ in range(2)])
    calib = Calibration(model=fingerprint(CFG, "tiny"), key_perm=perm, clip={"k": {2: [0.9, 1.0]}},
                        norms={"k": [3.0, 2.0], "v": [1.0, 1.0]})
    save_calibration(tmp_path / "c.json", calib)
    back = load_calibration(tmp_path / "c.json", CFG)
    assert torch.equal(back.key_perm, perm) and back.key_perm_prerope is None
    assert back.clip_ratio("k", 2, 0) == 0.9 and back.clip_ratio("v", 2, 0) is None
    assert back.norms == calib.norms


def test_calibration_from_another_model_is_rejected(tmp_path):
    other = ModelConfig(vocab_size=10, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=32)
    save_calibration(tmp_path / "c.json", Calibration(model=fingerprint(other, "bigger")))
    with pytest.raises(MinikvError, match="another model.*bigger"):
        load_calibration(tmp_path / "c.json", CFG)


@pytest.mark.parametrize("bad", ['{"format": 1}', "not json",
                                 '{"format": 1, "model": MODEL, "key_perm": [[[0, 0]]]}',
                                 '{"format": 1, "model": MODEL, "clip": {"k": {"2": [1.5, 1.0]}}}'])
def test_bad_calibration_files(tmp_path, bad):
    import json

    (tmp_path / "c.json").write_text(bad.replace("MODEL", json.dumps(fingerprint(CFG))))
    with pytest.raises(MinikvError):
        load_calibration(tmp_path / "c.json", CFG)


def test_permutation_groups_channels_of_like_range():
    scales = torch.tensor([1.0, 10.0, 1.0, 10.0, 1.0, 10.0, 1.0, 10.0])
    keys = torch.randn(1, 200, 8, generator=torch.Generator().manual_seed(0)) * scales
    perm = compute_permutation(keys)[0]
    assert sorted(perm.tolist()) == list(range(8))
    assert set(perm[:4].tolist()) == {0, 2, 4, 6}  # the small channels share the first group


def test_search_clip_clips_outliers_and_keeps_clean_data():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, 32, generator=g), torch.randn(2, 64, 32, generator=g)
    v = torch.randn(2, 64, 32, generator=g)
    assert search_clip(q, k, v, "v", 8, 32) == 1.0
    v_outliers = v.clone()
    v_outliers[..., 0, 0] = 40.0  # one huge value ruins every other value of its group at 2 bits
    assert search_clip(q, k, v_outliers, "v", 2, 32) < 1.0


def test_split_budget_favours_large_norms_within_budget():
    bits = split_budget({"k": [8.0, 8.0, 8.0], "v": [1.0, 1.0, 1.0]}, 3.0)
    assert all(bk > bv for bk, bv in bits)
    assert sum(bk + bv for bk, bv in bits) <= 3.0 * 6
    assert split_budget({"k": [1.0], "v": [1.0]}, 8.0) == [(8, 8)]
    with pytest.raises(MinikvError):
        split_budget({"k": [1.0], "v": [1.0]}, 0.5)
