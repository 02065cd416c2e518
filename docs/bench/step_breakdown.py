"""Where a replayed batch-1 decode step's GPU time goes, kernel by kernel, per KV preset.

    PYTHONPATH=. OUT=DIR python3 docs/bench/step_breakdown.py fp16 k4v2 mikv ...

Llama-2-7B geometry (random weights, fp16), a 1024-token prompt and 8 greedy tokens, then 20 replays
of the captured step under the profiler: microseconds per step of the 14 costliest kernels and of
all of them. Writes DIR/step_breakdown.json.
"""
import collections
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from minikv.bench import GREEDY, full_precision_store
from minikv.cuda_graph import enable_cuda_graph
from minikv.generate import Engine
from minikv.geometries import geometry, random_model
from minikv.presets import KVSettings, make_store
from minikv.sampling import sample

dev = torch.device("cuda")
cfg = geometry("llama2-7b")
model = random_model(cfg, dev, torch.float16)
P, N = 1024, 64
prompt = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(0)).to(dev)
out = {}
for name in sys.argv[1:]:
    store = full_precision_store(model, 1, P + N, True) if name == "fp16" else make_store(
        model.config, KVSettings.from_preset(name), 1, P + N, torch.float16, dev, static=True)
    engine = Engine(model, None, store)
    enable_cuda_graph(engine)
    with torch.inference_mode():
        for st in range(0, P, 512):
            logits = engine.forward(prompt[:, st:st + 512])
        ids = sample(logits, GREEDY, None)[:, None]
        for _ in range(8):
            ids = sample(engine.forward(ids), GREEDY, None)[:, None]
        g = engine.decode_step.graph
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                g.replay()
            torch.cuda.synchronize()
    per = collections.Counter()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            per[e.key[:70]] += e.self_device_time_total / 20
    total = sum(per.values())
    out[name] = dict(total_us=total, kernels={k: round(v, 1) for k, v in per.most_common(14)})
    print(name, f"{total:.0f} us/step", json.dumps(out[name]["kernels"]), flush=True)
    del engine, store
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "step_breakdown.json"), "w"), indent=1)
