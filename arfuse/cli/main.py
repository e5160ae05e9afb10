"""`arfuse` console script: subcommands that build config objects and call the library."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from arfuse.errors import ArfuseError

# Every module of arfuse.cli that defines register(subparsers) is a subcommand; it sets a
# `func(args) -> int` default. Listed first in this order, then any others alphabetically.
FIRST = ["score", "eval", "task", "law", "train", "generate", "demo"]


def _command_modules() -> list[str]:
    import arfuse.cli as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    names = [n for n in names if n not in ("main", "common")]
    return [n for n in FIRST if n in names] + sorted(n for n in names if n not in FIRST)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arfuse",
        description="Fuse a large model with smaller ones at the level of their output distributions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"arfuse.cli.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import os

    # arfuse draws its own progress bars; transformers' per-load bars are noise here
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except ArfuseError as e:
        print(f"arfuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: cached work is kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
