"""`arfuse eval --large A --small B --data D`: each model alone, the fused model and its gain."""
from __future__ import annotations

import json


def register(sub) -> None:
    from arfuse.cli.common import add_backend_option, add_model_options, add_rule_options, add_scale_options, add_score_options

    p = sub.add_parser("eval", help="a large model fused with small ones: perplexity, top-1 or masked perplexity",
                       description="Score each model once (cached), fuse at the given or the optimal weight, and "
                                   "report each model alone, the uniform average, the fused model and its gain. "
                                   "Causal LMs report perplexity, image classifiers top-1 accuracy, masked LMs "
                                   "masked-position perplexity (the kind is read from the models).")
    p.add_argument("--large", required=True, help="the large model (LLM): name, .gguf, llama2.c .bin, folder or hub id")
    p.add_argument("--small", action="append", required=True, help="a small model (SLM); repeat for several")
    p.add_argument("--data", required=True, help="data to report on: a name (wikitext2-raw-test, ptb-test, kjv, ...) or a file, optionally sliced [a:b]")
    p.add_argument("--valid", help="data to choose the weight on (disjoint from --data); without it the weight is fitted on --data")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight", type=float, help="the LLM's weight w in [0, 1] (two models)")
    g.add_argument("--weights", help="comma-separated weights, the LLM first, summing to 1 (K models)")
    g.add_argument("--search", action="store_true", help="find the optimal weight exactly (the default)")
    add_model_options(p)
    add_score_options(p)
    add_backend_option(p)
    add_scale_options(p)
    p.add_argument("--objective", choices=["nll", "accuracy"],
                   help="classifiers: search the weight for accuracy (exact, the default for two models) or NLL")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the gain against k with the improvement domain shaded")
    add_rule_options(p)   # last: a command's own option (--topk) keeps its meaning
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse.cli.common import backend_spec, rule_params, score_config, workers_from_args
    from arfuse.fusion.registry import resolve_weights
    from arfuse.tasks.config import EvalConfig
    from arfuse.tasks.heads import evaluate

    from arfuse.scoring.shards import scale_out

    workers = workers_from_args(args)   # checked before any model loads
    args.large, args.small = backend_spec(args, args.large), [backend_spec(args, s) for s in args.small]
    cfg = EvalConfig(large=args.large, smalls=args.small, data=args.data, valid=args.valid,
                     weights=resolve_weights(args.weight, args.weights, 1 + len(args.small)),
                     rule=args.rule, rule_params=rule_params(args), objective=args.objective,
                     score=score_config(args, [args.large, *args.small]),  # defaults fit the models' context
                     device=args.device, dtype=args.dtype, batch_size=args.batch_size, use_cache=not args.no_cache)
    with scale_out(workers):
        report = evaluate(cfg, progress=not args.quiet)
    print_report(report, json_out=args.json, plot=args.plot)
    return 0


def print_report(report, *, json_out: bool = False, plot: str | None = None) -> None:
    """Draw the plot (if asked), then print the report as JSON or as text; every head alike."""
    if plot:
        report.plot(plot)
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(report.to_markdown())
    if plot:
        print(f"plot: {plot}")
