"""A QuantizedStore through the Triton kernels (kernels=True) against itself through the PyTorch
reference: the device-side decode step (fill levels from `positions`, blocks moved in advance()),
sequences of different lengths decoding together, and `write`.

By default on CPU through Triton's interpreter, so shapes are tiny: one layer, one KV head, D 32,
G 8, W 8, 2 sinks (ring of 16), so a few dozen tokens cross several blocks and wrap the ring. With
MINIKV_TEST_SHAPES=real on CUDA (tests/shapes.py): two KV heads of four query heads, D 128, the presets'
own window, blocks and sinks, and 2048 more history tokens before the block moves the tests cross. The
capacity is large enough that decode splits its history (splits follow the capacity).
"""
from __future__ import annotations

from importlib.util import find_spec

import pytest

from tests.shapes import DEVICE, REAL, on_device, skip_without_device  # first: sets TRITON_INTERPRET on the CPU

import torch

from minikv.config import ModelConfig
from minikv.model import rope_tables
from minikv.presets import KVSettings
from minikv.qstore import BUFFERS, LayerPlan, QuantizedStore
from minikv.store import FullPrecisionStore

skip_without_device()
needs_triton = pytest.mark.skipif(find_spec("triton") is None, reason="the kernels need triton")

D, N_KV, GROUP, CAP = (128, 2, 4, 4096) if REAL else (32, 1, 2, 600)
HISTORY = 2048 if REAL else 0  # history tokens held before the block moves a test crosses
SMALL = dict(group=8, group_k=8, group_v=8, window=8, n_sink=2)
PRESETS = {  # keys per channel after RoPE: plain, rotated 4-bit (by fields in decode), rotated with MiKV's 8-bit rows
    name: KVSettings.from_preset(name, **({} if REAL else SMALL)) for name in ("kivi2", "k4v2", "mikv")
}
# rotated pre-RoPE keys, 1-bit values with one scale per head (its 128-wide group is the whole head at any head
# dim here)
PRESETS["k2v1"] = KVSettings.from_preset("k2v1", **({} if REAL else {**SMALL, "group_v": 128}))


def short_of_a_move(s: KVSettings) -> int:
    """The length one token short of moving the block after HISTORY history tokens (17 when tiny)."""
    return s.n_sink + s.window + HISTORY + s.group - 1


def make(settings: KVSettings, kernels: bool, batch: int = 1, mirror: bool | None = None) -> QuantizedStore:
    cfg = ModelConfig(vocab_size=10, dim=N_KV * GROUP * D, n_layers=1, n_heads=N_KV * GROUP, n_kv_heads=N_KV,
                      hidden_dim=8, head_dim=D)
    return QuantizedStore(1, batch, CAP, N_KV, D, None, torch.float32, DEVICE, settings=settings,
                          plans=[LayerPlan(settings.bits_k, settings.bits_v)], rope=rope_tables(cfg, CAP),
                          kernels=kernels, mirror=mirror)


def qkv(g: torch.Generator, T: int, batch: int = 1) -> tuple[torch.Tensor, ...]:
    return on_device(tuple(torch.randn(batch, h, T, D, generator=g) for h in (N_KV * GROUP, N_KV, N_KV)))


def step(store: QuantizedStore, q, k, v) -> torch.Tensor:
    out = store.attend(0, q, k, v, store.positions(k.shape[2]))
    store.advance(k.shape[2])
    return out


@needs_triton
@pytest.mark.parametrize("name", PRESETS)
def test_kernel_path_equals_reference_path(name):
    """Prefill chunks and decode steps across three block moves (by decode step, by chunk, by decode
    step), the ring wrapping twice or more: the same outputs through the kernels as through the reference,
    and with MiKV the same tokens kept at high precision (chosen by the attention mass of each path)."""
    # The reference without its fp16 working copy dequantizes the history exactly, as the kernels do.
    s = PRESETS[name]
    fast, ref = make(s, True), make(s, False, mirror=False)
    assert fast.static is (DEVICE == "cuda") and not fast.view_k and not ref.view_k  # a graph on CUDA only
    g = torch.Generator().manual_seed(0)
    # 38 tokens when tiny (5, 1, 1, 1, 9, 1 x 6, 6, 1 x 9): blocks move at 18, 26, 34
    for T in [short_of_a_move(s) - 12, 1, 1, 1, 9, *[1] * 6, s.group - 2, *[1] * (s.group + 1)]:
        q, k, v = qkv(g, T)
        torch.testing.assert_close(step(fast, q, k, v), step(ref, q, k, v), atol=1e-4, rtol=1e-4)
    assert fast.n_hist(fast.length) == HISTORY + 3 * s.group
    kept = [store.used_part("hi_idx", store.hi_idx[0]) for store in (fast, ref)]
    assert torch.equal(*kept) and kept[0].numel() == N_KV * fast.n_hi * (HISTORY // s.group + 3)


def _batch(stores: list[QuantizedStore]) -> QuantizedStore:
    """One store holding each single-sequence store's contents as a batch row (their lengths differ)."""
    out = make(stores[0].settings, True, len(stores))
    for name in BUFFERS:
        for layer, t in enumerate(getattr(out, name)):
            if t.dim() > 1:
                for b, s in enumerate(stores):
                    t[b] = getattr(s, name)[layer][0]
    out.lengths = [s.length for s in stores]
    return out


PAST = {name: short_of_a_move(s) + 2 for name, s in PRESETS.items()}  # a token past a block move: 19 when tiny


@needs_triton
@pytest.mark.parametrize("name, starts", [("kivi2", (1, PAST["kivi2"])), ("mikv", (1, PAST["mikv"])),
                                          ("mikv", (PAST["mikv"], PAST["mikv"]))])
def test_sequences_of_different_lengths_decode_together(name, starts):
    """One sequence still in its sinks, the other past a block move, decode together (the first
    into its ring, the second through another block move): each gets what it gets alone. Two at the
    same length move their blocks together, in one launch."""
    s = PRESETS[name]
    g = torch.Generator().manual_seed(1)
    alone = [make(s, True), make(s, True)]
    for store, T in zip(alone, starts):
        step(store, *qkv(g, T))
    both = _batch(alone)
    n = s.group + 1
    for _ in range(n):  # when tiny, lengths 1 -> 10 and 19 -> 28: the second moves a block at 26
        q, k, v = qkv(g, 1, 2)
        got = step(both, q, k, v)
        for b, store in enumerate(alone):
            torch.testing.assert_close(got[b:b + 1], step(store, q[b:b + 1], k[b:b + 1], v[b:b + 1]), atol=1e-5,
                                       rtol=1e-5)
    assert both.lengths == [t + n for t in starts] and both.n_hist(starts[1] + n) == HISTORY + 2 * s.group


@needs_triton
def test_decode_step_reads_no_host_state():
    """A replayed CUDA graph reruns the first step's launches with new `positions` only: run the
    second step with the host lengths of the first (as the graph would see them), across a block
    move that changes the history length and the ring slot, and get the eager results."""
    s = PRESETS["k2v1"]  # keys before RoPE: the step's positions reach the kernel
    g = torch.Generator().manual_seed(2)
    replay, eager = make(s, True), make(s, True)
    prompt = qkv(g, short_of_a_move(s))
    for store in (replay, eager):
        step(store, *prompt)
    captured = list(replay.lengths)
    for _ in range(2):  # 17 -> 18 (when tiny) moves a block, so the second step has G more history tokens
        q, k, v = qkv(g, 1)
        want = step(eager, q, k, v)
        positions, lengths = replay.positions(1), replay.lengths
        replay.lengths = captured
        got = replay.attend(0, q, k, v, positions)
        replay.lengths = lengths
        replay.advance(1)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert replay.n_hist(replay.length) == HISTORY + s.group


@pytest.mark.parametrize("kind", ["full", "reference", pytest.param("triton", marks=needs_triton)])
def test_write_then_decode_equals_attending(kind):
    """Filling a store with `write` leaves what attending leaves: the next decode step agrees."""
    if kind == "full":
        stores = [FullPrecisionStore(1, 1, CAP, N_KV, D, None, torch.float32, DEVICE) for _ in range(2)]
    else:
        stores = [make(PRESETS["kivi2"], kind == "triton") for _ in range(2)]
    written, attended = stores
    g = torch.Generator().manual_seed(3)
    for T in (short_of_a_move(PRESETS["kivi2"]) - 6, 6, 1, 1):  # a block moves at 18 (when tiny), by a single token
        q, k, v = qkv(g, T)
        written.write(0, k, v)
        written.advance(T)
        step(attended, q, k, v)
    q, k, v = qkv(g, 1)
    torch.testing.assert_close(step(written, q, k, v), step(attended, q, k, v), atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.skipif(REAL, reason="a tiny model on the CPU, at the tiny presets only")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch.compile's internals
def test_compiled_model_leaves_the_store_attention_out():
    """GraphDecodeStep(compile=True)'s model with a quantized store: torch.compile runs the kernel
    path's attention as it is (a graph break, not traced) and gives the eager model's logits. Every one
    of the 10 layers is compiled (dynamo's default recompile limit, 8, left the last two eager), and the
    same model then compiles for an fp16 store in one graph (as `minikv bench --compile` does)."""
    import torch._dynamo.config

    from minikv.cuda_graph import compile_settings, compiled
    from minikv.geometries import random_model
    from minikv.presets import make_store

    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=10, n_heads=2, n_kv_heads=1, hidden_dim=64)
    model = random_model(cfg, "cpu", torch.float32)
    ids = torch.randint(0, 64, (1, 19), generator=torch.Generator().manual_seed(4))
    outs = []
    for kv, compile_ in (("kivi2", False), ("kivi2", True), ("fp16", True)):
        settings = PRESETS["kivi2"].replace(attention="triton") if kv == "kivi2" else "fp16"
        store = make_store(cfg, settings, 1, 32, torch.float32, "cpu", static=True)
        assert kv == "fp16" or store._fast == [True] * cfg.n_layers
        m = compiled(model, store) if compile_ else model
        strict = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
        with torch.no_grad(), compile_settings(cfg.n_layers), strict:
            for a, b in ((0, 17), (17, 18), (18, 19)):  # the first decode step moves a block
                logits = m(ids[:, a:b], store.positions(b - a), store, last_only=True)
                store.advance(b - a)
        outs.append(logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
