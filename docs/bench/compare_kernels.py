"""Time the decode-attention kernels of several versions of kernels/ in one run, on a CUDA GPU.

    python docs/bench/compare_kernels.py --out DIR REV_OR_DIR ... [--presets k4v2 kivi2 ...]
        (from the repository root)

Each version is a git revision (its kernels/ is exported with `git archive`) or a folder holding a
kernels/ package. Each runs in its own process on the same random states as kernels.bench_attention
(batch 8 over 32K tokens, batch 1 over 1K and 4K; GQA 32/8, D 128): the CUDA-graph median, and at
batch 8 the relative error against kernels.reference in fp32. fp16 SDPA and the copy bandwidth are
timed by kernels.bench_attention. Writes DIR/compare_kernels.json and DIR/compare_kernels.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ((8, 32768), (1, 1024), (1, 4096))
TIME = r"""
import json, sys, torch
import kernels
assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__  # this version, not the repository's
from kernels import bench_attention as ba, reference
from kernels.decode_attention import decode_attention
shapes, check = json.loads(sys.argv[3]), sys.argv[4] == "check"
out = {}
for preset in sys.argv[2].split(","):
    for batch, length in shapes:
        try:
            args, kw, _ = ba.make_state(*ba.PRESETS[preset], batch, length)
            got = decode_attention(*args, **kw)
            row = dict(graph_ms=ba.median_ms(lambda: decode_attention(*args, **kw), graph=True))
            if check and batch > 1:
                row["rel_err"] = ba.rel_err(got, reference.decode_attention(*args, **kw))
            del args, kw
        except Exception as e:  # a version without this preset is recorded, not fatal
            row = dict(error=repr(e)[:500])
        out[f"{preset} {batch}x{length}"] = row
        torch.cuda.empty_cache()
print(json.dumps(out))
"""


def time_version(src: Path, presets: list[str], shapes=SHAPES, check: bool = True) -> dict:
    """Rows "PRESET BxS" -> {graph_ms[, rel_err]} for the kernels/ package in folder src, timed in a
    process of its own (a failed run gives {"error": its stderr's tail})."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", TIME, str(src), ",".join(presets), json.dumps(shapes),
                          "check" if check else "-"], env=env, cwd=src, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else {"error": run.stderr[-2000:]}


def checkout(version: str, tmp: Path) -> Path:
    """A folder whose kernels/ is that of `version` (a folder, or a git revision exported into tmp)."""
    if Path(version, "kernels").is_dir():
        return Path(version).resolve()
    archive = subprocess.run(["git", "archive", version, "kernels"], cwd=ROOT, capture_output=True, check=True)
    dst = tmp / version.replace("/", "_")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dst, filter="data")
    return dst


def markdown(result: dict, versions: list[str]) -> str:
    keys = list(dict.fromkeys(k for v in versions for k in result[v]))
    lines = [f"`{result['_command']}`", "",
             f"GPU: {result['_gpu']}. CUDA-graph ms (rel. error against the fp32 reference at batch 8).", "",
             "| preset, B x S | " + " | ".join(versions) + " |", "|---" * (len(versions) + 1) + "|"]
    for key in keys:
        cells = []
        for v in versions:
            r = result[v].get(key, {})
            err = f" ({r['rel_err']:.1e})" if "rel_err" in r else ""
            cells.append(f"{r['graph_ms']:.4f}{err}" if "graph_ms" in r else r.get("error", "-")[:60])
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["k4v2", "kivi2", "rotatekv", "skvq", "int8", "mikv"])
    ap.add_argument("versions", nargs="+", help="git revisions or folders holding a kernels/ package")
    opts = ap.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    import torch
    result = {"_gpu": torch.cuda.get_device_name(0),
              "_command": "python3 docs/bench/compare_kernels.py " + shlex.join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        for version in opts.versions:
            result[version] = time_version(checkout(version, Path(tmp)), opts.presets)
            print(version, json.dumps(result[version]), flush=True)
            (opts.out / "compare_kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    (opts.out / "compare_kernels.md").write_text(markdown(result, opts.versions))
    print(markdown(result, opts.versions))


if __name__ == "__main__":
    main()
