"""Chunked-prefill attention over the packed store: a block of new tokens per sequence attends to
sinks ‖ packed history ‖ window ‖ the chunk itself (causal), so a long prompt never materialises
the history in full precision. The same kernel as decode (kernels.decode_attention), launched
with query blocks: a program's rows are the KV group's query heads times `block_m` tokens.
Its plain-PyTorch twin is kernels.reference.prefill_attention.
"""
from __future__ import annotations

from torch import Tensor

from kernels.decode_attention import attention
from kernels.layout import HiRows, History, PreRope, Spec


def prefill_attention(q: Tensor, k_new: Tensor, v_new: Tensor, sink_k: Tensor, sink_v: Tensor, lengths: Tensor,
                      hist: History, spec: Spec, n_hist: Tensor, win_k: Tensor, win_v: Tensor, *,
                      q_hist: Tensor | None = None, rope: PreRope | None = None, key_matrix: Tensor | None = None,
                      value_matrix: Tensor | None = None, scale: float | None = None, mass: Tensor | None = None,
                      hi: HiRows | None = None, block_m: int = 16, block_n: int = 64, block_w: int = 64,
                      num_warps: int = 8) -> Tensor:
    """Same arguments and result as kernels.reference.prefill_attention, plus launch settings.
    Query blocks already fill the GPU, so the history is not split."""
    return attention(q, k_new, v_new, sink_k, sink_v, lengths, hist, spec, n_hist, win_k, win_v, q_hist=q_hist,
                     rope=rope, key_matrix=key_matrix, value_matrix=value_matrix, scale=scale, mass=mass, hi=hi,
                     splits=1, block_m=block_m, block_n=block_n, block_w=block_w, num_warps=num_warps)
