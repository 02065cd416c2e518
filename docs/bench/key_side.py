"""The key side of decode attention alone, to see how fast dequantizing in registers can go.

    PYTHONPATH=. python docs/bench/key_side.py          (CUDA; OUT=DIR also writes DIR/key_side.json)
    TRITON_INTERPRET=1 PYTHONPATH=. python docs/bench/key_side.py    (CPU: a correctness check, small)

2-bit per-channel keys (kivi2's layout, D=128, 32-token blocks) against 16 query rows (4 heads of
a KV group, padded for the tensor cores): scores, then a running log-sum-exp, no values. Three
forms: MODE 0 dequantizes as the decode kernel does (kernels.dequant, interleaving the fields of
each byte), the keys the second dot operand; MODE 1 keeps each 2-bit field of a byte as its own
tile (channels 4j+f) with one dot per field; MODE 2 is MODE 1 with the keys as the first operand
(scores transposed).
"""
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels.dequant import dequant_channels, field

D, G, ROWS = 128, 32, 16
NB = D // 4  # bytes per token at 2 bits


@triton.jit
def _field(byt, s_ptr, z_ptr, moff, F: tl.constexpr):
    """Keys (N, D/4) of channels 4j + F, dequantized in float16."""
    return field(byt, 2, F, True) * tl.load(s_ptr + moff + F) + tl.load(z_ptr + moff + F)


@triton.jit
def _lse_step(s, m_i, l_i, AXIS: tl.constexpr):
    """The running max and sum of exp2 over the scores' axis AXIS."""
    m_new = tl.maximum(m_i, tl.max(s, AXIS))
    keep = tl.exp2(m_i - m_new)
    if AXIS == 1:
        total = tl.sum(tl.exp2(s - m_new[:, None]), 1)
    else:
        total = tl.sum(tl.exp2(s - m_new[None, :]), 0)
    return m_new, l_i * keep + total


@triton.jit
def kern(q_ptr, k_ptr, s_ptr, z_ptr, o_ptr, n_tok, per_split, MODE: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
         G: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr):
    bh, sp = tl.program_id(0), tl.program_id(1)
    m = tl.arange(0, ROWS)
    m_i = tl.full((ROWS,), -1e30, tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    q_rows = q_ptr + bh * ROWS * D + m[:, None] * D
    for t in range(sp * per_split, sp * per_split + per_split):
        rows = t * BN + tl.arange(0, BN)
        tok = k_ptr + (bh * n_tok + rows) * NB
        if MODE == 0:
            meta_row = (bh * n_tok // G + t * BN // G) * D
            k = dequant_channels(tok, rows >= 0, meta_row, s_ptr, z_ptr, 2, 0, D, BN // G, BN, D, True)
            s = tl.dot(tl.load(q_rows + tl.arange(0, D)[None, :]), tl.trans(k))
            m_i, l_i = _lse_step(s, m_i, l_i, 1)
        else:
            byt = tl.load(tok[:, None] + tl.arange(0, NB)[None, :])
            moff = (bh * n_tok // G + rows // G)[:, None] * D + tl.arange(0, NB)[None, :] * 4
            qf = q_rows + tl.arange(0, NB)[None, :] * 4
            if MODE == 1:  # keys as the second operand
                s = tl.dot(tl.load(qf), tl.trans(_field(byt, s_ptr, z_ptr, moff, 0)))
                for f in tl.static_range(1, 4):
                    s = tl.dot(tl.load(qf + f), tl.trans(_field(byt, s_ptr, z_ptr, moff, f)), s)
                m_i, l_i = _lse_step(s, m_i, l_i, 1)
            else:  # keys as the first operand: scores transposed (BN, ROWS)
                s = tl.dot(_field(byt, s_ptr, z_ptr, moff, 0), tl.trans(tl.load(qf)))
                for f in tl.static_range(1, 4):
                    s = tl.dot(_field(byt, s_ptr, z_ptr, moff, f), tl.trans(tl.load(qf + f)), s)
                m_i, l_i = _lse_step(s, m_i, l_i, 0)
    tl.store(o_ptr + (bh * tl.num_programs(1) + sp) * ROWS + m, m_i + tl.log2(l_i))


def run(mode: int, q, k, s, z, splits: int, block_n: int, warps: int):
    """Per-split log2-sum-exp (BH, splits, ROWS), and the compiled kernel's (registers, shared bytes)."""
    BH, n_tok = k.shape[:2]
    o = torch.empty(BH, splits, ROWS, device=q.device, dtype=torch.float32)
    ck = kern[(BH, splits)](q, k, s, z, o, n_tok, n_tok // block_n // splits, MODE=mode, BN=block_n, D=D, G=G,
                            ROWS=ROWS, NB=NB, num_warps=warps)
    return o, (getattr(ck, "n_regs", None), getattr(getattr(ck, "metadata", None), "shared", None))


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    BH, n_tok, splits = (64, 32768, 8) if dev == "cuda" else (2, 256, 2)
    q = (torch.randn(BH, ROWS, D, device=dev) * 0.1).half()
    k = torch.randint(0, 256, (BH, n_tok, NB), dtype=torch.uint8, device=dev)
    s = (torch.rand(BH, n_tok // G, D, device=dev) * 0.1).half()
    z = (torch.rand(BH, n_tok // G, D, device=dev) - 0.5).half()
    codes = ((k[..., None].int() >> torch.arange(0, 8, 2, device=dev)) & 3).flatten(-2).float()
    keys = codes * s.float().repeat_interleave(G, 1) + z.float().repeat_interleave(G, 1)
    scores = (q.float() @ keys.mT).unflatten(-1, (splits, -1))  # log2 domain, as the kernel's exp2
    want = (torch.logsumexp(scores * torch.log(torch.tensor(2.0)), -1) / torch.log(torch.tensor(2.0))).mT
    results = []
    for mode in (0, 1, 2):
        for block_n in (64, 128) if dev == "cuda" else (64,):
            for warps in (4, 8) if dev == "cuda" else (4,):
                r = dict(mode=mode, block_n=block_n, warps=warps)
                try:
                    got, r["regs_shared"] = run(mode, q, k, s, z, splits, block_n, warps)
                    r["max_abs_err"] = (got - want).abs().max().item()
                    if dev == "cuda":
                        r["ms"] = triton.testing.do_bench(lambda: run(mode, q, k, s, z, splits, block_n, warps),
                                                          return_mode="median")
                except Exception as e:  # a form that does not compile is recorded
                    r["error"] = repr(e)[-600:]
                print(json.dumps(r), flush=True)
                results.append(r)
    if "OUT" in os.environ:
        (Path(os.environ["OUT"]) / "key_side.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
