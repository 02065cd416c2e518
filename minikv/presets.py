"""KV-cache settings: the named presets, the --kv flags that override them, and building a store."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minikv.calibration import Calibration, load_calibration, split_budget
from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.quant import BITS
from minikv.store import FullPrecisionStore, KVStore

CALIBRATION_FILE = "kv_calibration.json"

# --kv-attention: QuantizedStore's `kernels` argument. Measuring one store both ways compares the
# kernels' perplexity with the reference's; "triton" on the CPU needs TRITON_INTERPRET=1 (CI).
ATTENTION = {"auto": None, "triton": True, "reference": False}


@dataclass(frozen=True)
class KVSettings:
    """How the KV store keeps keys and values; bits 16 means not quantized."""

    bits_k: int = 16
    bits_v: int = 16
    group: int = 32  # G: tokens per block moved out of the window; per-channel keys share a scale over it
    group_k: int = 32  # channels per scale for per-token keys
    group_v: int = 32  # channels per scale for (per-token) values
    key_axis: str = "channel"  # "channel" (KIVI) or "token" (SKVQ, best with reorder)
    window: int = 128  # W: most recent tokens kept in full precision
    n_sink: int = 4  # first tokens kept in full precision
    rotate_k: bool = False  # Walsh-Hadamard rotation before quantization
    rotate_v: bool = False
    reorder: bool = False  # calibrated key channel permutation
    clip_k: float | None = 1.0  # range clip ratio; None: the calibrated ratio for the layer and bit width
    clip_v: float | None = 1.0
    prerope: bool = False  # quantize keys before RoPE, apply it after dequantization
    budget: float | None = None  # average code bits; per-layer K/V bits from calibrated norms
    mikv: tuple[int, float] | None = None  # (hi_bits, fraction of tokens per block kept at hi_bits)
    calib: str | None = None  # calibration file
    attention: str = "auto"  # how a quantized store attends (ATTENTION); not what it holds
    name: str = "custom"

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "KVSettings":
        if name not in PRESETS:
            raise MinikvError(f"unknown KV preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls(name=name, **PRESETS[name][1]).replace(**overrides)

    def for_head_dim(self, head_dim: int) -> "KVSettings":
        """These settings for a model's head dim: a channel group wider than a head is the whole head,
        so that one preset serves heads of 64 and of 128 channels."""
        return dataclasses.replace(self, group_k=min(self.group_k, head_dim), group_v=min(self.group_v, head_dim))

    def replace(self, **overrides) -> "KVSettings":
        try:
            settings = dataclasses.replace(self, **overrides)
        except TypeError as e:
            raise MinikvError(f"bad KV setting: {e}") from None
        settings.validate()
        return settings

    @property
    def quantized(self) -> bool:
        return self.bits_k != 16 or self.bits_v != 16 or self.budget is not None

    @property
    def needs_calibration(self) -> bool:
        return self.quantized and (self.reorder or self.budget is not None or None in (self.clip_k, self.clip_v))

    def validate(self, head_dim: int | None = None) -> None:
        """Raise MinikvError for settings that cannot work (with head_dim: for that model too)."""
        for kind, bits in (("key", self.bits_k), ("value", self.bits_v)):
            if bits not in (*BITS, 16):
                raise MinikvError(f"{kind} bits must be one of 1, 2, 3, 4, 8 or 16, not {bits}")
        for what, n in (("group", self.group), ("key channel group", self.group_k),
                        ("value channel group", self.group_v), ("window", self.window)):
            if n <= 0:
                raise MinikvError(f"the KV {what} must be positive, not {n}")
        if self.window < self.group or self.window % self.group:
            raise MinikvError(f"the KV window ({self.window}) must be a multiple of the group ({self.group})")
        if self.n_sink < 0:
            raise MinikvError(f"the number of sink tokens must be >= 0, not {self.n_sink}")
        if self.attention not in ATTENTION:
            raise MinikvError(f"the KV attention must be one of {', '.join(ATTENTION)}, not {self.attention!r}")
        if self.key_axis not in ("channel", "token"):
            raise MinikvError(f"the key axis must be 'channel' or 'token', not {self.key_axis!r}")
        for clip in (self.clip_k, self.clip_v):
            if clip is not None and not 0 < clip <= 1:
                raise MinikvError(f"a clip ratio must be in (0, 1], not {clip}")
        if self.reorder and self.rotate_k:
            raise MinikvError("key channel reorder and key rotation do not combine (rotation already spreads outliers)")
        if self.budget is not None and not 1 <= self.budget <= 8:
            raise MinikvError(f"a KV bit budget must be between 1 and 8 bits, not {self.budget:g}")
        if self.mikv is not None:
            hi_bits, fraction = self.mikv
            if hi_bits not in BITS or not 0 < fraction < 1 or round(fraction * self.group) < 1:
                raise MinikvError(f"MiKV needs high bits in {BITS} and a fraction in (0, 1) that keeps at least one "
                                  f"token of {self.group}, not {hi_bits},{fraction:g}")
        if head_dim is None:
            return
        if head_dim % 8:
            raise MinikvError(f"head dim {head_dim} is not a multiple of 8, which bit packing needs")
        for what, g in (("key channel group", self.group_k), ("value channel group", self.group_v)):
            if g < head_dim and head_dim % g:  # a wider group is the whole head (for_head_dim)
                raise MinikvError(f"the {what} ({g}) does not divide the head dim ({head_dim})")
        if (self.rotate_k or self.rotate_v) and head_dim & (head_dim - 1):
            raise MinikvError(f"Hadamard rotation needs a power-of-two head dim, not {head_dim}")

    def describe(self) -> str:
        """One line for logs and result tables."""
        if not self.quantized:
            return f"{self.name}: full precision"
        bits = f"budget {self.budget:g}" if self.budget is not None else f"K{self.bits_k}V{self.bits_v}"
        extras = [f"{self.key_axis} keys", f"G{self.group}", f"W{self.window}", f"sinks {self.n_sink}"]
        extras += [t for t, on in (("rotate-k", self.rotate_k), ("rotate-v", self.rotate_v), ("reorder", self.reorder),
                                   ("pre-RoPE", self.prerope)) if on]
        if (self.clip_k, self.clip_v) != (1.0, 1.0):
            same = self.clip_k == self.clip_v
            extras.append(f"clip {self.clip_k}" if same else f"clip K {self.clip_k} V {self.clip_v}")
        if self.mikv:
            extras.append(f"MiKV {self.mikv[0]}-bit {self.mikv[1]:g}")
        if self.attention != "auto":
            extras.append(f"{self.attention} attention")
        return f"{self.name}: {bits}, " + ", ".join(extras)


# name -> (one line for --help, KVSettings fields). Defaults: window 128, 4 sinks, G 32.
# Definitions follow docs/ACCURACY.md (default model, dev split, n_ctx 2048); 64-wide groups
# are 16 bits of scale + zero per 64 elements, so K4V2 costs 3.5 bits per element.
G64 = dict(group=64, group_k=64, group_v=64)
PRESETS: dict[str, tuple[str, dict]] = {
    "fp16": ("full-precision cache (the model's dtype), no quantization", {}),
    "int8": ("8-bit keys (per channel) and values (per token), fp window 128 + 4 sinks; 9 bits/elem",
             dict(bits_k=8, bits_v=8)),
    "kivi4": ("KIVI: 4-bit keys per channel in 32-token blocks, 4-bit values per token; 5 bits/elem",
              dict(bits_k=4, bits_v=4)),
    "kivi2": ("KIVI: 2-bit keys per channel in 32-token blocks, 2-bit values per token; 3 bits/elem",
              dict(bits_k=2, bits_v=2)),
    "k4v4": ("4-bit keys and values, Hadamard-rotated, 64-wide groups; 4.5 bits/elem, the closest to full precision",
             dict(bits_k=4, bits_v=4, rotate_k=True, rotate_v=True, **G64)),
    "k4v2": ("KV-AdaQuant: 4-bit keys, 2-bit values clipped to 0.85 of their range, Hadamard-rotated, 64-wide groups; "
             "3.5 bits/elem (default)",
             dict(bits_k=4, bits_v=2, rotate_k=True, rotate_v=True, clip_v=0.85, **G64)),
    "skvq": ("SKVQ: 3-bit per-token keys after calibrated channel reorder, 2-bit values, calibrated clipping; "
             "3.5 bits/elem (needs calibration)",
             dict(bits_k=3, bits_v=2, key_axis="token", reorder=True, clip_k=None, clip_v=None)),
    "rotatekv": ("RotateKV: Hadamard-rotated pre-RoPE keys and rotated values, 2 bits, 64-wide groups, values clipped "
                 "to 0.75 of their range; 2.5 bits/elem",
                 dict(bits_k=2, bits_v=2, rotate_k=True, rotate_v=True, prerope=True, clip_v=0.75, **G64)),
    "k2v1": ("2-bit rotated pre-RoPE keys as rotatekv, 1-bit rotated values clipped to 0.45 of their range (SKVQ), "
             "one value scale per head; 1.88 bits/elem at head dim 128 (2.0 at 64): the longest contexts",
             dict(G64, bits_k=2, bits_v=1, rotate_k=True, rotate_v=True, prerope=True, clip_v=0.45, group_v=128)),
    "mikv": ("MiKV: rotated 2-bit history, the 1/8 of tokens with most attention kept at 8 bits",
             dict(bits_k=2, bits_v=2, rotate_k=True, rotate_v=True, mikv=(8, 0.125))),
}
# The fewest bits whose perplexity stays within 0.5 % of the full-precision cache (docs/ACCURACY.md).
DEFAULT_KV = "k4v2"


def presets_help() -> str:
    return ("KV cache presets (--kv; --kv-* flags override them):\n"
            + "\n".join(f"  {name:9s} {text}" for name, (text, _) in PRESETS.items()))


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a bit width: {text!r}") from None
    if bits not in (*BITS, 16):
        raise argparse.ArgumentTypeError(f"bits must be one of 1, 2, 3, 4, 8, 16 (16: not quantized), not {bits}")
    return bits


def _clip(text: str) -> tuple[float | None, float | None]:
    """'R' or 'RK,RV'; 'calib' takes the calibrated ratios."""
    parts = text.split(",")
    try:
        ratios = [None if p == "calib" else float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATIO, RK,RV or 'calib', not {text!r}") from None
    if len(ratios) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected RATIO or RK,RV, not {text!r}")
    return ratios[0], ratios[-1]


def _mikv(text: str) -> tuple[int, float] | None:
    if text == "none":
        return None
    try:
        bits, fraction = text.split(",")
        return int(bits), float(fraction)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HI_BITS,FRACTION (e.g. 8,0.125) or 'none', not {text!r}") from None


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("KV cache (a preset, then overrides)")
    g.add_argument("--kv", default=DEFAULT_KV, choices=list(PRESETS), help="KV cache preset (default: %(default)s)")
    g.add_argument("--kv-bits-k", type=_bits, metavar="B", help="key bits: 1, 2, 3, 4, 8, or 16 (not quantized)")
    g.add_argument("--kv-bits-v", type=_bits, metavar="B", help="value bits: 1, 2, 3, 4, 8, or 16")
    g.add_argument("--kv-group", type=int, metavar="G", help="group size: tokens per block and channels per scale")
    g.add_argument("--kv-window", type=int, metavar="W", help="recent tokens kept in full precision (multiple of G)")
    g.add_argument("--kv-sinks", type=int, metavar="N", help="first tokens kept in full precision")
    g.add_argument("--kv-key-axis", choices=("channel", "token"), help="quantize keys per channel or per token")
    g.add_argument("--kv-rotate", choices=("none", "k", "v", "kv"), help="Hadamard-rotate keys and/or values")
    g.add_argument("--kv-reorder", action=argparse.BooleanOptionalAction, default=None,
                   help="permute key channels by their calibrated ranges before grouping")
    g.add_argument("--kv-clip", type=_clip, metavar="RATIO",
                   help="clip ratio in (0, 1] for keys and values, or RK,RV; 'calib' for the calibrated ones")
    g.add_argument("--kv-budget", type=float, metavar="BITS",
                   help="average key/value bits, split per layer from calibrated norms (keys get more)")
    g.add_argument("--kv-prerope", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize keys before RoPE (applied again after dequantization)")
    g.add_argument("--kv-mikv", type=_mikv, metavar="HI_BITS,FRACTION", default=False,
                   help="keep this fraction of each block's most-attended tokens at HI_BITS; 'none' turns it off")
    g.add_argument("--kv-attention", choices=list(ATTENTION),
                   help="quantized cache attention: 'triton' kernels read the packed cache (on the CPU only under "
                        "TRITON_INTERPRET=1), 'reference' dequantizes it for PyTorch attention (no CUDA graph), "
                        "'auto' (default) the kernels on cuda, the reference on cpu")
    g.add_argument("--kv-calib", metavar="FILE",
                   help=f"calibration file (default: {CALIBRATION_FILE} in the model folder, if present)")


def kv_settings_from_args(args: argparse.Namespace) -> KVSettings:
    """The preset named by --kv with the --kv-* flags applied."""
    o: dict = {}
    for flag, field in (("kv_bits_k", "bits_k"), ("kv_bits_v", "bits_v"), ("kv_window", "window"),
                        ("kv_sinks", "n_sink"), ("kv_key_axis", "key_axis"), ("kv_reorder", "reorder"),
                        ("kv_budget", "budget"), ("kv_prerope", "prerope"), ("kv_attention", "attention")):
        if getattr(args, flag) is not None:
            o[field] = getattr(args, flag)
    if args.kv_group is not None:
        o.update(group=args.kv_group, group_k=args.kv_group, group_v=args.kv_group)
    if args.kv_rotate is not None:
        o.update(rotate_k="k" in args.kv_rotate, rotate_v="v" in args.kv_rotate)
    if args.kv_clip is not None:
        o.update(clip_k=args.kv_clip[0], clip_v=args.kv_clip[1])
    if args.kv_mikv is not False:
        o["mikv"] = args.kv_mikv
    calib = args.kv_calib if args.kv_calib is not None else default_calibration(getattr(args, "model", None))
    return KVSettings.from_preset(args.kv, calib=calib, **o)


def default_calibration(model: str | Path | None) -> str | None:
    """The calibration file beside a model (its folder, or a .gguf file's folder; None: the default
    model), if there is one."""
    if model is None:
        from minikv.loader import default_model_dir

        model = default_model_dir()
    folder = Path(model).parent if Path(model).is_file() else Path(model)
    default = folder / CALIBRATION_FILE
    return str(default) if default.is_file() else None


def plan_layers(cfg: ModelConfig, settings: KVSettings) -> list:
    """Per-layer bits, clip ratios and key permutation, from the settings and (where they ask for
    it) the calibration file."""
    from minikv.qstore import LayerPlan

    calib: Calibration | None = None
    if settings.needs_calibration:
        if settings.calib is None:
            raise MinikvError(f"KV settings '{settings.name}' need a calibration file: run `minikv calibrate` "
                              f"or pass --kv-calib FILE")
        calib = load_calibration(settings.calib, cfg)
    if settings.budget is not None:
        if not {"k", "v"} <= calib.norms.keys():
            raise MinikvError(f"{settings.calib} has no key/value norms for a bit budget")
        bits = split_budget(calib.norms, settings.budget)
    else:
        bits = [(settings.bits_k, settings.bits_v)] * cfg.n_layers
    perm = None
    if settings.reorder:
        perm = calib.key_perm_prerope if settings.prerope else calib.key_perm
        if perm is None:
            raise MinikvError(f"{settings.calib} has no {'pre-RoPE ' if settings.prerope else ''}key permutation")

    def clip(kind: str, given: float | None, b: int, layer: int) -> float:
        if given is not None or b == 16:
            return 1.0 if given is None else given
        ratio = calib.clip_ratio(kind, b, layer)
        if ratio is None:
            raise MinikvError(f"{settings.calib} has no clip ratios for {b}-bit {'keys' if kind == 'k' else 'values'}"
                              f"; pass --kv-clip")
        return ratio

    return [LayerPlan(bk, bv, clip("k", settings.clip_k, bk, i), clip("v", settings.clip_v, bv, i),
                      None if perm is None else perm[i])
            for i, (bk, bv) in enumerate(bits)]


def make_store(cfg: ModelConfig, settings: KVSettings | str, batch: int, capacity: int, dtype: torch.dtype,
               device: torch.device | str, static: bool = False) -> KVStore:
    """The store the settings describe. `static`: one a CUDA graph can replay (the full-precision
    store then attends over its whole capacity). A quantized store is static, whatever `static`
    asks, when the kernels cover every layer on CUDA, and otherwise not (its reference path)."""
    if isinstance(settings, str):
        settings = KVSettings.from_preset(settings)
    if not settings.quantized:
        return FullPrecisionStore(cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim, cfg.sliding_window,
                                  dtype, device, static=static)
    from minikv.model import rope_tables
    from minikv.qstore import QuantizedStore

    settings.validate(cfg.head_dim)
    cpu = torch.device(device).type == "cpu"
    if settings.attention == "triton" and cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise MinikvError("Triton kernels on the CPU need TRITON_INTERPRET=1 in the environment")
    return QuantizedStore(cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim, cfg.sliding_window, dtype,
                          device, settings=settings, plans=plan_layers(cfg, settings), rope=rope_tables(cfg, capacity),
                          kernels=ATTENTION[settings.attention])
