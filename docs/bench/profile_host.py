"""Host overhead of the decode loop: store.positions' blocking host-to-device copy vs a pinned, non-blocking one.

Run from the repository root: PYTHONPATH=. python3 docs/bench/profile_host.py
"""
import time

import torch

from minikv.bench import full_precision_store, time_ours
from minikv.cuda_graph import enable_cuda_graph
from minikv.generate import Engine
from minikv.geometries import geometry, random_model
from minikv.store import KVStore

dev = torch.device("cuda")
model = random_model(geometry("llama2-7b"), dev, torch.float16)
original = KVStore.positions


def pinned_positions(self, n):
    start = torch.tensor(self.lengths, pin_memory=True).to(self.device, non_blocking=True)[:, None]
    return start + torch.arange(n, device=self.device)


store = full_precision_store(model, 1, 640, True)
engine = Engine(model, None, store)
enable_cuda_graph(engine, compile=True)
prompt = torch.randint(0, 1000, (1, 512), device=dev)
for label, fn in (("blocking", original), ("pinned", pinned_positions), ("blocking", original),
                  ("pinned", pinned_positions)):
    KVStore.positions = fn
    r = time_ours(engine, prompt, 128, 0, 5)
    print(f"{label}: {r['decode_ms_per_step']:.3f} ms/step", flush=True)
t = time.perf_counter()
for _ in range(50):
    engine.decode_step.graph.replay()
torch.cuda.synchronize()
print(f"replay only: {1e3 * (time.perf_counter() - t) / 50:.3f} ms/step")
