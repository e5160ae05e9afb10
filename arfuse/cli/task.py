"""`arfuse task NAME --large A [--small B]`: LAMBADA, ARC or CBT for one model, or fused."""
from __future__ import annotations

import json

from arfuse.cli.common import (add_backend_option, add_rule_options, add_scale_options, backend_spec, rule_params,
                               workers_from_args)


def register(sub) -> None:
    from arfuse.tasks.configs import available

    p = sub.add_parser("task", help="benchmark tasks: LAMBADA, ARC, CBT (alone and fused)",
                       description="Score a task's requests once (cached), report the large model alone "
                                   "(lm-evaluation-harness's metric definitions), and, with --small, the fused "
                                   "model at the weight ratio chosen on a validation part, with a bootstrap 95% "
                                   "interval for its change. --rule: any registered fusion rule (multiple choice "
                                   "fuses the answer distributions; LAMBADA the next-token distributions).")
    p.add_argument("task", help=f"a task name ({', '.join(available())}) or a task .toml file")
    p.add_argument("--large", required=True, help="the large model: name, .gguf, llama2.c .bin, folder or hub id")
    p.add_argument("--small", help="the small model to fuse with (multiple choice: any tokenizer; LAMBADA: the same)")
    p.add_argument("--weight", type=float, help="the LLM's weight w in [0, 1], fixed (default: chosen on the "
                                                "validation part)")
    p.add_argument("--data", help="the task's data file (default: the shared data folder's copy)")
    p.add_argument("--small-context-words", type=int, metavar="N",
                   help="the small model reads only the last N words of each context (a context ablation; "
                        "with --small equal to --large, a short-context copy of the large model)")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--valid-split", default="0:20%",
                   help="examples the weight is chosen on, as a:b indices or percentages; the rest is reported "
                        "(default 0:20%%; 'none' chooses on the reported examples, optimistic)")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--topk", type=int, default=32, help="top-k kept per token (LAMBADA's argmax certificate)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    add_backend_option(p)
    add_scale_options(p)
    add_rule_options(p)   # last: a command's own option (--topk) keeps its meaning
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse.errors import ArfuseError
    from arfuse.scoring.scorer import ScoreConfig
    from arfuse.formatting import json_safe
    from arfuse.tasks.runner import TaskRunConfig, report_markdown, run_task

    if args.limit is not None and args.limit < 1:
        raise ArfuseError(f"--limit must be at least 1, got {args.limit}")
    from arfuse.scoring.shards import scale_out

    workers = workers_from_args(args)   # checked before any model loads
    cfg = TaskRunConfig(task=args.task, large=backend_spec(args, args.large),
                        small=args.small and backend_spec(args, args.small), data=args.data, limit=args.limit,
                        valid_split=args.valid_split, small_context_words=args.small_context_words,
                        score=ScoreConfig(bos=args.bos, topk=args.topk), device=args.device, dtype=args.dtype,
                        batch_size=args.batch_size, use_cache=not args.no_cache, rule=args.rule,
                        rule_params=rule_params(args), weight=args.weight)
    with scale_out(workers):
        report = run_task(cfg, progress=not args.quiet)
    if args.json:
        print(json.dumps(json_safe(report), indent=1))
    else:
        print(report_markdown(report))
    return 0
