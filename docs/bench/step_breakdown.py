"""Where a replayed decode step's GPU time goes, kernel by kernel, per KV preset.

    PYTHONPATH=. OUT=DIR python3 docs/bench/step_breakdown.py [--geometry G] [--batch B] [--ctx-fill S] fp16 k4v2 ...

Random weights, fp16. By default Llama-2-7B geometry at batch 1 with a 1024-token prompt; with --ctx-fill S
the store is filled with S synthetic tokens instead (minikv.bench.fill_store). Then 8 greedy tokens and 20
replays of the captured step under the profiler: microseconds per step of the 25 costliest kernels (and how
many launches of each) and of all of them. Writes DIR/step_breakdown.json.
"""
import argparse
import collections
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

from minikv.bench import GREEDY, fill_store, full_precision_store
from minikv.cuda_graph import enable_cuda_graph
from minikv.generate import Engine
from minikv.geometries import geometry, random_model
from minikv.presets import KVSettings, make_store
from minikv.sampling import sample

ap = argparse.ArgumentParser()
ap.add_argument("--geometry", default="llama2-7b")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--ctx-fill", type=int, default=0)
ap.add_argument("presets", nargs="+")
opts = ap.parse_args()
dev = torch.device("cuda")
cfg = geometry(opts.geometry)
model = random_model(cfg, dev, torch.float16)
B, P, N = opts.batch, opts.ctx_fill or 1024, 64
prompt = torch.randint(0, cfg.vocab_size, (B, 1 if opts.ctx_fill else P), generator=torch.Generator().manual_seed(0))
prompt = prompt.to(dev)
out = {"command": "python3 docs/bench/step_breakdown.py " + " ".join(
    [f"--geometry {opts.geometry} --batch {B}"] + ([f"--ctx-fill {opts.ctx_fill}"] if opts.ctx_fill else [])
    + opts.presets), "gpu": torch.cuda.get_device_name(0)}
for name in opts.presets:
    store = full_precision_store(model, B, P + N, True) if name == "fp16" else make_store(
        model.config, KVSettings.from_preset(name), B, P + N, torch.float16, dev, static=True)
    engine = Engine(model, None, store)
    enable_cuda_graph(engine)
    with torch.inference_mode():
        if opts.ctx_fill:
            fill_store(store, P)
            logits = engine.forward(prompt)
        else:
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
    per, calls = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        if getattr(e, "self_device_time_total", 0) > 0:
            per[e.key[:90]] += e.self_device_time_total / 20
            calls[e.key[:90]] += e.count / 20
    total = sum(per.values())
    out[name] = dict(total_us=total, kernels={k: [round(v, 1), calls[k]] for k, v in per.most_common(25)})
    print(name, f"{total:.0f} us/step", flush=True)
    for k, v in per.most_common(25):
        print(f"  {v:9.1f} us  x{calls[k]:5.0f}  {k}", flush=True)
    del engine, store
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "step_breakdown.json"), "w"), indent=1)
