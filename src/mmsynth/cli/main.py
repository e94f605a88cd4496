"""`mmsynth` entry point: builds the argument parser from each command module and maps bad input to exit 2.

A command module exposes `register(subparsers)`, which adds its sub-parser and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from mmsynth.errors import InputError

# Command modules under mmsynth.cli, in the order `mmsynth --help` lists them.
COMMAND_MODULES: tuple[str, ...] = ("demo", "data", "annotate", "layout", "generate", "invert", "edit", "compose",
                                   "judge", "train", "bench", "zoo")


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2 with one line naming the argument and what is valid, like every other bad input (argparse
    would print the whole usage first). Sub-parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Warnings(logging.Handler):
    """mmsynth's own warnings (a control image resized to the output, an unknown prompt word) as one line each on
    stderr, named like the errors: otherwise they reach the user only through logging's unprefixed last resort, and
    not at all once something configures logging. Looks stderr up per line (tests capture it)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.command = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().removeprefix("mmsynth: ")
        print(f"mmsynth {self.command}: warning: {message}", file=sys.stderr)


def show_warnings(command: str) -> None:
    """Print the `mmsynth` loggers' warnings for `command` (one handler, however often main runs in a process)."""
    logger = logging.getLogger("mmsynth")
    handler = next((h for h in logger.handlers if isinstance(h, _Warnings)), None)
    if handler is None:
        handler = _Warnings()
        logger.addHandler(handler)
    handler.command = command


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmsynth",
        description="Multimodal, controllable image synthesis and editing, scored against exact ground truth.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from mmsynth import __version__

    parser.add_argument("--version", action="version", version=f"mmsynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"mmsynth.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 out of memory, 2 bad input, 130 interrupted, 141 output pipe
    closed)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # the libraries' per-file loading/saving bars drown mmsynth's own output (HF_HUB_DISABLE_PROGRESS_BARS=0
    # brings them back)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0): a code, as every other outcome
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    show_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"mmsynth {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # a size the machine cannot hold: say so in one line (exit 1: not a malformed input)
        print(f"mmsynth {args.command}: error: out of memory; lower the size, batch or count asked for",
              file=sys.stderr)
        return 1
    except BrokenPipeError:  # `mmsynth ... | head`: the reader left; not an error of ours, and no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would hit the closed pipe again
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
