"""`minikv chat` (also `minikv` with no command): the interactive chat REPL, see minikv/repl.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from minikv.options import add_model_arguments, add_sampling_arguments, load_from_args, sampling_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-sys", "--system", metavar="TEXT", help="system prompt (default: the chat template's)")
    parser.add_argument("--history-file", type=Path, default=None, metavar="PATH",
                        help="where typed input is remembered across sessions (default: ~/.cache/minikv/chat_history)")
    parser.add_argument("--load-session", metavar="FILE", help="go on with a chat saved by --save-session")
    parser.add_argument("--save-session", metavar="FILE", help="save the conversation and its KV store on exit")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from minikv.repl import Repl
    from minikv.session import load_session, save_session

    params = sampling_from_args(args)
    llm = load_from_args(args)
    repl = Repl(llm, params, system=args.system, history_file=args.history_file, verbose=args.verbose)
    if args.load_session:
        repl.restore(load_session(args.load_session, llm.engine))
    status = repl.run()
    if args.save_session:
        save_session(args.save_session, llm.engine, repl.state())
    return status
