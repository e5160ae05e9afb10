"""`arfuse` console script: subcommands that build config objects and call the library."""
from __future__ import annotations

import argparse
import importlib
import os
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that names the fix (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="arfuse",
        description="Fuse a large model with smaller ones at the level of their output distributions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"arfuse.cli.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def _one_line(text) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _debug() -> bool:
    return os.environ.get("ARFUSE_DEBUG", "").strip() not in ("", "0")


def _file_in_traceback(tb) -> str | None:
    """The file an exception was reading, from the innermost frame that names one (a decode
    error does not carry its file name)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in ("path", "filename", "file", "fname", "spec", "base"):
            v = frame.f_locals.get(name)
            if isinstance(v, (str, os.PathLike)) and str(v) and os.path.isfile(v):
                return str(v)
    return None


def _os_error(e: OSError) -> str:
    import errno

    name = e.filename if e.filename is not None else None
    what = f"{name}" + (f" -> {e.filename2}" if getattr(e, "filename2", None) else "") if name is not None else None
    reason = e.strerror or _one_line(e) or type(e).__name__
    if isinstance(e, FileNotFoundError):
        fix = "no such file or folder: check the path"
    elif isinstance(e, PermissionError):
        fix = "permission denied: check its permissions, or choose a path you can write (the score cache: ARFUSE_CACHE)"
    elif isinstance(e, IsADirectoryError):
        fix = "is a folder: give a file"
    elif isinstance(e, NotADirectoryError):
        fix = "part of the path is a file, not a folder: check the path"
    elif e.errno == errno.ENOSPC:
        fix = "no space left on the device: free some space, or point ARFUSE_CACHE at a disk with room"
    else:
        fix = f"{reason}: check the path and retry"
    return f"{what}: {fix}" if what else f"{reason} ({type(e).__name__}): check the inputs and retry"


def report_error(e: BaseException, command: str | None) -> int:
    """The one place an exception becomes what the user sees: one line on standard error (the
    full traceback first with ARFUSE_DEBUG=1) and the exit code: 2 for a bad input or a
    resource problem, 130 for Ctrl-C, 1 for a bug of arfuse."""
    import traceback

    prog = f"arfuse {command}" if command else "arfuse"
    if isinstance(e, BrokenPipeError):  # `arfuse ... | head`: the reader left; say nothing
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    if _debug():
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    if isinstance(e, KeyboardInterrupt):
        msg, code = "interrupted: cached work is kept; rerun the same command to resume", 130
    elif isinstance(e, ArfuseError):
        msg, code = f"error: {_one_line(e)}", 2
    elif isinstance(e, UnicodeDecodeError):
        where = _file_in_traceback(e.__traceback__) or "the input"
        msg, code = (f"error: {where} is not {e.encoding} text ({e.reason} at byte {e.start}): convert it to "
                     "UTF-8 (e.g. iconv -f latin1 -t utf-8) or give a text file"), 2
    elif isinstance(e, OSError):
        msg, code = f"error: {_os_error(e)}", 2
    elif isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
        msg, code = ("error: out of memory: use a smaller --batch-size (or --window), or a device with more "
                     "memory"), 2
    else:
        detail = _one_line(e)
        msg, code = (f"internal error: {type(e).__name__}{': ' + detail if detail else ''} (rerun with "
                     "ARFUSE_DEBUG=1 for the traceback; please report it)"), 1
    print(f"{prog}: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = getattr(args, "command", None)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        # arfuse draws its own progress bars; transformers' per-load bars are noise here
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if getattr(args, "quiet", False):  # no bar at all, the GGUF conversion's included
            from arfuse.adapters.hf import set_conversion_progress

            set_conversion_progress(False)
        return int(args.func(args) or 0)
    except SystemExit:  # argparse's usage errors (one line, code 2) and --help
        raise
    except BaseException as e:  # noqa: BLE001 - the one place errors become messages
        return report_error(e, command)


if __name__ == "__main__":
    sys.exit(main())
