"""`arfuse lm-eval [lm-eval's own arguments]`: lm-evaluation-harness with the fused model `arfuse`.

Registers the model ``arfuse`` (``arfuse.serve.harness``) in lm-eval's registry, then runs lm-eval's
own command line, unchanged, on the arguments that follow. When a task named ``arfuse_*`` is asked
for (arfuse's local tasks over ../shared/data: arfuse_wikitext, arfuse_lambada_openai,
arfuse_arc_easy, arfuse_arc_challenge), their folder is given as ``--include_path`` (unless one is).
"""
from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    # prefix_chars="\x00": every argument after `lm-eval` (--model, --tasks, --help, ...) is lm-eval's
    p = sub.add_parser("lm-eval", add_help=False, prefix_chars="\x00",
                       help="run lm-evaluation-harness with the fused model `arfuse` (lm-eval's own arguments)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments, e.g. --model arfuse --model_args "
                   "large=smollm2-135m,small=PATH,weight=0.9 --tasks arfuse_wikitext --limit 10")
    p.set_defaults(func=run)


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's argv (program name first): arfuse's task folder added to --include_path when an
    ``arfuse_*`` task is asked for."""
    from arfuse.serve.harness import task_dir

    args = list(args)
    tasks = []
    for i, a in enumerate(args):
        if a == "--tasks" and i + 1 < len(args):
            tasks += args[i + 1].split(",")
        elif a.startswith("--tasks="):
            tasks += a.split("=", 1)[1].split(",")
    if any(t.strip().startswith("arfuse_") for t in tasks):
        given = [a for a in args if a == "--include_path" or a.startswith("--include_path=")]
        if given:  # lm-eval 0.4.13 takes one folder: the user's stays, and is told where arfuse's tasks are
            print(f"arfuse lm-eval: your --include_path is kept; arfuse's local tasks are in {task_dir()} "
                  "(copy or link them into your folder)", file=sys.stderr)
        else:
            args += ["--include_path", str(task_dir())]
    return ["lm-eval", *args]


def run(args) -> int:
    from arfuse.serve.harness import register as register_model, require_lm_eval

    require_lm_eval()
    register_model()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = lm_eval_argv(args.args)
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
