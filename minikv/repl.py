"""The interactive chat loop (`minikv chat`, or `minikv` alone), on prompt_toolkit.

The conversation lives twice: as messages, and as tokens in the engine's KV store. Each turn
renders the chat template for the whole conversation and prefills only what the store does not
hold yet (`LLM.prefill_text`), so a turn costs its new tokens, not the history.

Context-full policy: before a turn, if the conversation would leave less than
min(-n, ctx/4) tokens for the reply, the oldest exchanges are dropped (the system prompt stays)
and the rest is re-ingested; a reply that still fills the context is cut there, with a notice.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from minikv.api import LLM, Message, describe
from minikv.errors import MinikvError
from minikv.options import max_tokens
from minikv.sampling import SamplingParams

DEFAULT_HISTORY = Path.home() / ".cache" / "minikv" / "chat_history"

HELP = r"""Type a message and press Enter. To write several lines, end a line with \ or press Esc then Enter.
Ctrl-C stops a reply (what was written stays in the conversation) or clears the line. Ctrl-D or /exit quits.
  /help              this text
  /reset             forget the conversation (the system prompt stays)
  /system [TEXT]     set the system prompt, keeping the conversation (no TEXT: show it)
  /set [NAME VALUE]  change a sampling setting (no NAME: show them all); NAME is one of
                     temp, top-k, top-p, min-p, repeat-penalty, repeat-last-n, seed, n (-1: until the context is full)
  /stats             tokens in context, context capacity, KV bytes, last prefill and decode speed
  /exit              quit
When the context is full, the oldest exchanges are dropped (the system prompt stays)."""

SETTABLE = {  # `/set NAME` (the CLI flag without dashes) -> (SamplingParams field, type)
    "temp": ("temperature", float), "top-k": ("top_k", int), "top-p": ("top_p", float), "min-p": ("min_p", float),
    "repeat-penalty": ("repeat_penalty", float), "repeat-last-n": ("repeat_last_n", int), "seed": ("seed", int),
    "n": ("max_tokens", int),
}


class PipedInput:
    """Messages read from a stdin that is not a terminal (a script, a pipe): no editing, no history,
    a line ending in `\\` still continues on the next one."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def prompt(self, message: str = "") -> str:
        lines = []
        while line := self.stream.readline():
            line = line.rstrip("\n")
            if not line.endswith("\\"):
                return "\n".join([*lines, line])
            lines.append(line[:-1])
        if lines:
            return "\n".join(lines)
        raise EOFError


def make_session(history_file: Path, input=None, output=None):
    """A prompt_toolkit session with persistent history, `\\`-continued lines and Esc+Enter newlines
    (or a PipedInput when stdin is not a terminal and no input is given)."""
    if input is None and not sys.stdin.isatty():
        return PipedInput(sys.stdin)
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("enter")
    def _enter(event) -> None:
        buffer = event.current_buffer
        if buffer.document.text_before_cursor.endswith("\\"):
            buffer.delete_before_cursor()
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(history_file))
    except OSError:  # e.g. a read-only home: chat still works, without persistence
        history = InMemoryHistory()
    return PromptSession(history=history, key_bindings=keys, multiline=True, prompt_continuation="... ",
                         input=input, output=output)


class Repl:
    """A conversation at the terminal. `input`/`output` are prompt_toolkit's (tests pass a pipe and DummyOutput),
    replies go to `out`, and `on_piece` is called after each piece is written (tests raise
    KeyboardInterrupt from it to press Ctrl-C mid-reply)."""

    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None,
                 history_file: str | Path | None = None, input=None, output=None, out: TextIO | None = None,
                 on_piece: Callable[[str], None] | None = None, verbose: bool = False) -> None:
        self.llm, self.params, self.system = llm, params, system
        self.messages: list[Message] = []  # user and assistant turns, oldest first
        self.out = out or sys.stdout
        self.on_piece, self.verbose = on_piece, verbose
        self.session = make_session(Path(history_file or DEFAULT_HISTORY), input, output)
        self.commands: dict[str, Callable[[str], None]] = {
            "/help": lambda arg: self.say(HELP), "/reset": self.reset, "/system": self.set_system,
            "/set": self.set_option, "/stats": lambda arg: self.say(describe(self.llm.engine)),
        }

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def conversation(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def state(self) -> dict:
        """What a saved session keeps beside the store, so a reloaded chat goes on where it stopped."""
        return {"chat": {"system": self.system, "messages": self.messages}}

    def restore(self, meta: dict) -> None:
        """Take back the conversation of a session whose store the engine now holds."""
        if "chat" not in meta:
            raise MinikvError("the session is not a chat (save one with `minikv chat --save-session FILE`)")
        self.system, self.messages = meta["chat"]["system"], meta["chat"]["messages"]

    def run(self) -> int:
        print(f"minikv chat: {self.llm.ctx}-token context. /help for help, Ctrl-D to quit.", file=sys.stderr)
        if self.messages:
            self.say(f"[{len(self.messages)} messages restored]")
        while True:
            try:
                line = self.session.prompt("> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                continue
            except EOFError:  # Ctrl-D
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.startswith("/"):
                self.command(line)
            elif line.strip():
                self.turn(line)

    def command(self, line: str) -> None:
        name, _, arg = line.strip().partition(" ")
        if name not in self.commands:
            self.say(f"unknown command {name} (/help lists them)")
            return
        try:
            self.commands[name](arg.strip())
        except MinikvError as e:
            self.say(f"error: {e}")

    def reset(self, arg: str = "") -> None:
        self.messages = []
        self.llm.engine.reset()
        self.say("[conversation cleared]")

    def set_system(self, text: str) -> None:
        if text:
            self.system = text  # the next turn's prefix differs, so it is re-ingested
        self.say(f"system prompt: {self.system or '(none: the chat template default)'}")

    def set_option(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            p = self.params
            self.say(", ".join(f"{k} {getattr(p, field)}" for k, (field, _) in SETTABLE.items()))
            return
        if name not in SETTABLE:
            raise MinikvError(f"cannot set {name!r}: choose from {', '.join(SETTABLE)}")
        field, kind = SETTABLE[name]
        try:
            number = kind(value.strip())
        except ValueError:
            wanted = "an integer" if kind is int else "a number"
            raise MinikvError(f"{name} needs {wanted}, got {value.strip()!r}") from None
        if field == "max_tokens":
            number = max_tokens(number, self.llm.ctx)
        params = dataclasses.replace(self.params, **{field: number})
        params.validate()
        self.params = params
        self.say(f"{name} = {number}")

    def turn(self, text: str) -> None:
        """Send a user message and stream the reply; Ctrl-C keeps the part already written."""
        self.messages.append({"role": "user", "content": text})
        try:
            kept = self.llm.fit(self.conversation(), min(self.params.max_tokens, self.llm.ctx // 4))
        except MinikvError as e:
            self.messages.pop()
            self.say(f"error: {e}")
            return
        if len(kept) < len(self.conversation()):
            self.say(f"[context full: the {len(self.conversation()) - len(kept)} oldest messages were dropped]")
            self.messages = kept[1:] if self.system else kept
        engine, pieces = self.llm.engine, []
        try:
            for piece in self.llm.stream_chat(self.conversation(), params=self.params):
                self.out.write(piece)
                self.out.flush()
                pieces.append(piece)
                if self.on_piece:
                    self.on_piece(piece)
        except KeyboardInterrupt:
            engine.stats.stop_reason = "interrupted"
            if engine.store.length != len(engine.tokens):  # cut between the store's commit and the engine's
                engine.reset()
        except MinikvError as e:
            self.messages.pop()
            self.say(f"error: {e}")
            return
        reply = "".join(pieces)
        self.out.write("\n")
        if reply or engine.stats.stop_reason != "interrupted":
            self.messages.append({"role": "assistant", "content": reply})
        else:
            self.messages.pop()  # stopped before any reply: as if the message was never sent
        if engine.stats.stop_reason == "interrupted":
            self.say("[interrupted]")
        elif engine.stats.stop_reason == "context":
            self.say("[context full: reply cut; the oldest exchanges will be dropped at the next message]")
        if self.verbose:
            self.say(describe(engine))
