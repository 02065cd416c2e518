"""The Python API: load a model once, then complete, stream or chat. The CLI commands only wrap it.

    import minikv
    llm = minikv.load(ctx=2048, kv="fp16")
    print(llm.complete("The capital of France is", max_tokens=8, temperature=0))
    for piece in llm.stream_chat([{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)

Sampling knobs are `minikv.sampling.SamplingParams` fields passed as keywords. `llm.engine`
is the default conversation; `llm.new_engine()` makes an independent one with its own store.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from minikv.errors import ContextFull, MinikvError
from minikv.generate import Engine, Stats
from minikv.sampling import SamplingParams

if TYPE_CHECKING:
    from minikv.presets import KVSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Message = dict[str, str]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: cuda if available, else cpu; asking for cuda without it is a user error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinikvError("--device cuda was asked for but CUDA is not available (use --device cpu)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto": fp32 on the CPU (fast and exact there), bf16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise MinikvError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class LLM:
    """A loaded model, its tokenizer, and how to build KV stores for it."""

    def __init__(self, model: torch.nn.Module, tokenizer, kv: KVSettings, ctx: int, cuda_graph: bool = True,
                 progress: bool = False) -> None:
        if ctx <= 0:
            raise MinikvError(f"the context capacity must be > 0, got {ctx}")
        self.model, self.tokenizer, self.kv, self.ctx = model, tokenizer, kv, ctx
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.progress = progress  # show a bar while long prompts are prefilled
        self.engine = self.new_engine()

    def new_engine(self, batch: int = 1) -> Engine:
        """An independent conversation: its own KV store of `ctx` tokens (for each of `batch`
        sequences decoded together), sharing the weights."""
        from minikv.presets import make_store

        store = make_store(self.model.config, self.kv, batch, self.ctx, self.dtype, self.device,
                           static=self.cuda_graph)
        engine = Engine(self.model, self.tokenizer, store)
        if self.cuda_graph and getattr(store, "static", False):  # the reference path (MiKV) has no graph
            from minikv.cuda_graph import enable_cuda_graph

            enable_cuda_graph(engine)
        return engine

    @property
    def stats(self) -> Stats:
        """Token counts and speeds of the default engine's last prefill and generation."""
        return self.engine.stats

    def complete(self, prompt: str, **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str, chat: bool = False, system: str | None = None, engine: Engine | None = None,
               append: bool = False, **sampling) -> Iterator[str]:
        """Text pieces continuing `prompt` (with `chat`: the reply to it, in the chat template).

        The engine starts empty, unless `append`: then the prompt follows what it holds (e.g. a
        loaded session), tokenized as the two texts joined would be."""
        params, engine = self.params(**sampling), engine or self.engine
        text = self.chat_text(chat_messages(prompt, system)) if chat else prompt
        if not text:
            raise MinikvError("the prompt is empty")
        if append and engine.tokens:
            from minikv.session import continuation_ids

            ids = continuation_ids(self.tokenizer, engine.tokens, text)
        else:
            engine.reset()
            ids = self.tokenizer.encode(text, add_bos=False if chat else None)
        yield from engine.generate(engine.ingest(ids, progress=self.progress), params)

    def chat(self, messages: list[Message], **sampling) -> str:
        return "".join(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: list[Message], engine: Engine | None = None, **sampling) -> Iterator[str]:
        """The assistant's reply to `messages`, as text pieces.

        Only what the engine does not hold yet is prefilled, so a growing conversation costs its
        new tokens only (see `prefill_text`)."""
        params, engine = self.params(**sampling), engine or self.engine
        logits = self.prefill_text(engine, self.chat_text(messages))
        yield from engine.generate(logits, params)

    def chat_text(self, messages: list[Message]) -> str:
        """The conversation rendered with the model's chat template, ready for the reply."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def prefill_text(self, engine: Engine, text: str) -> Tensor:
        """Prefill chat-template `text` into `engine`, reusing the tokens it holds when they are a prefix.

        After a reply, the engine holds the conversation so far plus the generated tokens; the
        next rendering starts with the same tokens unless the history changed (edited, trimmed,
        new system prompt) or the reply re-tokenizes differently: then the engine starts over.
        Templates carry their own BOS text, so none is added."""
        ids = self.tokenizer.encode(text, add_bos=False)
        held = len(engine.tokens)
        if not 0 < held < len(ids) or ids[:held] != engine.tokens:
            engine.reset()
            held = 0
        return engine.ingest(ids[held:], progress=self.progress)

    def fit(self, messages: list[Message], reserve: int) -> list[Message]:
        """The context-full policy: drop the oldest exchanges until the conversation leaves `reserve`
        tokens free for the reply. A leading system message and the last message are always kept;
        raises ContextFull when even they do not fit."""
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        while len(self.tokenizer.encode(self.chat_text(head + body), add_bos=False)) + reserve > self.ctx:
            if len(body) <= 1:
                raise ContextFull(f"the message does not fit in the {self.ctx}-token context with room for a "
                                  f"{reserve}-token reply (raise -c/--ctx, or lower -n)")
            body = body[1:]
            while len(body) > 1 and body[0]["role"] != "user":  # restart at a user turn
                body = body[1:]
        return head + body

    @staticmethod
    def params(params: SamplingParams | None = None, **overrides) -> SamplingParams:
        """`params` (default: SamplingParams()) with keyword overrides, validated."""
        params = dataclasses.replace(params or SamplingParams(), **overrides)
        params.validate()
        return params


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    """One user message, after a system message when `system` is given."""
    if not prompt:
        raise MinikvError("the prompt is empty")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def describe(engine: Engine) -> str:
    """Context use, KV bytes and the last prefill/decode speeds: `run -v` and the REPL's /stats."""
    s, store = engine.stats, engine.store
    working = store.working_nbytes()
    extra = f" + {working / 2**20:.2f} MiB dequantized working copy" if working else ""
    return (f"context: {store.length} / {store.capacity} tokens, KV store {store.nbytes() / 2**20:.2f} MiB "
            f"({store.nbytes()} bytes){extra}\n"
            f"prefill: {s.prompt_tokens} tokens, {s.prefill_tps:.1f} tok/s\n"
            f"decode:  {s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s, stop: {s.stop_reason or '-'}")


def load(model: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, ctx: int = 4096, kv: str | KVSettings | None = None,
         cuda_graph: bool = True, progress: bool = False) -> LLM:
    """Load a model folder or .gguf file (None: the default model) with a `ctx`-token KV store.

    `kv` is a preset name (see `minikv --help`) or a `minikv.presets.KVSettings`."""
    from minikv import presets
    from minikv.loader import load as load_model

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if isinstance(kv, str | None):
        kv = presets.KVSettings.from_preset(kv or presets.DEFAULT_KV, calib=presets.default_calibration(model))
    net, tokenizer = load_model(model, device, dtype, progress=progress)
    return LLM(net, tokenizer, kv, ctx, cuda_graph=cuda_graph, progress=progress)
