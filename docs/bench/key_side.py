"""The key side of decode attention alone, to see how fast dequantizing in registers can go.

    python docs/bench/key_side.py          (CUDA; OUT=DIR also writes DIR/kmicro.json)
    TRITON_INTERPRET=1 python docs/bench/key_side.py    (CPU: a correctness check at a small shape)

2-bit per-channel keys (kivi2's layout, D=128, 32-token blocks) against 16 query rows (4 heads of
a KV group, padded for the tensor cores): scores, then a running log-sum-exp, no values. Three
forms: MODE 0 unpacks by interleaving (as kernels.dequant does) with the keys as the second dot
operand; MODE 1 keeps each 2-bit field of a byte as its own tile (channels 4j+f) with one dot per
field; MODE 2 is MODE 1 with the keys as the first operand (scores transposed).
"""
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

@triton.jit
def _codes16(byt):
    return (byt | 0x6400).to(tl.float16, bitcast=True) - 1024.0

@triton.jit
def kern(q_ptr, k_ptr, s_ptr, z_ptr, o_ptr, n_tok, per_split, MODE: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
         G: tl.constexpr):
    bh = tl.program_id(0); sp = tl.program_id(1)
    NB: tl.constexpr = D // 4  # bytes per token (2-bit)
    m = tl.arange(0, 16)
    m_i = tl.full((16,), -1e30, tl.float32); l_i = tl.zeros((16,), tl.float32)
    t0 = sp * per_split
    if MODE == 0:  # interleave by reshape, keys as the B operand
        q = tl.load(q_ptr + bh * 16 * D + m[:, None] * D + tl.arange(0, D)[None, :])
        for t in range(t0, t0 + per_split):
            rows = t * BN + tl.arange(0, BN)
            byt = tl.load(k_ptr + (bh * n_tok + rows)[:, None] * NB + tl.arange(0, NB)[None, :]).to(tl.int16)
            sh = (tl.arange(0, 4) * 2).to(tl.int16)
            c = _codes16(tl.reshape((byt[:, :, None] >> sh[None, None, :]) & 3, (BN, D)))
            c = tl.reshape(c, (BN // G, G, D))
            meta = (bh * n_tok // G + t * BN // G + tl.arange(0, BN // G))[:, None] * D + tl.arange(0, D)[None, :]
            sc = tl.load(s_ptr + meta); zc = tl.load(z_ptr + meta)
            k = tl.reshape(c * sc[:, None, :] + zc[:, None, :], (BN, D))
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, 1)); l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1); m_i = m_new
    else:  # field-split: field f of byte j is channel 4j + f; q gathered per field
        qf0 = tl.load(q_ptr + bh * 16 * D + m[:, None] * D + (tl.arange(0, NB) * 4 + 0)[None, :])
        qf1 = tl.load(q_ptr + bh * 16 * D + m[:, None] * D + (tl.arange(0, NB) * 4 + 1)[None, :])
        qf2 = tl.load(q_ptr + bh * 16 * D + m[:, None] * D + (tl.arange(0, NB) * 4 + 2)[None, :])
        qf3 = tl.load(q_ptr + bh * 16 * D + m[:, None] * D + (tl.arange(0, NB) * 4 + 3)[None, :])
        for t in range(t0, t0 + per_split):
            rows = t * BN + tl.arange(0, BN)
            byt = tl.load(k_ptr + (bh * n_tok + rows)[:, None] * NB + tl.arange(0, NB)[None, :]).to(tl.int16)
            blk = rows // G
            moff = (bh * n_tok // G + blk)[:, None] * D + tl.arange(0, NB)[None, :] * 4
            k0 = _codes16(byt & 3) * tl.load(s_ptr + moff) + tl.load(z_ptr + moff)
            k1 = _codes16((byt >> 2) & 3) * tl.load(s_ptr + moff + 1) + tl.load(z_ptr + moff + 1)
            k2 = _codes16((byt >> 4) & 3) * tl.load(s_ptr + moff + 2) + tl.load(z_ptr + moff + 2)
            k3 = _codes16((byt >> 6) & 3) * tl.load(s_ptr + moff + 3) + tl.load(z_ptr + moff + 3)
            if MODE == 1:  # keys as B
                s = tl.dot(qf0, tl.trans(k0)); s = tl.dot(qf1, tl.trans(k1), s); s = tl.dot(qf2, tl.trans(k2), s); s = tl.dot(qf3, tl.trans(k3), s)
                m_new = tl.maximum(m_i, tl.max(s, 1)); l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1); m_i = m_new
            else:  # keys as A: scores transposed (BN, 16)
                st = tl.dot(k0, tl.trans(qf0)); st = tl.dot(k1, tl.trans(qf1), st); st = tl.dot(k2, tl.trans(qf2), st); st = tl.dot(k3, tl.trans(qf3), st)
                m_new = tl.maximum(m_i, tl.max(st, 0)); l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(st - m_new[None, :]), 0); m_i = m_new
    tl.store(o_ptr + (bh * tl.num_programs(1) + sp) * 16 + m, m_i + tl.log2(l_i))

def run(mode, q, k, s, z, n_tok, splits, BN, warps, G=32):
    BH = q.shape[0]
    o = torch.empty(BH, splits, 16, device=q.device, dtype=torch.float32)
    per = n_tok // BN // splits
    ck = kern[(BH, splits)](q, k, s, z, o, n_tok, per, MODE=mode, BN=BN, D=128, G=G, num_warps=warps)
    run.info = (getattr(ck, 'n_regs', None), getattr(getattr(ck, 'metadata', None), 'shared', None))
    return o

if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    BH, n_tok = (64, 32768) if dev == "cuda" else (2, 256)
    splits = 8 if dev == "cuda" else 2
    q = (torch.randn(BH, 16, 128, device=dev) * 0.1).half()
    k = torch.randint(0, 256, (BH, n_tok, 32), dtype=torch.uint8, device=dev)
    s = (torch.rand(BH, n_tok // 32, 128, device=dev) * 0.1).half(); z = (torch.rand(BH, n_tok // 32, 128, device=dev) - 0.5).half()
    codes = ((k[..., None].int() >> torch.arange(0, 8, 2, device=dev)) & 3).flatten(-2).float()
    kd = codes * s.float().repeat_interleave(32, 1) + z.float().repeat_interleave(32, 1)
    sc = q.float() @ kd.mT  # (BH, 16, n)
    want = torch.logsumexp(sc.unflatten(-1, (splits, -1)) * 0.6931471805599453, -1).permute(0, 2, 1) / 0.6931471805599453
    res = []
    for mode in (0, 1, 2):
        for BN in ((64, 128) if dev == "cuda" else (64,)):
            for w in ((4, 8) if dev == "cuda" else (4,)):
                try:
                    got = run(mode, q, k, s, z, n_tok, splits, BN, w)
                    err = (got - want).abs().max().item()
                    ms = None
                    if dev == "cuda":
                        from triton.testing import do_bench
                        ms = do_bench(lambda: run(mode, q, k, s, z, n_tok, splits, BN, w), return_mode="median")
                    r = dict(mode=mode, BN=BN, warps=w, err=err, ms=ms, regs_smem=run.info)
                except Exception as e:
                    r = dict(mode=mode, BN=BN, warps=w, error=repr(e)[:300])
                print(json.dumps(r), flush=True); res.append(r)
    out = Path(os.environ.get("OUT", "/tmp")); (out / "kmicro.json").write_text(json.dumps(res, indent=1))
