"""Op-level CPU profile of 10 decode steps, minikv against transformers on the same weights.

Run from the repository root: PYTHONPATH=. python docs/bench/profile_cpu.py [MODEL_DIR]
"""
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from minikv.bench import full_precision_store, transformers_twin
from minikv.generate import Engine
from minikv.weights import load_folder

torch.set_num_threads(1)
model = load_folder(Path(sys.argv[1] if len(sys.argv) > 1 else "weights/smollm2-135m-instruct"), "cpu", torch.float32)
hf = transformers_twin(model)
prompt = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))


def show(prof) -> None:
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


with torch.inference_mode():
    engine = Engine(model, None, full_precision_store(model, 1, 200, False))
    ids = engine.forward(prompt).argmax(-1, keepdim=True)
    for _ in range(3):
        ids = engine.forward(ids).argmax(-1, keepdim=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            ids = engine.forward(ids).argmax(-1, keepdim=True)
    show(prof)
    out = hf(prompt, use_cache=True)
    cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(3):
        out = hf(ids, past_key_values=cache, use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            out = hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            ids = out.logits[:, -1:].argmax(-1)
    show(prof)
