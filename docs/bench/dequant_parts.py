"""What each step of dequantizing costs in the decode kernel: times copies of kernels/ with one
step removed (their results are wrong; only their speed means anything), on a CUDA GPU.

    python docs/bench/dequant_parts.py --out FILE.json        (from the repository root)

Variants: base (as shipped); no_v_affine (values skip code * scale + zero); no_k_affine (per-channel
keys skip it); no_sub (codes stay 1024 + code); and their combinations. Each runs in its own process,
CUDA-graph time of one decode-attention call at batch 8, 32K tokens, GQA 32/8, D 128.

The edits match the kernels of commits 02a75a7..ff116b2, which the table in docs/SPEED.md measured;
on later kernels (values by fields, no subtraction in the OR step) they no longer apply, and the
script stops at its first edit rather than time a kernel it did not change.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from compare_kernels import time_version  # this script's folder comes first on sys.path

ROOT = Path(__file__).resolve().parents[2]
AFFINE_V = ("    return tl.reshape(codes * s[:, :, None] + z[:, :, None], (N, NCH))",
            "    if NCH < D:\n        return tl.reshape(codes * s[:, :, None] + z[:, :, None], (N, NCH))\n"
            "    return tl.reshape(codes, (N, NCH))")  # values: the full width
AFFINE_K = ("    return tl.reshape(codes * s[:, None, :] + z[:, None, :], (N, NCH))",
            "    return tl.reshape(codes, (N, NCH))")  # per-channel keys
SUB = ("        out = (codes | 0x6400).to(tl.float16, bitcast=True) - 1024.0",
       "        out = (codes | 0x6400).to(tl.float16, bitcast=True)")
VARIANTS = {"base": [], "no_v_affine": [AFFINE_V], "no_k_affine": [AFFINE_K], "no_sub": [SUB],
            "no_affine": [AFFINE_V, AFFINE_K], "no_affine_no_sub": [AFFINE_V, AFFINE_K, SUB]}
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["kivi2", "k4v2", "mikv"])
    opts = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, edits in VARIANTS.items():
            dst = Path(tmp, name, "kernels")
            shutil.copytree(ROOT / "kernels", dst, ignore=shutil.ignore_patterns("__pycache__"))
            dequant = dst / "dequant.py"
            text = dequant.read_text()
            for old, new in edits:
                assert old in text, f"{name}: the kernel changed, update the edit"
                text = text.replace(old, new)
            dequant.write_text(text)
            rows = time_version(dst.parent, opts.presets, shapes=[(8, 32768)], check=False)
            if "error" in rows:
                raise SystemExit(f"{name}: {rows['error']}")
            result[name] = {preset: rows[f"{preset} 8x32768"]["graph_ms"] for preset in opts.presets}
            print(name, json.dumps(result[name]), flush=True)
    import torch
    result["_gpu"] = torch.cuda.get_device_name(0)
    opts.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
