"""`minikv` command line: a thin dispatcher over one module per command.

Each command module exposes `add_arguments(parser)` and `main(args) -> int`; modules are
imported only when their command runs, so `minikv --help` and kernels stay light.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# name -> (module, one-line help). `minikv` with no command starts `chat`.
COMMANDS = {
    "run": ("minikv.commands.run", "one-shot completion of a prompt, streamed to stdout"),
    "chat": ("minikv.commands.chat", "interactive chat (the default when no command is given)"),
    "summarize": ("minikv.commands.summarize", "summarize documents, long ones hierarchically"),
    "perplexity": ("minikv.commands.perplexity", "perplexity / KL of a text through the KV store"),
    "calibrate": ("minikv.commands.calibrate", "compute the KV-quantization calibration file for a model"),
    "kvstats": ("minikv.commands.kvstats", "per-layer norm statistics of keys and values (KV-AdaQuant)"),
    "bench": ("minikv.commands.bench", "prefill/decode speed and memory benchmark"),
    "weights": ("minikv.commands.weights", "fetch and convert the default model"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from minikv.presets import presets_help

    parser = argparse.ArgumentParser(
        prog="minikv",
        description="Small LLaMA/Mistral inference with a quantized KV cache.",
        epilog=presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"minikv {__import__('minikv').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=presets_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is None or only == name:  # only the running command's options are imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from minikv.errors import MinikvError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["chat", *argv]
    command = argv[0] if argv[0] in COMMANDS else None
    args = build_parser(only=command).parse_args(argv)
    args.command_line = "minikv " + shlex.join(argv)  # what the records of benchmarks say made them
    if args.command is None:
        build_parser().print_help()
        return 0
    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args)
    except MinikvError as e:
        print(f"minikv: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
