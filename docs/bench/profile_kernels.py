"""Kernel-time breakdown of the compiled batch-1 decode step, and the step compiled with max-autotune.

Run from the repository root: PYTHONPATH=. python3 docs/bench/profile_kernels.py
"""
import sys
import time

import torch
import torch._inductor.config as inductor
from torch.profiler import ProfilerActivity, profile

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
    for mode in ("default", "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        fwd = torch.compile(lambda i, p: model(i, p, store, last_only=True), fullgraph=True, dynamic=False, mode=mode)
        t0 = time.perf_counter()
        ms = replay_ms(capture(lambda: fwd(ids, pos)))
        print(f"{mode}: replay {ms:.2f} ms/step (compile+capture {time.perf_counter() - t0:.0f} s)", flush=True)
        if mode == "default":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fwd(ids, pos)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90),
                  flush=True)
