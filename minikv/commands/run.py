"""`minikv run`: one-shot completion, streamed to stdout (llama.cpp's `llama-cli -no-cnv`).

Only the generated text goes to stdout, flushed piece by piece, so the output pipes cleanly;
everything else (errors, -v statistics, the context-full notice) goes to stderr. When the
context fills up during generation, generation stops there and stderr says so.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minikv.api import chat_messages, describe
from minikv.errors import MinikvError
from minikv.options import add_model_arguments, add_sampling_arguments, load_from_args, sampling_from_args
from minikv.session import load_session, save_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the prompt; '-' reads it from stdin (as does piping with no -p)")
    src.add_argument("-f", "--file", type=Path, help="read the prompt from a UTF-8 text file")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("-sys", "--system", metavar="TEXT", help="system message for --chat")
    parser.add_argument("--echo", action="store_true", help="print the prompt (as fed to the model) before the output")
    parser.add_argument("--load-session", metavar="FILE",
                        help="start from a saved session: the prompt follows its text")
    parser.add_argument("--save-session", metavar="FILE",
                        help="save the KV store and tokens at the end (e.g. -f DOC -n 0 ingests a document once)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinikvError(f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from -p, -f or stdin; empty prompts are refused before the model loads."""
    if args.file is not None:
        try:
            prompt = decode_utf8(args.file.read_bytes(), str(args.file))
        except OSError as e:
            raise MinikvError(f"cannot read the prompt file: {e.strerror}: {args.file}") from None
    elif args.prompt == "-" or args.prompt is None and not sys.stdin.isatty():
        prompt = decode_utf8(sys.stdin.buffer.read(), "stdin")
    elif args.prompt is None:
        raise MinikvError("no prompt: give -p TEXT, -f FILE, or pipe text into stdin")
    else:
        prompt = args.prompt
    if not prompt:
        raise MinikvError("the prompt is empty")
    return prompt


def main(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise MinikvError("-sys/--system needs --chat")
    prompt = read_prompt(args)
    params = sampling_from_args(args)
    llm = load_from_args(args)
    if args.load_session:
        load_session(args.load_session, llm.engine)
    status = 0
    try:
        if args.echo:
            write(llm.chat_text(chat_messages(prompt, args.system)) if args.chat else prompt)
        for piece in llm.stream(prompt, chat=args.chat, system=args.system, append=True, params=params):
            write(piece)
    except KeyboardInterrupt:
        llm.stats.stop_reason, status = "interrupted", 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
    if sys.stdout.isatty() and (llm.stats.generated_tokens or args.echo):
        write("\n")  # keep the shell prompt off the last line; pipes get the text exactly
    if llm.stats.stop_reason == "context":
        print(f"minikv: the {llm.ctx}-token context is full: generation stopped (raise -c/--ctx)", file=sys.stderr)
    if args.verbose:
        print(describe(llm.engine), file=sys.stderr)
    if args.save_session and status == 0:
        save_session(args.save_session, llm.engine)
    return status


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
