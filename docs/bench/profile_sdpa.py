"""The compiled batch-1 decode step's time with each SDPA backend (the mask rules out flash).

Run from the repository root: PYTHONPATH=. python3 docs/bench/profile_sdpa.py
"""
import sys
import time

import torch
import torch._inductor.config as inductor
from torch.nn.attention import SDPBackend, sdpa_kernel

from minikv.bench import full_precision_store
from minikv.geometries import geometry, random_model

inductor.coordinate_descent_tuning = True
name = sys.argv[1] if len(sys.argv) > 1 else "llama2-7b"
dev = torch.device("cuda")
model = random_model(geometry(name), dev, torch.float16)

with torch.inference_mode():
    store = full_precision_store(model, 1, 640, True)
    ids = torch.randint(0, 1000, (1, 1), device=dev)
    pos = torch.full((1, 1), 600, device=dev)
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        with sdpa_kernel([backend]):
            fwd = torch.compile(lambda i, p: model(i, p, store, last_only=True), fullgraph=True, dynamic=False)
            for _ in range(3):
                fwd(ids, pos)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fwd(ids, pos)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                g.replay()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t) / 50)
        print(f"{backend.name}: replay {sorted(times)[1]:.3f} ms/step {times} (setup {time.perf_counter() - t0:.0f} s)",
              flush=True)
