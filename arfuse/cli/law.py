"""`arfuse law --family A,B,C --data D`: the AR law over every pair of a model family."""
from __future__ import annotations

import json


def register(sub) -> None:
    from arfuse.cli.common import add_model_options, add_score_options

    p = sub.add_parser("law", help="AR-law analysis over every pair of a model family",
                       description="Score each model once (cached), then for every pair (the larger as LLM): "
                                   "the NLL-optimal k*, the improvement domain, the gain at k*, the exact accuracy "
                                   "curve with the three sets and flips, the mainstay-deviation statistic; and the "
                                   "log-log fit of k* against the parameter ratio r. Writes Markdown/CSV/JSON tables "
                                   "and PNG plots.")
    p.add_argument("--family", required=True, help="comma-separated models sharing one tokenizer (at least 2)")
    p.add_argument("--data", required=True, help="data to analyse on: a name or a file, optionally sliced [a:b]")
    p.add_argument("--out", default="law-out", help="folder for law.md, law.csv, law.json and the plots (default law-out)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--mainstay-top", type=int, default=10, help="most frequent target classes to examine (default 10)")
    add_model_options(p)
    add_score_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse.cli.common import score_config
    from arfuse.errors import ArfuseError
    from arfuse.search.law import analyse_family, to_markdown, write_plots, write_tables
    from arfuse.tasks.law import family_members

    specs = [s.strip() for s in args.family.split(",") if s.strip()]
    if len(specs) < 2:
        raise ArfuseError(f"--family needs at least 2 models separated by commas, got {len(specs)}: {args.family!r}")
    members, data = family_members(specs, args.data, score_config(args, specs), device=args.device, dtype=args.dtype,
                                   batch_size=args.batch_size, use_cache=not args.no_cache, progress=not args.quiet)
    rep = analyse_family(members, data, mainstay_top=args.mainstay_top)
    rep.data["command"] = "arfuse law --family " + args.family + " --data " + args.data
    paths = write_tables(rep, args.out)
    if not args.no_plots:
        paths += write_plots(rep, args.out)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        unit = data.get("unit", "token")
        print(f"{data['name']}: {data.get('tokens', data.get('n', 0)):,} {unit}s, {data.get('windowing', '')}")
        print(to_markdown(rep))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
