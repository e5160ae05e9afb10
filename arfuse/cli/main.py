"""`arfuse` console script: subcommands that build config objects and call the library."""
from __future__ import annotations

import argparse
import importlib
import sys

from arfuse.errors import ArfuseError

# Each module defines register(subparsers) and sets a `func(args) -> int` default.
COMMANDS = ["score", "eval", "train"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arfuse",
        description="Fuse a large model with smaller ones at the level of their output distributions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"arfuse.cli.{name}")
        except ModuleNotFoundError as e:  # a subcommand still being written
            if e.name == f"arfuse.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
