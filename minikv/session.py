"""Save an engine's conversation state (KV store + token history) to disk and read it back.

A document ingested once can then be asked many questions without prefilling it again.
The file is safetensors (no pickle, so opening someone else's session runs no code): the
store's buffers as they are held (a quantized history stays packed), cut to the used part
where the store knows it, the token ids, and a JSON header that fingerprints the model and
the store's settings so a session is never loaded into the wrong model or KV preset.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from minikv.errors import MinikvError
from minikv.generate import Engine

FORMAT, VERSION = "minikv-session", 1


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config plus the mean |w| of a few embedding rows: tells apart two models of the same
    shape, yet survives a change of dtype (bf16 on a GPU, fp32 on a CPU)."""
    w = model.tok_embeddings.weight
    rows = torch.linspace(0, w.shape[0] - 1, 16).long().to(w.device)
    return {
        "config": json.loads(json.dumps(dataclasses.asdict(model.config))),
        "embedding": [round(x, 6) for x in w[rows].float().abs().mean(dim=1).tolist()],
    }


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    close = all(abs(x - y) <= 1e-2 * max(abs(x), abs(y), 1e-6) for x, y in zip(a["embedding"], b["embedding"]))
    return a["config"] == b["config"] and len(a["embedding"]) == len(b["embedding"]) and close


def save_session(path: str | Path, engine: Engine, meta: dict[str, Any] | None = None) -> int:
    """Write the engine's store and tokens to `path`; `meta` (JSON-able) is returned by `load_session`.

    Returns the file's size in bytes."""
    from safetensors.torch import save_file

    state = engine.store.state_dict()
    tensors = {f"store/{n}": t.detach().to("cpu").contiguous() for n, t in state["tensors"].items()}
    tensors["tokens"] = torch.tensor(engine.tokens, dtype=torch.int64)
    header = {
        "format": FORMAT, "version": VERSION, "model": model_fingerprint(engine.model),
        "store": {k: state[k] for k in ("kind", "layout", "attrs")}, "meta": meta or {},
    }
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={FORMAT: json.dumps(header)})
    except OSError as e:
        raise MinikvError(f"cannot write session {path}: {e.strerror or e}") from None
    return path.stat().st_size


def load_session(path: str | Path, engine: Engine) -> dict[str, Any]:
    """Replace the engine's state with the session in `path`; return the meta it was saved with.

    The engine's store must have been built with the session's KV settings and context size,
    and its model must be the session's; otherwise a MinikvError says what differs."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MinikvError(f"session file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get(FORMAT, "null"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise MinikvError(f"{path} is not a minikv session file")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise MinikvError(f"{path} is not a readable minikv session file ({e})") from None
    if header.get("version") != VERSION:
        raise MinikvError(f"session {path} has format version {header.get('version')}, this minikv reads {VERSION}")
    if not _same_model(header["model"], model_fingerprint(engine.model)):
        raise MinikvError(f"session {path} was saved with another model")
    tokens = tensors.pop("tokens").tolist()
    store = {**header["store"], "tensors": {n.removeprefix("store/"): t for n, t in tensors.items()}}
    try:
        engine.store.load_state_dict(store)
    except MinikvError as e:
        raise MinikvError(f"session {path} was saved with other KV cache settings (--kv, -c/--ctx): {e}") from None
    if engine.store.lengths != [len(tokens)] * engine.store.batch:
        raise MinikvError(f"session {path} is corrupt: {len(tokens)} tokens, but the cache holds "
                          f"{engine.store.lengths}")
    engine.tokens = tokens
    return header["meta"]


def continuation_ids(tokenizer, held: list[int], text: str) -> list[int]:
    """Token ids of `text` to append after the ids `held`, tokenized as the joined text would be.

    So that a loaded session followed by a question ingests exactly what the document and the
    question joined in one prompt would: the boundary can merge into other tokens (e.g. two
    newlines). When the joined tokenization does not extend `held`, `text` is tokenized alone."""
    if not held:
        return tokenizer.encode(text)
    joined = tokenizer.encode(tokenizer.decode(held) + text)
    if joined[:len(held)] == held:
        return joined[len(held):]
    return tokenizer.encode(text, add_bos=False)
