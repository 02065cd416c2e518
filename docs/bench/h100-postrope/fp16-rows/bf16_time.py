"""Decode-attention timings for a bfloat16 model: the CUDA-graph median of the decode kernel of the kernels/
in the current directory, on kernels.bench_attention's states with bf16 queries, sinks and ring. Run from a
repository root: python3 docs/bench/h100-postrope/fp16-rows/bf16_time.py"""
import json
import sys

import torch

sys.path.insert(0, ".")  # this checkout's kernels/, not an installed one

from kernels import bench_attention as ba  # noqa: E402
from kernels.decode_attention import decode_attention  # noqa: E402

out = {"kernels": ba.__file__}
for preset in ("k4v2", "kivi2", "rotatekv", "k2v1"):
    for batch, length in ((1, 1024), (1, 4096), (8, 32768)):
        args, kw, _ = ba.make_state(*ba.PRESETS[preset], batch, length)
        args = list(args)
        for i in (0, 1, 2, 7, 8):  # q, sinks, ring
            args[i] = args[i].to(torch.bfloat16)
        if "q_hist" in kw:
            kw["q_hist"] = kw["q_hist"].to(torch.bfloat16)
        out[f"{preset} {batch}x{length}"] = ba.median_ms(lambda: decode_attention(*args, **kw), graph=True)
        torch.cuda.empty_cache()
print(json.dumps(out))
