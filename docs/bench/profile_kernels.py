"""The compiled batch-1 decode step: its kernel-time breakdown, then its replay time compiled with
max-autotune and with each SDPA backend (the mask rules out flash).

Run from the repository root: PYTHONPATH=. python3 docs/bench/profile_kernels.py [GEOMETRY]
"""
import contextlib
import sys
import time

import torch
import torch._inductor.config as inductor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from minikv.bench import capture, full_precision_store, replay_ms
from minikv.geometries import geometry, random_model

inductor.coordinate_descent_tuning = True
name = sys.argv[1] if len(sys.argv) > 1 else "llama2-7b"
dev = torch.device("cuda")
model = random_model(geometry(name), dev, torch.float16)
VARIANTS = [("default", "default", None), ("max-autotune", "max-autotune-no-cudagraphs", None)]
VARIANTS += [(backend.name, "default", backend) for backend in
             (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION)]

with torch.inference_mode():
    store = full_precision_store(model, 1, 640, True)
    ids = torch.randint(0, 1000, (1, 1), device=dev)
    pos = torch.full((1, 1), 600, device=dev)
    for label, mode, backend in VARIANTS:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
            fwd = torch.compile(lambda i, p: model(i, p, store, last_only=True), fullgraph=True, dynamic=False,
                                mode=mode)
            graph = capture(lambda: fwd(ids, pos))
        times = sorted(replay_ms(graph) for _ in range(3))
        print(f"{label}: replay {times[1]:.3f} ms/step {times} (compile+capture {time.perf_counter() - t0:.0f} s)",
              flush=True)
        if label == "default":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fwd(ids, pos)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90),
                  flush=True)
