"""`minikv summarize FILE [FILE ...]`: a summary per document, to stdout, to --out DIR or as JSON lines.

Documents are summarized `--batch` at a time through one engine (its store, of that many
sequences, is reused): each is ingested into its own sequence, then they decode together. A
file that cannot be read (missing,
empty, binary, not UTF-8) gets a one-line error on stderr, the others are still summarized,
and the exit status is 1. By default the context is the model's trained context, so every
document that fits it is ingested whole; see `minikv.summarize` for the long ones.

Sessions: `--save-session S` with one document saves the ingested document (before the
instruction); `--load-session S` with no FILE summarizes it again, e.g. with another --prompt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minikv.commands.run import decode_utf8
from minikv.errors import MinikvError
from minikv.options import (DEFAULT_CTX, add_model_arguments, add_sampling_arguments, load_from_args,
                            positive_int, sampling_from_args)
from minikv.summarize import DEFAULT_INSTRUCTION, Summarizer, Summary

SESSION_KIND = "summarize"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files; '-' reads stdin")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, metavar="DIR", help="write each summary to DIR/NAME.summary.txt")
    out.add_argument("--jsonl", action="store_true",
                     help="print one JSON object per document: file, tokens, summary, seconds, kv_bytes, method, parts")
    parser.add_argument("--prompt", metavar="TEMPLATE", default=DEFAULT_INSTRUCTION,
                        help="the instruction after the document; {max_words} is replaced (default: %(default)r)")
    parser.add_argument("--max-words", type=int, default=100, metavar="N",
                        help="length asked for (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=4, metavar="N",
                        help="documents summarized together; each has its own --ctx store (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    parser.add_argument("--save-session", metavar="FILE", help="save the ingested document (one FILE only)")
    parser.add_argument("--load-session", metavar="FILE", help="summarize a saved document instead of FILEs")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    # The context defaults to the model's trained context (None until it is known), and sampling
    # to greedy, so that the same documents give the same summaries; both flags override it.
    parser.set_defaults(ctx=None, temp=0.0)
    ctx = next(a for a in parser._actions if a.dest == "ctx")
    ctx.help = "context capacity in tokens (default: the model's trained context)"


def read_document(name: str) -> str:
    """The text of a document, or a MinikvError saying why it cannot be summarized."""
    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(name).read_bytes()
        except OSError as e:
            raise MinikvError(f"{name}: {e.strerror.lower() if e.strerror else e}") from None
    if b"\0" in data[:8192]:
        raise MinikvError(f"{name}: binary file (NUL bytes), not text")
    text = decode_utf8(data, name)
    if not text.strip():
        raise MinikvError(f"{name}: empty document")
    return text


def out_path(folder: Path, name: str, taken: set[Path]) -> Path:
    """folder/NAME.summary.txt, numbered when two inputs share a name."""
    stem = "stdin" if name == "-" else Path(name).name
    path, i = folder / f"{stem}.summary.txt", 1
    while path in taken:
        i += 1
        path = folder / f"{stem}-{i}.summary.txt"
    taken.add(path)
    return path


def main(args: argparse.Namespace) -> int:
    if not args.files and not args.load_session:
        raise MinikvError("no documents: give FILE arguments ('-' for stdin) or --load-session")
    if args.load_session and args.files:
        raise MinikvError("--load-session summarizes the saved document: give no FILE with it")
    if args.save_session and (len(args.files) != 1 or args.load_session):
        raise MinikvError("--save-session saves one document: give exactly one FILE")
    if args.files.count("-") > 1:
        raise MinikvError("stdin ('-') can be read once")
    trained_ctx = args.ctx is None
    if trained_ctx:
        args.ctx = DEFAULT_CTX  # the store is rebuilt below, once the model's trained context is known
    sampling_from_args(args)  # bad flags fail before the model loads
    llm = load_from_args(args)
    batch = min(args.batch, len(args.files)) if args.files and not args.save_session else 1
    if trained_ctx or batch > 1:
        llm.ctx = args.ctx = llm.model.config.max_seq_len if trained_ctx else args.ctx
        llm.engine = None  # free the first store before the second is allocated
        llm.engine = llm.new_engine(batch)
    params = sampling_from_args(args)

    from tqdm import tqdm

    quiet = args.quiet
    docs = tqdm(total=len(args.files) or 1, desc="documents", unit="doc", disable=quiet, position=0)
    toks = tqdm(desc="tokens ingested", unit="tok", disable=quiet, position=1, leave=False)
    summarizer = Summarizer(llm.engine, params, args.prompt, args.max_words, on_tokens=toks.update)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    failed, taken = 0, set()

    def fail(name: str, e: MinikvError) -> None:
        nonlocal failed
        failed += 1
        message = str(e) if str(e).startswith(name) else f"{name}: {e}"
        tqdm.write(f"minikv: error: {message}", file=sys.stderr)
        if args.jsonl:
            print(json.dumps({"file": name, "error": message}), flush=True)
        docs.update(1)

    if args.load_session or args.save_session:
        name = args.load_session or args.files[0]
        try:
            summary = (session_summary(summarizer, args.load_session) if args.load_session
                       else document_summary(summarizer, name, args.save_session))
        except MinikvError as e:
            fail(name, e)
        else:
            report(summary, name, llm.engine.store.nbytes() // llm.engine.store.batch, args, taken)
            docs.update(1)
    else:
        names, texts = [], []
        for name in args.files:
            try:
                texts.append(read_document(name))
                names.append(name)
            except MinikvError as e:
                fail(name, e)
        for name, summary in zip(names, summarizer.summarize_many(texts)):
            if isinstance(summary, MinikvError):
                fail(name, summary)
            else:
                report(summary, name, llm.engine.store.nbytes() // llm.engine.store.batch, args, taken)
                docs.update(1)
    toks.close()
    docs.close()
    return 1 if failed else 0


def document_summary(summarizer: Summarizer, name: str, save: str) -> Summary:
    text = read_document(name)
    from minikv.session import save_session

    def on_ingested(n_tokens: int) -> None:
        save_session(save, summarizer.engine, {"kind": SESSION_KIND, "file": name, "tokens": n_tokens})

    return summarizer.summarize(text, on_ingested)


def session_summary(summarizer: Summarizer, path: str) -> Summary:
    from minikv.session import load_session

    t0 = time.perf_counter()
    meta = load_session(path, summarizer.engine)
    if meta.get("kind") != SESSION_KIND:
        raise MinikvError(f"session {path} was not saved by `minikv summarize`")
    return Summary(summarizer.finish(), meta["tokens"], "whole", 1, time.perf_counter() - t0)


def report(s: Summary, name: str, kv_bytes: int, args: argparse.Namespace, taken: set[Path]) -> None:
    from tqdm import tqdm

    how = "whole" if s.method == "whole" else f"hierarchically, {s.parts} parts"
    if args.jsonl:
        print(json.dumps({"file": name, "tokens": s.tokens, "summary": s.text, "seconds": round(s.seconds, 3),
                          "kv_bytes": kv_bytes, "method": s.method, "parts": s.parts}, ensure_ascii=False),
              flush=True)
    elif args.out:
        path = out_path(args.out, name, taken)
        path.write_text(s.text + "\n", encoding="utf-8")
        if not args.quiet:
            tqdm.write(f"{path}: {s.tokens} tokens summarized {how} in {s.seconds:.1f} s", file=sys.stderr)
    else:
        tqdm.write(f"==> {name} ({s.tokens} tokens, summarized {how}) <==\n{s.text}\n", file=sys.stdout)
        sys.stdout.flush()
