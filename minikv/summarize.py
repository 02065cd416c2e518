"""Summarize documents of any length with a chat model.

A document that fits the context (with room for the reply) is ingested whole, in chunks,
through the KV store, so memory is bounded by the store and not by the document. A longer
one is summarized hierarchically: it is cut into parts that fit (at line breaks where one is
near), each part is summarized, and the joined summaries are summarized in turn, recursively.

The prompt is the model's chat template around one user message: the document, a blank line,
then the instruction. The document comes first so that its tokens (the "prefix") can be
saved as a session and asked other instructions later without being ingested again.

Several prompts (documents, or the parts of a long one) are completed as a batch when the
engine's store holds several sequences: each is ingested into its own row, then all rows
decode together, one forward per token for the whole batch, which reads the weights once for
every row instead of once per row.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from minikv.errors import MinikvError
from minikv.generate import Engine
from minikv.sampling import SamplingParams
from minikv.store import KVStore

DEFAULT_INSTRUCTION = "Summarize the text above in at most {max_words} words."
_MARK = "\x00document\x00"  # stands for the user message while the chat template is rendered


@dataclass
class Summary:
    text: str
    tokens: int  # of the document
    method: str  # "whole" or "hierarchical"
    parts: int  # parts summarized at the first level (1 when whole)
    seconds: float  # wall time of the batch the document was summarized in


class Summarizer:
    """Summaries from one engine, reused (reset) for every document.

    `on_tokens(n)` is called as document tokens are ingested (progress bars)."""

    def __init__(self, engine: Engine, params: SamplingParams, instruction: str = DEFAULT_INSTRUCTION,
                 max_words: int = 100, on_tokens: Callable[[int], None] | None = None) -> None:
        if max_words <= 0:
            raise MinikvError(f"--max-words must be > 0, got {max_words}")
        try:
            instruction = instruction.format(max_words=max_words)
        except (KeyError, IndexError, ValueError) as e:
            raise MinikvError(f"bad --prompt template (only {{max_words}} may be used, {{{{ }}}} for braces): "
                              f"{e}") from None
        self.engine, self.params = engine, params
        self.on_tokens = on_tokens or (lambda n: None)
        tok = engine.tokenizer
        head, tail = tok.apply_chat_template([{"role": "user", "content": _MARK}]).split(_MARK)
        self.head = tok.encode(head, add_bos=False)
        self.suffix = tok.encode("\n\n" + instruction.strip() + tail, add_bos=False)
        # The context a prompt may use: the store's capacity, but never past the trained context.
        self.ctx = min(engine.store.capacity, engine.model.config.max_seq_len)
        # A reply gets its -n tokens, but at most a quarter of the context (-n -1 asks for all of it).
        self.reserve = min(params.max_tokens, self.ctx // 4)
        self.part_budget = self.ctx - len(self.head) - len(self.suffix) - self.reserve

    def fits(self, n_tokens: int) -> bool:
        return n_tokens <= self.part_budget

    def summarize_many(self, texts: list[str]) -> Iterator[Summary | MinikvError]:
        """Summaries of `texts`, in order. Consecutive documents that fit whole are completed together,
        as many as the store has sequences (their `seconds` is that batch's); a longer one is summarized
        hierarchically, its parts batched. A document that cannot be summarized yields its error."""
        docs = [self.engine.tokenizer.encode(text.strip(), add_bos=False) for text in texts]
        i = 0
        while i < len(docs):
            t0 = time.perf_counter()
            if not self.fits(len(docs[i])):
                try:
                    text, parts = self._hierarchical(docs[i])
                    yield Summary(text, len(docs[i]), "hierarchical", parts, time.perf_counter() - t0)
                except MinikvError as e:
                    yield e
                i += 1
                continue
            j = i + 1
            while j < len(docs) and j - i < self.engine.store.batch and self.fits(len(docs[j])):
                j += 1
            summaries = self._complete(docs[i:j], self.params, count=True)
            seconds = time.perf_counter() - t0
            yield from (Summary(text, len(doc), "whole", 1, seconds) for doc, text in zip(docs[i:j], summaries))
            i = j

    def summarize(self, text: str, on_ingested: Callable[[int], None] | None = None) -> Summary:
        """Summarize `text`. `on_ingested(n_tokens)` runs once the document is ingested whole, before the
        instruction (to save a session); a document that does not fit then raises MinikvError."""
        if on_ingested is None:
            summary = next(self.summarize_many([text]))
            if isinstance(summary, MinikvError):
                raise summary
            return summary
        t0 = time.perf_counter()
        ids = self.engine.tokenizer.encode(text.strip(), add_bos=False)
        if not self.fits(len(ids)):
            raise MinikvError(f"{len(ids)} tokens do not fit the {self.ctx}-token context whole, so there is no "
                              f"session to save (raise -c/--ctx)")
        self.ingest_document(ids, count=True)
        on_ingested(len(ids))
        return Summary(self.finish(), len(ids), "whole", 1, time.perf_counter() - t0)

    def ingest_document(self, ids: list[int], count: bool = False) -> None:
        """Reset the engine and prefill the chat header and the document (the saveable prefix)."""
        self.engine.reset()
        self._ingest_document(ids, count, self.engine)

    def finish(self, params: SamplingParams | None = None) -> str:
        """Append the instruction to the ingested document and generate the summary."""
        logits = self._ingest(self.suffix)
        return "".join(self.engine.generate(logits, params or self.params)).strip()

    @torch.inference_mode()
    def _complete(self, docs: list[list[int]], params: SamplingParams, count: bool = False) -> list[str]:
        """Summaries of documents given as ids, as many at a time as the store has sequences."""
        store = self.engine.store
        out = []
        for first in range(0, len(docs), store.batch):
            group = docs[first:first + store.batch]
            self.engine.reset()
            rows = store if len(group) == store.batch else store.rows(0, len(group))
            logits = torch.stack([self._ingest_prompt(ids, count, self._engine(rows.rows(i, i + 1)))
                                  for i, ids in enumerate(group)])
            out += self._engine(rows).complete_rows(logits, params)
        return out

    def _engine(self, store: KVStore) -> Engine:
        """An engine over some sequences of our store (a view: what it writes, the store holds)."""
        if store is self.engine.store:
            return self.engine
        return Engine(self.engine.model, self.engine.tokenizer, store, self.engine.prefill_chunk)

    def _ingest_document(self, ids: list[int], count: bool, engine: Engine) -> None:
        """Prefill the chat header and the document (the saveable prefix)."""
        self._ingest(self.head, engine=engine)
        self._ingest(ids, count, engine)

    def _ingest_prompt(self, ids: list[int], count: bool, engine: Engine) -> Tensor:
        """Prefill the document's prefix and the instruction; the logits after them."""
        self._ingest_document(ids, count, engine)
        return self._ingest(self.suffix, engine=engine)

    def _hierarchical(self, ids: list[int]) -> tuple[str, int]:
        """Summaries of parts, then of the joined summaries, until they fit. Returns the summary and
        the number of parts of the document."""
        if self.part_budget < 32:
            raise MinikvError(f"the {self.ctx}-token context leaves {self.part_budget} tokens per part: too few "
                              f"to summarize a long document (raise -c/--ctx or lower -n)")
        # Part summaries at most half a part long, so every level at least halves the text.
        params = dataclasses.replace(self.params, max_tokens=min(self.reserve, self.part_budget // 2))
        first_parts = 0
        while not self.fits(len(ids)):
            parts = self._split(ids)
            summaries = self._complete(parts, params, count=not first_parts)
            first_parts = first_parts or len(parts)
            ids = self.engine.tokenizer.encode("\n\n".join(summaries), add_bos=False)
        return self._complete([ids], self.params)[0], first_parts

    def _split(self, ids: list[int]) -> list[list[int]]:
        """Parts of at most part_budget tokens of about equal size, cut after a line break when one is
        in the last fifth of the part."""
        n_parts = math.ceil(len(ids) / self.part_budget)
        size = math.ceil(len(ids) / n_parts)
        decode = self.engine.tokenizer.decode
        parts, start = [], 0
        while start < len(ids):
            end = min(start + size, len(ids))
            if end < len(ids):
                for cut in range(end, end - size // 5, -1):
                    if "\n" in decode(ids[cut - 1:cut]):
                        end = cut
                        break
            parts.append(ids[start:end])
            start = end
        return parts

    def _ingest(self, ids: list[int], count: bool = False, engine: Engine | None = None) -> Tensor:
        """Prefill in the engine's chunk size, reporting progress per chunk."""
        engine = engine or self.engine
        step = engine.prefill_chunk
        for start in range(0, len(ids), step):
            logits = engine.ingest(ids[start:start + step])
            if count:
                self.on_tokens(len(ids[start:start + step]))
        return logits
