"""How far a preset's perplexity moves when the reference path rounds as the decode kernel does for
16-bit models, one rounding at a time: is a gap between the kernels and the reference a defect, or
codes flipping under any change of rounding?

    PYTHONPATH=. python docs/bench/rounding_sensitivity.py --round kvqp perplexity -f data/pg_dev.txt \\
        -c 2048 --chunks 8 --kv kivi2 --kv-attention reference --device cpu --json

--round takes any of: k (the dequantized history keys), v (its values), q (the scaled queries),
p (the probabilities) rounded to float16, as the kernel holds them; none: the plain reference. The
rest is a `minikv` command line run as is. The reference attends in fp32 here (its CPU mirror of the
history is kept in fp32 too), so with `--round none` nothing is rounded but the model's own dtype.
"""
import argparse
import sys

import torch

from kernels.decode_attention import LOG2E
from minikv import qstore
from minikv.cli import main


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def patch(rounds: str) -> None:
    """Make the quantized store's reference path round what `rounds` names to float16."""
    read = qstore.QuantizedStore._read

    def _read(self, layer, kind, a, b):  # the dequantized stored-space rows, as the kernel holds them
        x = read(self, layer, kind, a, b)
        return _half(x) if kind in rounds else x

    def attention(q, k, v, mask):  # reference_attention in the kernel's log2 domain, fp32
        B, Hq, T, D = q.shape
        qg = q.float().view(B, k.shape[1], Hq // k.shape[1], T, D) * (D ** -0.5 * LOG2E)
        s = (_half(qg) if "q" in rounds else qg) @ k.float()[:, :, None].transpose(-1, -2)
        if mask is not None:
            s = s.masked_fill(~mask[:, :, None], float("-inf"))
        p = torch.exp2(s - s.amax(-1, keepdim=True))
        out = (_half(p) if "p" in rounds else p) @ v.float()[:, :, None] / p.sum(-1, keepdim=True)
        return out.view(B, Hq, T, D)

    qstore.QuantizedStore._mirror_dtype = lambda self, bits: torch.float32
    qstore.QuantizedStore._read = _read
    qstore.reference_attention = attention


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round", default="none", help="letters of k, v, q, p; or none")
    args, rest = parser.parse_known_args()
    if set(args.round) - set("kvqp") and args.round != "none":
        parser.error(f"--round takes letters of k, v, q, p, or none; got {args.round!r}")
    patch("" if args.round == "none" else args.round)
    sys.exit(main(rest))
