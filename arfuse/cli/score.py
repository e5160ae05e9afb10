"""`arfuse score MODEL DATA`: fill the score cache."""
from __future__ import annotations

import json

from arfuse.cli.common import (add_backend_option, add_model_options, add_scale_options, add_score_options,
                               backend_spec, score_config, workers_from_args)


def register(sub) -> None:
    p = sub.add_parser("score", help="score a data set with one model into the cache",
                       description="Score DATA with MODEL once into cached per-token records.")
    p.add_argument("model", help="a model name (smollm2-135m, stories260k), a .gguf file, a llama2.c .bin, a folder or a hub id")
    p.add_argument("data", help="a data set name (wikitext2-raw-test, ptb-test, kjv, ...) or a file, optionally sliced: kjv[90%%:95%%]")
    add_model_options(p)
    add_score_options(p)
    add_backend_option(p)
    add_scale_options(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse.adapters import load_model
    from arfuse.scoring.scorer import score
    from arfuse.data.text import load_dataset
    from arfuse.tasks.metrics import perplexity_metrics

    from arfuse.scoring.shards import scale_out

    workers = workers_from_args(args)   # checked before any model loads
    data = load_dataset(args.data)
    model = load_model(backend_spec(args, args.model), device=args.device, dtype=args.dtype)
    cfg = score_config(args, [model])
    with scale_out(workers):
        rec = score(model, data, cfg, batch_size=args.batch_size, use_cache=not args.no_cache,
                    progress=not args.quiet)
    m = perplexity_metrics(rec.logp, rec.nbytes, rec.nchars, rec.nwords)
    out = {"model": model.info.name, "num_parameters": model.num_parameters, "data": data.name,
           "source": data.source, "windowing": cfg.describe(), "bos": rec.meta["bos"], "cache_key": rec.meta["cache_key"], **m}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{model.info.name} ({model.num_parameters:,} parameters) on {data.name}: {cfg.describe()}, "
              f"BOS {'on' if rec.meta['bos'] else 'off'}")
        print(f"  {m['tokens']:,} tokens scored: token perplexity {m['token_ppl']:.4f}, word perplexity "
              f"{m['word_ppl']:.4f}, {m['bits_per_byte']:.4f} bits/byte")
        print(f"  cache key {rec.meta['cache_key']}")
    return 0
