"""Scale-out on Ray (issue 20): what sharding the scoring and placing models in actors cost and gain.

One run, one local Ray cluster of --cpus CPUs (started here; its start-up time is reported apart):

1. Scoring tokens/s of --model on the first --tokens tokens of --data (WikiText-2 raw test by
   default), sliding windows of --window tokens with stride --window/2, top-32, batch 4, no cache:
     - no Ray, this process with 1 torch thread (what one worker computes with), and with --cpus threads
     - Ray, 1 worker of 1 CPU; Ray, 2 workers of 1 CPU each (``arfuse.scoring.shards``)
   The no-Ray runs are timed after an untimed warm-up on an eighth of the text. Each Ray run is timed
   cold (the pool's actors start and load the model inside the timed call) and warm (the same pool,
   kept by ``scale_out``, scores again). The records of every run are checked
   bit-identical to the first. Ray's overhead for one worker = warm 1-worker time / no-Ray 1-thread
   time - 1 (goal: under 10%).
2. Generation at batch 1, greedy, --new-tokens tokens per prompt (EOS suppressed), fused
   P = w p_LLM + (1 - w) p_SLM with --slm at --weight (the model itself when no --slm exists), plain:
     - in this process, 1 torch thread (each model's actor has 1 CPU)
     - each model in its own Ray actor (``placement="actors"``)
   one warm-up prompt each, then --prompts prompts of --data, the two methods interleaved prompt by
   prompt; ms per generated token, and the tokens checked equal. Actor cost = actors / in-process - 1
   (goal: under 15%).

Usage (full run, on a quiet 2-core machine):
    python benchmarks/bench_scaleout.py --json benchmarks/results/scaleout.json
Small check that it runs (a minute or two):
    python benchmarks/bench_scaleout.py --tokens 3000 --prompts 2 --new-tokens 16 --json /tmp/scaleout.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arfuse.adapters import load_model  # noqa: E402
from arfuse.data.text import Dataset, load_dataset  # noqa: E402
from arfuse.scoring.records import FIELDS  # noqa: E402
from arfuse.scoring.scorer import ScoreConfig, score  # noqa: E402
from arfuse.scoring.shards import Workers, scale_out  # noqa: E402


def first_tokens(model, data: Dataset, n: int) -> Dataset:
    """The first ``n`` tokens of ``data``'s text (documents joined), as a one-document data set."""
    text = "\n".join(data.documents)
    enc = model.encode(text[: 12 * n])   # plenty of characters for n tokens
    if len(enc.ids) < n:
        enc = model.encode(text)
    if len(enc.ids) < n:
        raise SystemExit(f"{data.name} has only {len(enc.ids):,} tokens, fewer than --tokens {n:,}")
    cut = text[: enc.ends[n - 1]]
    return Dataset(f"{data.name}[first {n:,} tokens]", [cut], source=data.source)


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_scoring(args, model, data: Dataset, cfg: ScoreConfig) -> dict:
    runs: dict[str, dict] = {}
    ref = None

    def record(name: str, rec, seconds: float, **extra):
        nonlocal ref
        if ref is None:
            ref = rec
        runs[name] = {"seconds": round(seconds, 3), "tokens": len(rec), "tokens_per_s": round(len(rec) / seconds, 1),
                      "bit_identical": same(rec, ref), **extra}
        print(f"  {name:<34} {len(rec) / seconds:9.1f} tok/s  ({seconds:.2f} s)  identical: {same(rec, ref)}",
              flush=True)

    n0 = torch.get_num_threads()
    warm = Dataset(data.name + " (warm-up)", [data.documents[0][: len(data.documents[0]) // 8]], source=data.source)
    for threads in (1, args.cpus):
        torch.set_num_threads(threads)
        score(model, warm, cfg, batch_size=4, use_cache=False, progress=False)   # one-time costs, untimed
        rec, s = timed(lambda: score(model, data, cfg, batch_size=4, use_cache=False, progress=False))
        record(f"no Ray, {threads} thread{'s' if threads > 1 else ''}", rec, s, threads=threads)
    torch.set_num_threads(n0)
    for n in (1, 2):
        w = Workers(n, num_cpus=1)
        with scale_out(w):
            rec, s = timed(lambda: score(model, data, cfg, batch_size=4, use_cache=False, progress=False))
            record(f"Ray, {n} worker{'s' if n > 1 else ''} x 1 CPU, cold", rec, s, workers=n, pieces=w.report.pieces)
            rec, s = timed(lambda: score(model, data, cfg, batch_size=4, use_cache=False, progress=False))
            record(f"Ray, {n} worker{'s' if n > 1 else ''} x 1 CPU, warm", rec, s, workers=n,
                   pieces=w.report.pieces, retries=w.report.retries)
    base = runs["no Ray, 1 thread"]["seconds"]
    summary = {
        "ray_overhead_1_worker_warm": round(runs["Ray, 1 worker x 1 CPU, warm"]["seconds"] / base - 1, 4),
        "ray_overhead_1_worker_cold": round(runs["Ray, 1 worker x 1 CPU, cold"]["seconds"] / base - 1, 4),
        "speedup_2_workers_warm": round(base / runs["Ray, 2 workers x 1 CPU, warm"]["seconds"], 3),
        "speedup_2_workers_vs_no_ray_all_threads": round(
            runs[f"no Ray, {args.cpus} thread{'s' if args.cpus > 1 else ''}"]["seconds"]
            / runs["Ray, 2 workers x 1 CPU, warm"]["seconds"], 3),
    }
    return {"runs": runs, **summary}


def prompts_of(data: Dataset, n: int, chars: int) -> list[str]:
    text = " ".join(" ".join(data.documents).split())
    step = max(chars, (len(text) - chars) // (n + 1))   # n + 1 prompts (the first is the warm-up), all inside
    out = [text[i * step: i * step + chars] for i in range(n + 1)]
    if len(out[-1]) < chars:
        raise SystemExit(f"{data.name} holds {len(text):,} characters: too few for {n + 1} prompts of {chars}")
    return out


def bench_generation(args, data: Dataset) -> dict:
    from arfuse.adapters.actor import close_actors
    from arfuse.generation.api import generate

    slm = args.slm if args.slm and Path(args.slm).exists() else args.model
    prompts = prompts_of(data, args.prompts, args.prompt_chars)
    kw = dict(large=args.model, small=slm, weight=args.weight, max_new_tokens=args.new_tokens, stop_at_eos=False)
    torch.set_num_threads(1)
    times = {"process": 0.0, "actors": 0.0}
    tokens = {"process": 0, "actors": 0}
    equal = True
    for i, p in enumerate(prompts):
        outs = {}
        for placement in ("process", "actors"):
            r, s = timed(lambda: generate(p, placement=placement, **kw))
            outs[placement] = r.token_ids
            if i:   # prompt 0 warms up (loads the models, starts the actors)
                times[placement] += s
                tokens[placement] += len(r.token_ids)
        equal &= outs["process"] == outs["actors"]
    close_actors()
    ms = {k: 1000 * times[k] / max(tokens[k], 1) for k in times}
    for k in ms:
        print(f"  {k:<10} {ms[k]:8.2f} ms/token  ({tokens[k]} tokens)", flush=True)
    return {"slm": slm, "weight": args.weight, "prompts": args.prompts, "new_tokens": args.new_tokens,
            "ms_per_token": {k: round(v, 3) for k, v in ms.items()}, "tokens": tokens, "tokens_equal": equal,
            "actor_cost": round(ms["actors"] / ms["process"] - 1, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wikitext2-raw-test")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default: 2)")
    ap.add_argument("--slm", default="runs/kjv-slm", help="the small model of the generation part (default: "
                                                          "runs/kjv-slm; the model itself when absent)")
    ap.add_argument("--weight", type=float, default=0.9)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-chars", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from arfuse.adapters.actor import connect

    _, ray_start = timed(lambda: connect(None, "the benchmark", num_cpus=args.cpus))   # as `arfuse` starts one
    print(f"Ray {ray.__version__}: local cluster of {args.cpus} CPUs started in {ray_start:.1f} s", flush=True)
    model = load_model(args.model)
    data = first_tokens(model, load_dataset(args.data), args.tokens)
    cfg = ScoreConfig(window=args.window, stride=args.window // 2, topk=32)
    print(f"scoring {model.info.name} ({model.num_parameters:,} parameters) on {data.name}: {cfg.describe()}, "
          "top-32, batch 4, no cache", flush=True)
    out = {"model": model.info.name, "data": data.name, "data_source": data.source, "windowing": cfg.describe(),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "ray": ray.__version__, "loadavg_start": os.getloadavg()},
           "ray_start_seconds": round(ray_start, 2), "scoring": bench_scoring(args, model, data, cfg)}
    s = out["scoring"]
    print(f"Ray overhead, 1 worker (warm): {100 * s['ray_overhead_1_worker_warm']:+.1f}% (goal < 10%); "
          f"2 workers: {s['speedup_2_workers_warm']:.2f}x the 1-thread process", flush=True)
    if not args.skip_generate:
        print(f"generation, batch 1, greedy, {args.new_tokens} new tokens, {args.prompts} prompts of {args.data}:",
              flush=True)
        g = out["generation"] = bench_generation(args, load_dataset(args.data))
        print(f"actor placement costs {100 * g['actor_cost']:+.1f}% per token (goal < 15%); tokens equal: "
              f"{g['tokens_equal']}", flush=True)
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
