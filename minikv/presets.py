"""KV-store presets and flags (placeholder: full precision only, until the quantized store lands)."""
from __future__ import annotations

import argparse

import torch

from minikv.config import ModelConfig
from minikv.store import FullPrecisionStore, KVStore

PRESETS = {"fp16": "full-precision cache (the model's dtype), no quantization"}


def presets_help() -> str:
    return "KV cache presets (--kv):\n" + "\n".join(f"  {k:10s} {v}" for k, v in PRESETS.items())


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv", default="fp16", choices=sorted(PRESETS), help="KV cache preset (default: %(default)s)")


def kv_settings_from_args(args: argparse.Namespace) -> str:
    return args.kv


def make_store(cfg: ModelConfig, settings: str, batch: int, capacity: int, dtype: torch.dtype,
               device: torch.device | str, static: bool = False) -> KVStore:
    return FullPrecisionStore(cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim, cfg.sliding_window,
                              dtype, device, static=static)
