"""Text <-> token ids over Hugging Face `tokenizers` (tokenizer.json) or SentencePiece (tokenizer.model).

One `Tokenizer` hides which library does the work and applies the model's conventions
that live outside the vocabulary: whether a BOS id is prepended, which ids end a turn
(tokenizer_config's EOS plus generation_config's), and the chat template. Special tokens
written in text (e.g. `<|im_start|>`) always encode to their ids.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from minikv import chat_template
from minikv.errors import MinikvError


class Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...  # no BOS/EOS added; special tokens recognised
    def decode(self, ids: list[int]) -> str: ...  # special tokens kept as text
    def token_to_id(self, token: str) -> int | None: ...
    def vocab_size(self) -> int: ...
    def adds_bos(self) -> bool: ...  # the library's own default
    def default_bos_eos(self) -> tuple[int | None, int | None]: ...  # when tokenizer_config names none


class FastBackend:
    """A `tokenizers.Tokenizer` (loaded from tokenizer.json, or built from a GGUF vocabulary)."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def adds_bos(self) -> bool:
        # Llama-3-style tokenizer.json files prepend BOS in their post-processor.
        plain, full = self.tok.encode("a", add_special_tokens=False).ids, self.tok.encode("a").ids
        return len(full) > len(plain) and full[1:] == plain

    def default_bos_eos(self) -> tuple[int | None, int | None]:
        return None, None


class SentencePieceBackend:
    """A SentencePiece model; control tokens in text are split out first, since SentencePiece ignores them."""

    def __init__(self, path: Path) -> None:
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise MinikvError(f"cannot read the SentencePiece model {path}: {e}") from None
        self.special = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                        if self.sp.is_control(i) or self.sp.is_unknown(i)}
        names = sorted(self.special, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def encode(self, text: str) -> list[int]:
        if self.pattern is None:
            return self.sp.encode(text)
        ids, start = [], 0
        for m in self.pattern.finditer(text):
            if m.start() > start:
                ids += self.sp.encode(text[start:m.start()])
            ids.append(self.special[m.group()])
            start = m.end()
        if start < len(text):
            ids += self.sp.encode(text[start:])
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def adds_bos(self) -> bool:
        return self.sp.bos_id() >= 0

    def default_bos_eos(self) -> tuple[int | None, int | None]:
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        return (bos if bos >= 0 else None), (eos if eos >= 0 else None)


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A backend plus the conventions of tokenizer_config.json: BOS, end-of-turn ids, chat template."""

    def __init__(self, backend: Backend, config: dict[str, Any] | None = None, eos_ids: Iterable[int] = ()) -> None:
        """`config`: tokenizer_config.json's contents; `eos_ids`: more end ids (generation_config's)."""
        self.backend = backend
        self.config = config or {}
        bos, eos = (self.token_id(_token_text(self.config.get(f"{k}_token"))) for k in ("bos", "eos"))
        default_bos, default_eos = backend.default_bos_eos()
        self.bos_id: int | None = default_bos if bos is None else bos
        eos = default_eos if eos is None else eos
        self.eos_ids: list[int] = list(dict.fromkeys([*_ids(eos), *eos_ids]))
        add_bos = self.config.get("add_bos_token")
        self.add_bos: bool = (backend.adds_bos() if add_bos is None else bool(add_bos)) and self.bos_id is not None
        self.vocab_size: int = backend.vocab_size()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_id is None else self.backend.decode([self.bos_id])

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS is prepended per the model's default unless the text already starts with it."""
        ids = self.backend.encode(text)
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included. Decoding a growing list is safe for streaming.

        BOS is dropped only where the model prepends it: SmolLM2's "BOS" is `<|im_start|>`, real chat text."""
        return self.backend.decode([i for i in ids if i != self.bos_id] if self.add_bos else ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation: the model's own template, else a built-in by model family."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            template = chat_template.builtin_template(_Vocab(self))
        specials = {k: _token_text(v) for k, v in self.config.items()
                    if k.endswith("_token") and isinstance(v, (str, dict))}
        specials.setdefault("bos_token", self.bos_token)
        specials.setdefault("eos_token", self.backend.decode(self.eos_ids[:1]))
        return chat_template.render(template, messages, add_generation_prompt, **specials)


class _Vocab:
    """`token in vocab` for choosing a built-in chat template."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self.tokenizer.token_id(token) is not None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MinikvError(f"cannot read {path}: {e}") from None


def _ids(value: Any) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a model folder: tokenizer.json (preferred) or tokenizer.model, plus its configs."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend: Backend = FastBackend(HFTokenizer.from_file(str(folder / "tokenizer.json")))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise MinikvError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
    elif (folder / "tokenizer.model").exists():
        backend = SentencePieceBackend(folder / "tokenizer.model")
    else:
        raise MinikvError(f"no tokenizer in {folder} (expected tokenizer.json or tokenizer.model)")
    config = _read_json(folder / "tokenizer_config.json")
    eos = _ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
    eos += _ids(_read_json(folder / "config.json").get("eos_token_id"))
    return Tokenizer(backend, config, eos)


def gguf_tokenizer(gguf) -> Tokenizer:
    """The tokenizer stored in a `minikv.gguf_file.GGUFFile`."""
    eos = _ids(gguf.generation_config().get("eos_token_id"))
    return Tokenizer(FastBackend(gguf.tokenizer()), gguf.tokenizer_config(), eos)
