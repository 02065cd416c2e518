"""Calibration data for the quantized store: what it needs beyond its settings, and how to get it.

`kv_calibration.json`, beside the model (lists are indexed by layer, then KV head):

    {"format": 1,
     "model": {"name": "...", "architecture": "...", "n_layers": L, "n_kv_heads": H, "head_dim": D},
     "key_perm": [L][H][D],          SKVQ channel order of post-RoPE keys (similar ranges adjacent)
     "key_perm_prerope": [L][H][D],  the same for pre-RoPE keys (optional)
     "clip": {"k": {"<bits>": [L]}, "v": {"<bits>": [L]}},  best clip ratio per layer and bit width
     "norms": {"k": [L], "v": [L]}}  per-layer norm statistic (KV-AdaQuant's budget split)

Every section but "model" is optional; the store asks only for what its settings use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.quant import BITS, dequantize_channels, dequantize_tokens, quantize_channels, quantize_tokens

FORMAT = 1
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
FINGERPRINT_KEYS = ("architecture", "n_layers", "n_kv_heads", "head_dim")


def fingerprint(cfg: ModelConfig, name: str = "") -> dict:
    """What identifies a model's KV geometry (plus a name, for messages)."""
    return {"name": name, "architecture": cfg.architecture, "n_layers": cfg.n_layers,
            "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim}


@dataclass
class Calibration:
    model: dict
    key_perm: Tensor | None = None  # (L, H, D) int64
    key_perm_prerope: Tensor | None = None
    clip: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # "k"/"v" -> bits -> per layer
    norms: dict[str, list[float]] = field(default_factory=dict)  # "k"/"v" -> per layer

    def to_json(self) -> dict:
        out: dict = {"format": FORMAT, "model": self.model}
        for name in ("key_perm", "key_perm_prerope"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).tolist()
        if self.clip:
            out["clip"] = {kind: {str(b): r for b, r in per.items()} for kind, per in self.clip.items()}
        if self.norms:
            out["norms"] = self.norms
        return out

    def clip_ratio(self, kind: str, bits: int, layer: int) -> float | None:
        per_layer = self.clip.get(kind, {}).get(bits)
        return None if per_layer is None else per_layer[layer]


def save_calibration(path: Path | str, calib: Calibration) -> None:
    Path(path).write_text(json.dumps(calib.to_json()))


def load_calibration(path: Path | str, cfg: ModelConfig) -> Calibration:
    """Read and check a calibration file against the model it is used with."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MinikvError(f"cannot read calibration file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("model"), dict):
        raise MinikvError(f"{path} is not a minikv calibration file (format {FORMAT})")
    model, want = data["model"], fingerprint(cfg)
    if any(model.get(k) != want[k] for k in FINGERPRINT_KEYS):
        got = ", ".join(f"{k}={model.get(k)}" for k in FINGERPRINT_KEYS)
        raise MinikvError(f"{path} was made for another model ({model.get('name') or 'unnamed'}: {got}); "
                          f"run `minikv calibrate` for this one")
    L, H, D = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    calib = Calibration(model=model, norms=data.get("norms", {}))
    try:
        for name in ("key_perm", "key_perm_prerope"):
            if name in data:
                perm = torch.tensor(data[name], dtype=torch.int64)
                if perm.shape != (L, H, D) or not torch.equal(perm.sort(-1).values, torch.arange(D).expand(L, H, D)):
                    raise ValueError(f"{name} is not a ({L}, {H}, {D}) set of channel permutations")
                setattr(calib, name, perm)
        calib.clip = {kind: {int(b): [float(r) for r in ratios] for b, ratios in per.items()}
                      for kind, per in data.get("clip", {}).items()}
        for kind, per in calib.clip.items():
            for ratios in per.values():
                if len(ratios) != L or not all(0 < r <= 1 for r in ratios):
                    raise ValueError(f"clip ratios for {kind} need {L} values in (0, 1]")
        for kind, values in calib.norms.items():
            if len(values) != L or not all(v > 0 for v in values):
                raise ValueError(f"norms for {kind} need {L} positive values")
    except (ValueError, TypeError, AttributeError) as e:
        raise MinikvError(f"bad calibration file {path}: {e}") from None
    return calib


def compute_permutation(keys: Tensor) -> Tensor:
    """SKVQ channel reorder: keys (H, N, D) -> permutation (H, D) listing channels by range, so
    the groups of consecutive permuted channels that share a scale hold channels of like range."""
    xf = keys.float()
    return (xf.amax(1) - xf.amin(1)).argsort(dim=-1, stable=True)


def _fake_quant(x: Tensor, bits: int, group: int, axis: str, clip: float) -> Tensor:
    if axis == "channel":
        return dequantize_channels(*quantize_channels(x, bits, group, clip), bits, x.shape[-1])
    return dequantize_tokens(*quantize_tokens(x, bits, group, clip), bits, x.shape[-1])


def search_clip(q: Tensor, k: Tensor, v: Tensor, kind: str, bits: int, group: int, axis: str = "token",
                ratios: tuple[float, ...] = CLIP_RATIOS) -> float:
    """The clip ratio whose quantization of keys (kind "k") or values ("v") least changes the
    attention output of sampled queries. q (Hq, Nq, D); k, v (H, N, D) in the space they are
    stored in; axis "channel" groups `group` tokens per channel (N a multiple of it), "token"
    groups `group` channels per token."""
    H = k.shape[0]
    qg = q.float().unflatten(0, (H, -1))  # query head i reads KV head i // (Hq / H)
    k, v = k.float(), v.float()

    def attention(keys: Tensor, values: Tensor) -> Tensor:
        probs = (qg @ keys[:, None].transpose(-1, -2) * k.shape[-1] ** -0.5).softmax(-1)
        return probs @ values[:, None]

    exact = attention(k, v)

    def error(ratio: float) -> float:
        if kind == "k":
            out = attention(_fake_quant(k, bits, group, axis, ratio), v)
        else:
            out = attention(k, _fake_quant(v, bits, group, axis, ratio))
        return (out - exact).square().mean().item()

    return min(ratios, key=error)


def split_budget(norms: dict[str, list[float]], budget: float) -> list[tuple[int, int]]:
    """KV-AdaQuant: per-layer (bits_k, bits_v) from {1, 2, 3, 4, 8} averaging at most `budget`
    bits, chosen greedily so each added bit goes where norm² · 4^-bits (the error it scales)
    drops the most: larger norms (keys, typically) get more bits. Nothing drops below 2 bits
    unless the budget does."""
    ladder = BITS
    n_layers = len(norms["k"])
    if not ladder[0] <= budget <= ladder[-1]:
        raise MinikvError(f"a KV bit budget must be between {ladder[0]} and {ladder[-1]} bits, not {budget:g}")
    start = 2 if budget >= 2 else 1
    tensors = [(kind, layer) for layer in range(n_layers) for kind in ("k", "v")]
    bits = {t: start for t in tensors}
    spare = budget * 2 * n_layers - start * len(tensors)
    while True:
        best, best_gain = None, 0.0
        for t in tensors:
            if bits[t] == ladder[-1]:
                continue
            nxt = ladder[ladder.index(bits[t]) + 1]
            cost = nxt - bits[t]
            if cost > spare + 1e-9:
                continue
            gain = norms[t[0]][t[1]] ** 2 * (4.0 ** -bits[t] - 4.0 ** -nxt) / cost
            if gain > best_gain:
                best, best_gain = (t, nxt, cost), gain
        if best is None:
            return [(bits[("k", layer)], bits[("v", layer)]) for layer in range(n_layers)]
        t, nxt, cost = best
        bits[t], spare = nxt, spare - cost
