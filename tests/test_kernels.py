"""Triton kernels against their PyTorch twins, and the twins against plain attention.

A batch of three sequences of different lengths covers partial sinks with an empty history, a wrapped
ring and a full history. By default on CPU through Triton's interpreter, so shapes are small; with
MINIKV_TEST_SHAPES=real the same cases run at real geometry on CUDA (tests/shapes.py).
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from tests.shapes import DEVICE, REAL, on_device, skip_without_device  # first: sets TRITON_INTERPRET on the CPU

import torch

skip_without_device()
pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels.decode_attention import decode_attention, keys_by_fields  # noqa: E402
from kernels.layout import HiRows, History, PreRope, Spec  # noqa: E402
from minikv.model import apply_rope  # noqa: E402
from minikv.quant import hadamard, hadamard_block  # noqa: E402
from minikv.store import reference_attention  # noqa: E402

D, N_SINK, W, G, C_H = (128, 4, 128, 64, 4096) if REAL else (32, 4, 32, 16, 64)
R = W + G
# Sinks only; a partial history (3 blocks; real: 31, the ring's tokens running past its end) and a
# wrapped window; a full history. Launch settings count in blocks of G (history tiles of one and of
# two blocks, ring tiles of one), so each case means the same at both sizes.
LENGTHS = (3, 2138 if REAL else 90, N_SINK + W + C_H)


def _orthogonal(n_kv: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Per-head channel permutation followed by a Hadamard rotation, as (n_kv, D, D) matrices."""
    perms = torch.stack([torch.randperm(d, generator=g) for _ in range(n_kv)])
    return torch.eye(d)[perms] @ hadamard(d)


def _rope_angles(d: int) -> torch.Tensor:
    """Rotate-half RoPE angles (positions, d), for every position the history holds."""
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d))
    return torch.outer(torch.arange(N_SINK + C_H).float(), inv).repeat(1, 2)


def _state(spec: Spec, n_kv: int, group: int, prerope: bool, fold: bool, seed: int):
    """Random store contents in the layout of kernels.layout (empty slots hold NaN), the
    arguments of decode_attention, and the matrix A that maps attention-space keys to stored ones."""
    g = torch.Generator().manual_seed(seed)
    B, D = len(LENGTHS), spec.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def scale(bits, *shape):  # fp16 scales and zero-points giving values in about [-3, 3]
        return ((torch.rand(*shape, generator=g) + 0.1) * 4 / (2**bits - 1)).half()

    def zero(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 3).half()

    lengths = torch.tensor(LENGTHS)
    n_hist = torch.tensor([max(0, L - N_SINK - W) // G * G for L in LENGTHS])
    k_meta = (B, n_kv, C_H // G, D) if spec.k_per_channel else (B, n_kv, C_H, D // spec.k_group)
    hist = History(
        torch.randint(0, 256, (B, n_kv, C_H, spec.packed_bytes(spec.k_bits)), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (B, n_kv, C_H, spec.packed_bytes(spec.v_bits)), generator=g, dtype=torch.uint8),
        scale(spec.k_bits, *k_meta), zero(*k_meta),
        scale(spec.v_bits, B, n_kv, C_H, D // spec.v_group), zero(B, n_kv, C_H, D // spec.v_group),
    )
    sink_k, sink_v = randn(B, n_kv, N_SINK, D), randn(B, n_kv, N_SINK, D)
    win_k, win_v = randn(B, n_kv, R, D), randn(B, n_kv, R, D)
    empty = ~reference.window_valid(lengths, n_hist, N_SINK, R)
    for b, L in enumerate(LENGTHS):
        sink_k[b, :, L:] = float("nan")
        win_k[b][:, empty[b]] = float("nan")
        win_v[b][:, empty[b]] = float("nan")
    q = randn(B, n_kv * group, D)
    kw = {}
    if prerope:
        emb = _rope_angles(D)
        kw["rope"] = PreRope(emb.cos(), emb.sin(), torch.full((B,), N_SINK))
    a = None
    if fold:
        kw["value_matrix"] = hadamard(D)
        if prerope:  # per-channel keys take the Walsh-Hadamard block, per-token ones a matrix per head
            kw["key_matrix"] = hadamard_block(D) if spec.k_per_channel else _orthogonal(n_kv, D, g)
        else:
            a = _orthogonal(n_kv, D, g)
            kw["q_hist"] = (q.view(B, n_kv, group, D) @ a[None]).view(B, -1, D).contiguous()
    return on_device(((q, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v), kw, a))


def _hi_rows(spec: Spec, n_kv: int, seed: int) -> HiRows:
    """Random MiKV rows for every block of the history, filled or not (past n_hist their idx is stale)."""
    g = torch.Generator().manual_seed(seed)
    B, D, block = len(LENGTHS), spec.head_dim, spec.block
    n = C_H // block * spec.hi_rows
    blocks = torch.rand(B, n_kv, C_H // block, block, generator=g).argsort(-1)[..., :spec.hi_rows]
    idx = (blocks + torch.arange(0, C_H, block)[:, None]).flatten(-2).int()

    def meta(group, lo, hi):
        return (torch.rand(B, n_kv, n, D // group, generator=g) * (hi - lo) + lo).half()

    codes = [torch.randint(0, 256, (B, n_kv, n, spec.packed_bytes(spec.hi_bits)), generator=g, dtype=torch.uint8)
             for _ in range(2)]
    return on_device(HiRows(History(codes[0], codes[1], meta(spec.k_group, 0.01, 0.03), meta(spec.k_group, -4, -2),
                                    meta(spec.v_group, 0.01, 0.03), meta(spec.v_group, -4, -2)), idx))


def _direct(args, kw, a, extra=None) -> torch.Tensor:
    """Attention over the dequantized concatenation in attention space (and `extra` keys and
    values (B, Hkv, n, D) after it), through minikv.store.reference_attention."""
    q, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v = args
    k_h, v_h = reference.dequantize_history(hist, spec, kw.get("rope"), kw.get("key_matrix"), kw.get("hi"),
                                            n_hist)
    if a is not None:
        k_h = k_h @ a.mT[None]
    if "value_matrix" in kw:
        v_h = v_h @ kw["value_matrix"]
    valid = reference.window_valid(lengths, n_hist, N_SINK, R)
    outs = []
    for b, L in enumerate(LENGTHS):
        n_s, n_h, w = min(L, N_SINK), int(n_hist[b]), valid[b]
        tail = [] if extra is None else [extra[0][b]], [] if extra is None else [extra[1][b]]
        k = torch.cat([sink_k[b, :, :n_s], k_h[b, :, :n_h], win_k[b][:, w], *tail[0]], dim=1)
        v = torch.cat([sink_v[b, :, :n_s], v_h[b, :, :n_h], win_v[b][:, w], *tail[1]], dim=1)
        outs.append(reference_attention(q[b, :, None], k, v, None)[:, 0])
    return torch.stack(outs)


CASES = [  # k_bits, v_bits, per-channel keys, k_group, v_group, GQA group, pre-RoPE, folded matrices
    (1, 1, True, 8, 8, 1, False, False),
    (2, 2, True, 32, 16, 2, False, True),
    (3, 3, True, 8, 8, 4, True, False),
    (4, 2, True, 32, 32, 4, False, False),
    (8, 8, True, 16, 8, 2, True, True),
    (1, 3, False, 8, 8, 2, False, True),
    (2, 4, False, 32, 16, 4, True, True),
    (3, 1, False, 16, 32, 1, False, False),
    (4, 8, False, 8, 8, 2, False, False),
    (8, 2, False, 32, 32, 4, True, False),
]


def test_hadamard_block_rebuilds_the_hadamard_matrix():
    """Pre-RoPE kernels get the block A of H = [[A, A], [A, -A]] in place of the store's H (kernels.layout)."""
    for d in (32, 128):
        torch.testing.assert_close(reference.full_key_matrix(hadamard_block(d)), hadamard(d))


def _ring_mass(seed: int) -> torch.Tensor:
    """(B, Hkv, R) attention mass the ring's slots gathered before the step."""
    return on_device(torch.rand(len(LENGTHS), 2, R, generator=torch.Generator().manual_seed(seed)) + 1)


def _case_id(c) -> str:
    return "k{}v{}-{}-kg{}-vg{}-gqa{}{}{}".format(c[0], c[1], "chan" if c[2] else "tok", *c[3:6],
                                                 "-prerope" if c[6] else "", "-fold" if c[7] else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("splits, block_n, ring_split",
                         [(1, G, None), (3, 2 * G, None), (2, G, False), (1, 2 * G, True)])
def test_decode_matches_twin(case, splits, block_n, ring_split):
    """History splits, with and without a split of their own for the sinks and the ring (the
    default gives them one when the history splits are short), against the twin."""
    k_bits, v_bits, per_channel, kg, vg, group, prerope, fold = case
    spec = Spec(D, k_bits, v_bits, per_channel, G, kg, vg)
    args, kw, a = _state(spec, 2, group, prerope, fold, seed=sum(case) + splits)
    before = _ring_mass(splits)
    mass_ref, mass, added = before.clone(), before.clone(), torch.zeros_like(before)
    want = reference.decode_attention(*args, **kw, mass=mass_ref)
    got = decode_attention(*args, **kw, mass=mass, splits=splits, block_n=block_n, block_w=G, ring_split=ring_split)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mass, mass_ref, atol=1e-5, rtol=1e-4)
    reference.decode_attention(*args, **kw, mass=added)
    assert added.sum() > 0
    # the new token's slot (none for the first sequence, still in its sinks) drops its old token's mass
    kept = before.clone()
    for b, L in enumerate(LENGTHS):
        if L > N_SINK:
            kept[b, :, (L - 1 - N_SINK) % R] = 0.0
    torch.testing.assert_close(mass_ref, kept + added)
    if splits == 1:
        torch.testing.assert_close(want, _direct(args, kw, a), atol=1e-5, rtol=1e-5)


HI_CASES = [  # case, splits, block_n, block: post-RoPE folded, pre-RoPE, pre-RoPE with a key matrix;
    (CASES[1], 1, G, G), (CASES[2], 3, 2 * G, G), (CASES[6], 1, 2 * G, G),  # tiles of one and of two blocks
    (CASES[6], 3, G, 2 * G),  # tiles of half a block (per-token keys: the block is only MiKV's)
]


@pytest.mark.parametrize("case, splits, block_n, block", HI_CASES,
                         ids=lambda x: _case_id(x) if isinstance(x, tuple) else str(x))
def test_decode_with_high_precision_rows(case, splits, block_n, block):
    """MiKV: a quarter of each block's rows attended through their 8-bit twins instead."""
    k_bits, v_bits, per_channel, kg, vg, group, prerope, fold = case
    spec = Spec(D, k_bits, v_bits, per_channel, block, kg, vg, hi_bits=8, hi_rows=block // 4)
    args, kw, _ = _state(spec, 2, group, prerope, fold, seed=sum(case))
    hi = _hi_rows(spec, 2, seed=splits)
    mass_ref, mass = _ring_mass(splits), _ring_mass(splits)
    want = reference.decode_attention(*args, **kw, mass=mass_ref, hi=hi)
    got = decode_attention(*args, **kw, mass=mass, hi=hi, splits=splits, block_n=block_n, block_w=G)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mass, mass_ref, atol=1e-5, rtol=1e-4)
    low_bit = reference.decode_attention(*args[:5], replace(spec, hi_rows=0), *args[6:], **kw)
    assert (want - low_bit)[1:].abs().amax() > 0.05  # the rows matter where the history holds tokens
    torch.testing.assert_close(want[0], low_bit[0])  # and nowhere else: the first holds none


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 2, 3, 4, 6, 9)], ids=_case_id)
def test_decode_in_16_bits(case):
    """A 16-bit model's step: codes become float16 by the mantissa trick and the history is
    dequantized, rotated and multiplied in float16. Within float16 rounding of the float32 twin.
    (bfloat16 models take the same path; the interpreter cannot run bfloat16 dots, so the GPU
    benchmark's store check covers them.)"""
    dtype = torch.float16
    k_bits, v_bits, per_channel, kg, vg, group, prerope, fold = case
    spec = Spec(D, k_bits, v_bits, per_channel, G, kg, vg)
    args, kw, _ = _state(spec, 2, group, prerope, fold, seed=sum(case))
    want = reference.decode_attention(*args, **kw)
    q, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v = args
    low = [t.to(dtype) for t in (q, sink_k, sink_v, win_k, win_v)]
    kw16 = {**kw, "q_hist": kw["q_hist"].to(dtype)} if "q_hist" in kw else kw
    got = decode_attention(*low[:3], lengths, hist, spec, n_hist, *low[3:], **kw16, splits=3, block_n=2 * G,
                           block_w=G)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_two_bit_keys_by_fields(dtype):
    """2-bit per-channel keys take the keys-by-fields path only from head dim 64 (16 bytes a row); the small
    shapes' head dim of 32 leaves them whole, so this case doubles it."""
    spec = Spec(max(D, 64), 2, 2, True, G, 32, 16)
    assert keys_by_fields(spec, None) and not keys_by_fields(replace(spec, head_dim=32), None)
    args, kw, _ = _state(spec, 2, 4, False, False, seed=7)
    want = reference.decode_attention(*args, **kw)
    q, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v = args
    low = [t.to(dtype) for t in (q, sink_k, sink_v, win_k, win_v)]
    got = decode_attention(*low[:3], lengths, hist, spec, n_hist, *low[3:], **kw, splits=3, block_n=2 * G, block_w=G)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter cannot run bfloat16 dots")
def test_bf16_model_meets_its_rows_in_float16():
    """A bfloat16 model's step against the float32 twin on the same bfloat16 inputs, with attention sharp
    enough for score errors to show: the kernel's roundings are float16's (queries, probabilities,
    dequantized history) and the output's own. Full-precision rows met the queries and probabilities in
    bfloat16 before, which left 1.96e-3 mean relative error here where there is 1.57e-3 (H100)."""
    args, kw, _ = _state(Spec(D, 2, 2, True, G, 32, 16), 2, 2, False, False, seed=5)
    q, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v = args
    low = [t.to(torch.bfloat16) for t in (4 * q, sink_k, sink_v, win_k, win_v)]
    want = reference.decode_attention(*[t.float() for t in low[:3]], lengths, hist, spec, n_hist,
                                      *[t.float() for t in low[3:]], **kw)
    got = decode_attention(*low[:3], lengths, hist, spec, n_hist, *low[3:], **kw)
    err = ((got.float() - want).abs().mean() / want.abs().mean()).item()
    assert err < 1.75e-3


STORE_CASES = {  # KVSettings overrides, key channel permutation
    "k4v2": (dict(bits_k=4, bits_v=2), False),
    "skvq-like": (dict(bits_k=2, bits_v=3, key_axis="token", group_k=8, reorder=True, rotate_v=True), True),
    "rotatekv": (dict(bits_k=2, bits_v=2, rotate_k=True, rotate_v=True, prerope=True), False),
    "prerope-reorder": (dict(bits_k=3, bits_v=4, group_k=16, reorder=True, prerope=True), True),
}


@pytest.mark.parametrize("name", STORE_CASES)
def test_store_path_matches_the_store(name):
    """kernels.store_attention on a real QuantizedStore (kernel attention for prefill chunks and
    decode steps, kernel quantize-and-pack for its block moves) against the store's own path,
    through a decode step that moves a block into the history and the one after."""
    from kernels import store_attention
    from minikv.config import ModelConfig
    from minikv.model import rope_tables
    from minikv.presets import KVSettings
    from minikv.qstore import LayerPlan, QuantizedStore

    overrides, reorder = STORE_CASES[name]
    n_kv, group, B, cap = 2, 2, 2, 4096 if REAL else 128
    s = KVSettings(group=G, group_v=16, window=W, n_sink=N_SINK, **overrides)
    g = torch.Generator().manual_seed(len(name))
    perm = torch.stack([torch.randperm(D, generator=g) for _ in range(n_kv)]) if reorder else None
    cfg = ModelConfig(vocab_size=10, dim=4 * D, n_layers=1, n_heads=n_kv * group, n_kv_heads=n_kv, hidden_dim=8,
                      head_dim=D)
    stores = [QuantizedStore(1, B, cap, n_kv, D, None, torch.float32, DEVICE, settings=s,
                             plans=[LayerPlan(s.bits_k, s.bits_v, 0.9, 1.0, perm)], rope=rope_tables(cfg, cap),
                             kernels=False, mirror=False) for _ in range(2)]
    ref, fast = stores
    assert store_attention.supported(fast, 0)
    fast._flush = lambda layer, k, v, a, b, mass: store_attention.flush(fast, layer, k, v, a, b)
    # 99 tokens (real: 2115, 30 history blocks): the ring holds W + G - 1, so the next token moves a block
    for T in ((1000, 1115) if REAL else (60, 39)) + (1, 1):
        q, k, v = on_device(tuple(torch.randn(B, h, T, D, generator=g) for h in (n_kv * group, n_kv, n_kv)))
        start, pos = fast.length, fast.positions(T)
        got, _ = store_attention.attend(fast, 0, q, k, v, start)
        fast._append(0, k, v, start, None)
        want = ref.attend(0, q, k, v, pos)
        for st in stores:
            st.advance(T)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got_t, want_t in zip(ref.dequantized_history(0, raw=True), fast.dequantized_history(0, raw=True)):
        assert (got_t - want_t).abs().max() < 0.5 and (got_t != want_t).float().mean() < 0.02


PACK_CASES = [  # k_bits, v_bits, per-channel keys, k_group, v_group, clip, pre-RoPE, matrices
    (1, 2, True, 8, 8, 1.0, False, False),
    (2, 3, False, 16, 8, 0.9, False, False),
    (3, 4, True, 32, 16, 0.8, True, False),
    (4, 8, False, 8, 32, 1.0, True, False),
    (8, 1, True, 16, 16, 0.95, False, False),
    (2, 2, True, 32, 32, 1.0, True, True),
    (4, 2, False, 16, 16, 0.9, False, True),
]


@pytest.mark.parametrize("case", PACK_CASES, ids=lambda c: "k{}v{}-{}-kg{}-vg{}-clip{}{}{}".format(
    c[0], c[1], "chan" if c[2] else "tok", *c[3:6], "-prerope" if c[6] else "", "-mat" if c[7] else ""))
def test_quantize_pack_matches_twin(case):
    """Two blocks leave a wrapped ring for history rows G..3G-1; other rows stay as they were."""
    from kernels.quantize_pack import quantize_pack

    k_bits, v_bits, per_channel, kg, vg, clip, prerope, matrices = case
    B, n_kv, src0 = len(LENGTHS), 2, R - G // 2
    spec = Spec(D, k_bits, v_bits, per_channel, G, kg, vg)
    g = torch.Generator().manual_seed(sum(map(int, case[:5])))
    ring_k, ring_v = torch.randn(B, n_kv, R, D, generator=g) * 3, torch.randn(B, n_kv, R, D, generator=g)
    ring_k, ring_v = on_device((ring_k, ring_v))
    args, _, _ = _state(spec, n_kv, 1, False, False, seed=1)
    hist = History(*(t.clone() for t in args[4]))
    before = History(*(t.clone() for t in hist))
    kw = {}
    rows = (src0 + torch.arange(2 * G)) % R
    k, v = ring_k[:, :, rows], ring_v[:, :, rows]
    if prerope:
        emb = _rope_angles(D)
        kw["rope"] = on_device(PreRope(emb.cos(), emb.sin(), torch.full((B,), N_SINK)))
        pos = N_SINK + G + torch.arange(2 * G)
        k = apply_rope(k, *on_device((emb.cos()[pos], -emb.sin()[pos])))
    if matrices:
        kw["key_matrix"], kw["value_matrix"] = on_device((_orthogonal(n_kv, D, g), hadamard(D)))
        k, v = k @ kw["key_matrix"][None], v @ kw["value_matrix"]
    quantize_pack(ring_k, ring_v, src0, 2 * G, hist, G, spec, clip, clip, **kw)
    want = reference.quantize_block(k, v, spec, clip, clip)
    meta_rows = slice(1, 3) if per_channel else slice(G, 3 * G)
    got_k, got_v = reference.dequantize_history(hist, spec)
    twin = History(*(t.clone() for t in before))
    for name, rows_ in (("k", slice(G, 3 * G)), ("v", slice(G, 3 * G)), ("k_scale", meta_rows),
                        ("k_zero", meta_rows), ("v_scale", slice(G, 3 * G)), ("v_zero", slice(G, 3 * G))):
        getattr(twin, name)[:, :, rows_] = getattr(want, name)
    want_k, want_v = reference.dequantize_history(twin, spec)
    # fp32 matrix products in another order, or a GPU's approximate division: a rare code may round the other way
    if matrices or DEVICE != "cpu":
        near = slice(0, 4 * G)  # the moved blocks and one on each side (the whole small history)
        for got_x, want_x, scale in ((got_k, want_k, hist.k_scale), (got_v, want_v, hist.v_scale)):
            assert (got_x - want_x).abs().max() <= scale.float().max() * 1.01
            assert (got_x != want_x)[:, :, near].float().mean() < 0.02
        torch.testing.assert_close(hist.k_scale, twin.k_scale, atol=2e-3, rtol=2e-3)
    else:
        for got_t, want_t in zip(hist, twin):
            assert torch.equal(got_t, want_t)


@pytest.mark.parametrize("matrices, ties", [(False, False), (True, False), (False, True)],
                         ids=["plain", "matrices", "ties"])
def test_quantize_pack_writes_high_precision_rows(matrices, ties):
    """MiKV: of each block it moves, the packer gives the tokens with the most attention mass (ties to
    the earlier token) per-token 8-bit rows and their history rows in the index, as the twin does;
    other blocks' rows stay as they were."""
    from kernels.quantize_pack import quantize_pack

    n_kv, src0, n_hi = 2, R - G // 2, G // 4
    spec = Spec(D, 2, 2, True, G, 16, 8, hi_bits=8, hi_rows=n_hi)
    g = torch.Generator().manual_seed(int(ties))
    B = len(LENGTHS)
    ring_k, ring_v = torch.randn(B, n_kv, R, D, generator=g) * 3, torch.randn(B, n_kv, R, D, generator=g)
    mass = torch.randint(0, 2, (B, n_kv, R), generator=g).float() if ties else torch.rand(B, n_kv, R, generator=g)
    ring_k, ring_v, mass = on_device((ring_k, ring_v, mass))
    hist = History(*(t.clone() for t in _state(spec, n_kv, 1, False, False, seed=1)[0][4]))
    hi = _hi_rows(spec, n_kv, seed=2)
    before = HiRows(History(*(t.clone() for t in hi.rows)), hi.idx.clone())
    rows = on_device((src0 + torch.arange(2 * G)) % R)
    k, v, kw = ring_k[:, :, rows], ring_v[:, :, rows], {}
    if matrices:
        kw["key_matrix"], kw["value_matrix"] = on_device((_orthogonal(n_kv, D, g), hadamard(D)))
        k, v = k @ kw["key_matrix"][None], v @ kw["value_matrix"]
    quantize_pack(ring_k, ring_v, src0, 2 * G, hist, G, spec, hi=hi, mass=mass, **kw)
    want = reference.quantize_hi_rows(k, v, mass[:, :, rows], spec, row0=G)
    moved = slice(n_hi, 3 * n_hi)  # the rows of history blocks 1 and 2
    assert torch.equal(hi.idx[:, :, moved], want.idx)
    picked = mass[:, :, rows].gather(2, want.idx.long() - G).unflatten(-1, (2, n_hi))
    assert (picked.amin(-1) >= mass[:, :, rows].unflatten(-1, (2, G)).sort(-1).values[..., -n_hi - 1]).all()
    if matrices:  # fp32 matrix products in another order: a rare code may round the other way
        for got, twin in ((hi.rows.k, want.rows.k), (hi.rows.v, want.rows.v)):
            assert ((got[:, :, moved].int() - twin.int()).abs() <= 1).all()
            assert (got[:, :, moved] != twin).float().mean() < 0.02
        torch.testing.assert_close(hi.rows.k_scale[:, :, moved], want.rows.k_scale, atol=2e-3, rtol=2e-3)
    else:
        for got, twin in zip(hi.rows, want.rows):
            assert torch.equal(got[:, :, moved], twin)
    for got, old in zip((*hi.rows, hi.idx), (*before.rows, before.idx)):
        for other in (slice(0, n_hi), slice(3 * n_hi, None)):
            assert torch.equal(got[:, :, other], old[:, :, other])


@pytest.mark.parametrize("case, mikv", [(CASES[1], False), (CASES[2], True), (CASES[4], False), (CASES[6], False),
                                        (CASES[9], False), (CASES[6], True)], ids=lambda x: _case_id(x) if isinstance(x, tuple) else
                         ("mikv" if x else ""))
def test_prefill_matches_twin(case, mikv):
    """A chunk of 21 tokens (two query blocks, the last partial; 301 tokens at real shapes) after what the
    store holds; with MiKV's rows, and the attention mass of the ring and of the chunk's own tokens."""
    from kernels.prefill_attention import prefill_attention

    k_bits, v_bits, per_channel, kg, vg, group, prerope, fold = case
    spec = Spec(D, k_bits, v_bits, per_channel, G, kg, vg, hi_bits=8 if mikv else 0, hi_rows=G // 4 if mikv else 0)
    args, kw, a = _state(spec, 2, group, prerope, False, seed=sum(case))
    if mikv:
        kw["hi"] = _hi_rows(spec, 2, seed=5)
    q, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v = args
    g = torch.Generator().manual_seed(7)
    B, T = len(LENGTHS), 301 if REAL else 21
    q = torch.randn(B, 2 * group, T, D, generator=g)
    k_new, v_new = torch.randn(B, 2, T, D, generator=g), torch.randn(B, 2, T, D, generator=g)
    q, k_new, v_new = on_device((q, k_new, v_new))
    if fold:
        kw["value_matrix"] = on_device(hadamard(D))
        kw["q_hist"] = on_device(torch.randn(B, 2 * group, T, D, generator=g))
    chunk_args = (q, k_new, v_new, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v)
    mass_ref, mass = on_device((torch.zeros(B, 2, R + T), torch.zeros(B, 2, R + T)))
    want = reference.prefill_attention(*chunk_args, **kw, mass=mass_ref)
    got = prefill_attention(*chunk_args, **kw, mass=mass, block_m=16 // group, block_n=2 * G, block_w=G)
    # Pre-RoPE keys deep in a real history: the kernel's RoPE adds a tile's base angle to the in-tile one, the
    # twin reads the table's row, and past 2K tokens fp32 angles round up to 2.4e-4 rad apart (interpreted, this
    # history came out 1.5e-4 off the twin, 7e-5 with the table's angles exact to fp32): 3e-4 there.
    tol = 3e-4 if prerope and REAL else 1e-4
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, mass_ref, atol=tol, rtol=tol)
    assert (mass_ref[:, :, R:] > 0).all()  # every new token is seen, by itself at least
    if not fold:  # against attention over the concatenation, one query token at a time
        for t in (0, 9, T - 1):
            held = (q[:, :, t], sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v)
            k_t, v_t = k_new[:, :, :t + 1], v_new[:, :, :t + 1]
            direct = _direct(held, kw, a, extra=(k_t, v_t))
            torch.testing.assert_close(want[:, :, t], direct, atol=1e-5, rtol=1e-5)
