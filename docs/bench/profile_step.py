"""Where a batch-1 decode step's time goes on a GPU: replay only vs the whole loop, linears alone, compiled.

Run from the repository root: PYTHONPATH=. python3 docs/bench/profile_step.py
"""
import sys
import time

import torch
import torch._inductor.config as inductor

from minikv.bench import capture, copy_bandwidth, full_precision_store, replay_ms, time_ours
from minikv.cuda_graph import GraphDecodeStep
from minikv.generate import Engine
from minikv.geometries import geometry, random_model

inductor.coordinate_descent_tuning = True
name = sys.argv[1] if len(sys.argv) > 1 else "llama2-7b"
dev = torch.device("cuda")
model = random_model(geometry(name), dev, torch.float16)
bw = copy_bandwidth(dev)
wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"{name}: floor {1e3 * wbytes / bw:.2f} ms/step at {bw / 1e9:.0f} GB/s", flush=True)


with torch.inference_mode():
    x = torch.randn(1, 1, model.config.dim, device=dev, dtype=torch.float16)
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    lbytes = sum(m.weight.numel() * 2 for m in lin)
    h = torch.randn(1, 1, model.config.hidden_dim, device=dev, dtype=torch.float16)

    def linears():
        for m in lin:
            m(h if m.in_features == model.config.hidden_dim else x)

    ms = replay_ms(capture(linears, warmup=1))
    print(f"linears only (graph): {ms:.2f} ms = {lbytes / ms / 1e6:.0f} GB/s", flush=True)
    for compile in (False, True):
        store = full_precision_store(model, 1, 640, True)
        engine = Engine(model, None, store)
        engine.decode_step = GraphDecodeStep(model, store, compile=compile)
        t0 = time.perf_counter()
        r = time_ours(engine, torch.randint(0, 1000, (1, 512), device=dev), 128, 0, 3)
        print(f"compile={compile}: app loop {r['decode_ms_per_step']:.2f} ms/step (setup {time.perf_counter() - t0:.0f} s)",
              flush=True)
        print(f"compile={compile}: replay only {replay_ms(engine.decode_step.graph):.2f} ms/step", flush=True)
