"""Benchmark tasks for SmolLM2-135M alone and fused, one command; writes benchmarks/results/task_*.json.

    nice -n 10 .venv/bin/python benchmarks/bench_tasks.py [--limit-lambada 100] [--limit-arc 100] ...

Settings (each number in docs/results.md says which it came from):
- LAMBADA (lm-eval lambada_openai format), SmolLM2-135M alone, and fused with --lambada-small (token-level
  argmax needs an SLM on SmolLM2's tokenizer). Until the trainer's SLMs exist the default is a context
  ablation: SmolLM2-135M itself reading only the last 8 words of each passage (r = 1; not the paper's
  setting). For a real SLM: --lambada-small SLM --lambada-small-context-words 0.
- ARC-Easy / ARC-Challenge (lm-eval arc_* prompt), SmolLM2-135M alone and fused over answers with
  --arc-small (default stories260k: answer-level fusion needs no shared tokenizer).
Weights are chosen on the first 20% of the examples and reported on the other 80%.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--arc-small", default="stories260k")
    ap.add_argument("--lambada-small", default="smollm2-135m")
    ap.add_argument("--lambada-small-context-words", type=int, default=8,
                    help="with --lambada-small: that model reads only the last N words of each passage")
    ap.add_argument("--limit-lambada", type=int, default=100)
    ap.add_argument("--limit-arc-easy", type=int, default=100)
    ap.add_argument("--limit-arc-challenge", type=int, default=50)
    ap.add_argument("--valid-split", default="0:20%")
    ap.add_argument("--only", help="comma-separated task names to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    from arfuse.formatting import json_safe
    from arfuse.tasks.runner import TaskRunConfig, report_markdown, run_task

    runs = [("lambada", args.lambada_small, args.limit_lambada), ("arc_easy", args.arc_small, args.limit_arc_easy),
            ("arc_challenge", args.arc_small, args.limit_arc_challenge)]
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task, small, limit in runs:
        if only and task not in only:
            continue
        t0 = time.time()
        scw = args.lambada_small_context_words if task == "lambada" and args.lambada_small_context_words > 0 else None
        cfg = TaskRunConfig(task=task, large=args.large, small=small, limit=limit, valid_split=args.valid_split,
                            small_context_words=scw)
        rep = run_task(cfg, progress=False)
        rep["command"] = (f"arfuse task {task} --large {args.large}" + (f" --small {small}" if small else "")
                          + (f" --small-context-words {scw}" if scw else "")
                          + f" --limit {limit} --valid-split {args.valid_split}")
        rep["seconds"] = round(time.time() - t0, 1)
        (out / f"task_{task}.json").write_text(json.dumps(json_safe(rep), indent=1))
        print(report_markdown(rep), flush=True)


if __name__ == "__main__":
    main()
