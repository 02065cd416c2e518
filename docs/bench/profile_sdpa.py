"""The compiled batch-1 decode step's time with each SDPA backend (the mask rules out flash).

Run from the repository root: PYTHONPATH=. python3 docs/bench/profile_sdpa.py
"""
import sys
import time

import torch
import torch._inductor.config as inductor
from torch.nn.attention import SDPBackend, sdpa_kernel

from minikv.bench import capture, full_precision_store, replay_ms
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
            graph = capture(lambda: fwd(ids, pos))
        times = [replay_ms(graph) for _ in range(3)]
        print(f"{backend.name}: replay {sorted(times)[1]:.3f} ms/step {times} (setup {time.perf_counter() - t0:.0f} s)",
              flush=True)
