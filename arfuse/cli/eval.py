"""`arfuse eval --large A --small B --data D`: each model alone, the fused model and its gain."""
from __future__ import annotations

import json
import math

from arfuse.cli.common import add_model_options, add_score_options, score_config
from arfuse.errors import ArfuseError


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a large model fused with small ones",
                       description="Score each model once (cached), fuse at the given or the NLL-optimal weight, "
                                   "and report each model alone, the uniform average, the fused model and its gain.")
    p.add_argument("--large", required=True, help="the large model (LLM): name, .gguf, llama2.c .bin, folder or hub id")
    p.add_argument("--small", action="append", required=True, help="a small model (SLM); repeat for several")
    p.add_argument("--data", required=True, help="data to report on: a name (wikitext2-raw-test, ptb-test, kjv, ...) or a file, optionally sliced [a:b]")
    p.add_argument("--valid", help="data to choose the weight on (disjoint from --data); without it the weight is fitted on --data")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight", type=float, help="the LLM's weight w in [0, 1] (two models)")
    g.add_argument("--weights", help="comma-separated weights, the LLM first, summing to 1 (K models)")
    g.add_argument("--search", action="store_true", help="find the NLL-optimal weight exactly (the default)")
    p.add_argument("--rule", choices=["linear", "cosine"], default="linear",
                   help="cosine: also report the paper's cosine-similarity variant, P ∝ p_LLM s(v, argmax p_SLM)^p, "
                        "beside the linear rule (runs the LLM once more for its full distributions)")
    p.add_argument("--power", type=float, help="--rule cosine: the power p >= 0 (default: the exact NLL-optimal p "
                   "on --valid)")
    p.add_argument("--embeddings", choices=["large", "small"], default="large",
                   help="--rule cosine: whose token embeddings give the similarity")
    add_model_options(p)
    add_score_options(p)
    p.add_argument("--objective", choices=["nll", "accuracy"],
                   help="classifiers: search the weight for accuracy (exact, the default for two models) or NLL")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the gain against k with the improvement domain shaded")
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse.tasks.perplexity import EvalConfig, evaluate

    weights = None
    if args.weight is not None:
        if len(args.small) != 1:
            raise ArfuseError(f"--weight is for two models but {1 + len(args.small)} were given: use --weights w1,w2,...")
        if not 0.0 <= args.weight <= 1.0 or math.isnan(args.weight):
            raise ArfuseError(f"--weight {args.weight} is outside [0, 1]: give the LLM's weight w, e.g. 0.95 "
                              "(a weight ratio k corresponds to w = k / (1 + k))")
        weights = [args.weight, 1.0 - args.weight]
    elif args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise ArfuseError(f"--weights {args.weights!r}: give comma-separated numbers, e.g. 0.9,0.05,0.05") from None
    if args.rule != "cosine" and (args.power is not None or args.embeddings != "large"):
        raise ArfuseError("--power and --embeddings belong to the cosine rule: add --rule cosine")
    if _other_head(args, weights):
        return 0
    cfg = EvalConfig(large=args.large, smalls=args.small, data=args.data, valid=args.valid, weights=weights,
                     score=score_config(args), device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                     use_cache=not args.no_cache)
    if args.rule == "cosine":
        from arfuse.tasks.cosine_eval import evaluate_cosine

        report = evaluate_cosine(cfg, args.power, embeddings=args.embeddings, progress=not args.quiet)
    else:
        report = evaluate(cfg, progress=not args.quiet)
    if args.plot:
        from arfuse.search.plot import plot_gain_curve

        plot_gain_curve(report, args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _other_head(args, weights) -> bool:
    """Image classifiers and protein masked LMs: the same fusion and search on their own records."""
    from arfuse.adapters.protein import is_protein_model
    from arfuse.adapters.vision import is_vision_model

    common = dict(valid=args.valid, weights=weights, device=args.device, use_cache=not args.no_cache,
                  progress=not args.quiet)
    if args.rule == "cosine" and (is_vision_model(args.large) or is_protein_model(args.large)):
        raise ArfuseError("--rule cosine is for causal language models (it needs token embeddings): "
                          "classifiers and masked LMs are fused with the linear rule")
    if is_vision_model(args.large):
        from arfuse.tasks.classification import evaluate_classification

        report = evaluate_classification(args.large, args.small, args.data, batch_size=max(args.batch_size, 64),
                                         search=args.objective, **common)
    elif is_protein_model(args.large):
        if args.objective == "accuracy":
            raise ArfuseError("--objective accuracy is for image classifiers: masked LMs are searched for NLL")
        from arfuse.tasks.masked_lm import evaluate_masked_lm

        report = evaluate_masked_lm(args.large, args.small, args.data, batch_size=args.batch_size, **common)
    else:
        return False
    if args.plot:
        report.plot(args.plot)
    print(report.to_json() if args.json else report.table())
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    return True


def _fmt_k(k: float | None) -> str:
    if k is None:
        return "-"
    return "inf" if math.isinf(k) else f"{k:.4g}"


def print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    con = Console() if sys.stdout.isatty() else Console(width=160)  # piped output: do not wrap at 80
    data = report.data
    head = (f"[bold]{data['name']}[/bold] ({data['scored']['tokens']:,} tokens scored, {data['chars']:,} characters; "
            f"{data['source']})\n{report.windowing}; BOS "
            + ", ".join(f"{'on' if b else 'off'} for {m['name']}" for b, m in zip(report.bos, report.models)))
    con.print(head)
    t = Table(show_lines=False)
    for col, just in [("model", "left"), ("params", "right"), ("token PPL", "right"), ("word PPL", "right"),
                      ("bits/byte", "right"), ("gain %", "right"), ("w", "right"), ("k", "right")]:
        t.add_column(col, justify=just)
    params = {m["name"]: m["num_parameters"] for m in report.models}
    for r in report.rows:
        m = r.metrics
        w = r.weights[0] if r.weights else None
        t.add_row(r.name if r.kind != "fused" else f"[bold]{r.name}[/bold]",
                  f"{params[r.name] / 1e6:.2f}M" if r.name in params else "",
                  f"{m['token_ppl']:.4f}", f"{m['word_ppl']:.4f}", f"{m['bits_per_byte']:.4f}",
                  f"{r.gain_pct:+.3f}" if r.kind != "large" else "", "" if w is None else f"{w:.6f}",
                  "" if w is None else _fmt_k(w / (1 - w) if w < 1 else math.inf))
    con.print(t)
    ratio = ", ".join(f"{x:.1f}" for x in report.param_ratio)
    con.print(f"weights: {', '.join(f'{w:.6f}' for w in report.weights)} (LLM first); k = {_fmt_k(report.k)}; "
              f"parameter ratio r = {ratio}")
    con.print(f"weight source: {report.weight_source}")
    if report.gain_ci:
        ci = report.gain_ci
        con.print(f"AR fused vs {report.models[0]['name']}: {ci['gain_pct']:+.3f}% token perplexity, "
                  f"{100 * ci['level']:.0f}% interval [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}]% "
                  f"(paired bootstrap over {ci['blocks']:,} blocks of {ci['block_tokens']:,} tokens)")
    if report.cosine:
        c, ci = report.cosine, report.cosine["gain_ci"]
        con.print(f"cosine rule: p = {c['power']:.6g} ({c['power_source']}; the {c['embeddings']} model's token embeddings)")
        con.print(f"AR cosine vs {report.models[0]['name']}: {ci['gain_pct']:+.3f}% token perplexity, "
                  f"{100 * ci['level']:.0f}% interval [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}]%")
    if report.domain_k:
        con.print(f"improvement domain on {data['name']}: k > {report.domain_k[0]:.4g} (w > {report.domain_w[0]:.6f}); "
                  f"k* = {_fmt_k(report.k_star)} there")
    elif len(report.models) == 2:
        con.print(f"improvement domain on {data['name']}: empty (no weight makes the fused model beat the LLM)")
    for n in report.notes:
        con.print(f"note: {n}")
