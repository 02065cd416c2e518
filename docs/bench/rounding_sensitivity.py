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

from minikv import qstore
from minikv.cli import main

LOG2E = 1.4426950408889634


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def patch(rounds: str) -> None:
    """Make the quantized store's reference path round what `rounds` names to float16."""

    def history(self, layer, a, b):  # QuantizedStore.history, rounding the dequantized codes
        pos = torch.arange(self.hist_pos0 + a, self.hist_pos0 + b, device=self.device)
        k, v = self._read(layer, "k", a, b), self._read(layer, "v", a, b)
        k, v = (_half(k) if "k" in rounds else k), (_half(v) if "v" in rounds else v)
        return self._key_from_stored(layer, k, pos), self._value_rotate(v)

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
    qstore.QuantizedStore.history = history
    qstore.reference_attention = attention


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round", default="none", help="letters of k, v, q, p; or none")
    args, rest = parser.parse_known_args()
    if set(args.round) - set("kvqp") and args.round != "none":
        parser.error(f"--round takes letters of k, v, q, p, or none; got {args.round!r}")
    patch("" if args.round == "none" else args.round)
    sys.exit(main(rest))
