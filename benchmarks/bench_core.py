"""Core costs of arfuse, measured side by side in one run.

(a) a fused eval of two models costs at most 1.05x the sum of their single-model scoring times
(b) with the cache warm, eval at a new weight is at least 100x faster than rescoring
(c) the exact weight search over 1,000,000 cached positions takes under 1 s
(d) peak memory while scoring is the same at two corpus lengths (one 4x the other) within 10%
    (the peak above the loaded model's resident memory, each length in a fresh process)

Usage: python benchmarks/bench_core.py [--large smollm2-135m] [--small demo] [--data kjv --offset 3900000 --chars 20000]
`--small demo` is the King James SLM that `make demo` trains and caches.
Prints a table and writes benchmarks/results/bench_core.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _small_spec(spec: str) -> str:
    if spec != "demo":
        return spec
    from arfuse.train import ensure_demo_slm

    return str(ensure_demo_slm())


def _peak_rss_of_scoring(model: str, data: str, window: int, stride: int) -> tuple[float, float, int]:
    """Resident memory (MiB) of a fresh process after loading the model and data, and its peak while scoring.

    The kernel's high-water mark (VmHWM) is reset after loading (/proc/self/clear_refs), so the
    peak is that of scoring alone, not of loading the weights.
    """
    code = f"""
import json
from arfuse.adapters import load_model
from arfuse.scoring.scorer import ScoreConfig, score
from arfuse.data.text import load_dataset
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
m = load_model({model!r}); d = load_dataset({data!r}); m.encode(d.documents[0][:1000])
open('/proc/self/clear_refs', 'w').write('5')   # reset the peak to the current RSS
loaded = status('VmRSS')
rec = score(m, d, ScoreConfig(window={window}, stride={stride}, bos="never"), use_cache=False, progress=False)
print(json.dumps([loaded, status('VmHWM'), len(rec)]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, peak, n = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded, peak, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--small", default="demo")
    ap.add_argument("--data", default="kjv", help="default: held-out King James text, where the SLM helps, so the "
                    "search in (c) has an interior optimum")
    ap.add_argument("--offset", type=int, default=3_900_000, help="first character (kjv: inside the held-out 10%%)")
    ap.add_argument("--chars", type=int, default=20000, help="characters scored in (a), (b), and the short run of (d)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_core.json"))
    args = ap.parse_args()

    from arfuse.adapters import load_model
    from arfuse.scoring.scorer import ScoreConfig, score
    from arfuse.search import improvement_domain, optimal_weight
    from arfuse.data.text import load_dataset
    from arfuse.tasks import EvalConfig, evaluate

    small = _small_spec(args.small)
    data = f"{args.data}[{args.offset}:{args.offset + args.chars}]"
    cfg = ScoreConfig(window=args.window, stride=args.stride, bos="never")
    # load both models once (loading is not scoring; converted GGUF folders stay in the user's cache)
    ds = load_dataset(data)
    models = [load_model(args.large), load_model(small)]
    for m in models:  # one warm-up forward each
        m.logprobs(torch.tensor([m.encode("a warm-up pass").ids]))
    user_cache = os.environ.get("ARFUSE_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ARFUSE_CACHE"] = cache  # a cold score cache for this run only

        # (a) single-model scoring times, then a cold fused eval of the same two models
        t_single = []
        for m in models:
            t0 = time.perf_counter()
            score(m, ds, cfg, use_cache=False, progress=False)
            t_single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(EvalConfig(large=args.large, smalls=[small], data=data, score=cfg), progress=False)
        t_fused_cold = time.perf_counter() - t0
        ratio_a = t_fused_cold / sum(t_single)

        # (b) warm cache: eval at a new weight against rescoring both models
        t0 = time.perf_counter()
        rep = evaluate(EvalConfig(large=args.large, smalls=[small], data=data, score=cfg, weights=[0.8, 0.2]),
                       progress=False)
        t_warm = time.perf_counter() - t0
        speedup_b = sum(t_single) / t_warm

        # (c) exact search over 1,000,000 positions: the cached arrays of (a), tiled
        recs = [score(m, ds, cfg, progress=False) for m in models]
        reps = -(-1_000_000 // len(recs[0]))
        a = np.tile(recs[0].logp, reps)[:1_000_000]
        b = np.tile(recs[1].logp, reps)[:1_000_000]
        t0 = time.perf_counter()
        opt = optimal_weight(a, b)
        dom = improvement_domain(a, b, opt)
        t_search = time.perf_counter() - t0

    if user_cache is None:
        os.environ.pop("ARFUSE_CACHE")
    else:
        os.environ["ARFUSE_CACHE"] = user_cache
    # (d) peak memory of scoring N and 4N characters, each in a fresh process, no cache
    mem = {}
    for n in (args.chars, 4 * args.chars):
        mem[n] = _peak_rss_of_scoring(args.large, f"{args.data}[{args.offset}:{args.offset + n}]", args.window, args.stride)
    (b1, a1, n1), (b4, a4, n4) = mem[args.chars], mem[4 * args.chars]
    ratio_d = (a4 - b4) / (a1 - b1)   # what scoring adds on top of the loaded model, long / short

    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "large": models[0].info.name, "small": models[1].info.name,
        "params": [m.num_parameters for m in models], "data": data, "tokens": len(recs[0]),
        "windowing": cfg.describe(),
        "a": {"single_s": t_single, "fused_cold_s": t_fused_cold, "ratio": ratio_a, "goal": "<= 1.05", "pass": ratio_a <= 1.05},
        "b": {"rescore_s": sum(t_single), "warm_eval_s": t_warm, "speedup": speedup_b, "goal": ">= 100", "pass": speedup_b >= 100},
        "c": {"positions": 1_000_000, "search_s": t_search, "w": opt.w, "iterations": opt.iterations,
              "domain_w": dom, "goal": "< 1 s", "pass": t_search < 1.0},
        "d": {"short": {"chars": args.chars, "tokens": n1, "rss_loaded_mib": b1, "rss_peak_mib": a1},
              "long": {"chars": 4 * args.chars, "tokens": n4, "rss_loaded_mib": b4, "rss_peak_mib": a4},
              "ratio": ratio_d, "ratio_whole_process": a4 / a1, "goal": "within 10%", "pass": abs(ratio_d - 1) <= 0.10},
        "fused_at_w0.8_token_ppl": rep.rows[-1].metrics["token_ppl"],
    }
    print(f"bench_core: {results['large']} + {results['small']} on {data} ({results['tokens']:,} tokens; {cfg.describe()})")
    print(f"(a) scoring alone {t_single[0]:.2f} s + {t_single[1]:.2f} s; fused eval, cold cache {t_fused_cold:.2f} s "
          f"-> {ratio_a:.3f}x the sum (goal <= 1.05): {'PASS' if results['a']['pass'] else 'FAIL'}")
    print(f"(b) rescoring both {sum(t_single):.2f} s; eval at a new weight, warm cache {t_warm * 1000:.1f} ms "
          f"-> {speedup_b:.0f}x faster (goal >= 100): {'PASS' if results['b']['pass'] else 'FAIL'}")
    print(f"(c) exact search over 1,000,000 positions: {t_search * 1000:.1f} ms ({opt.iterations} Newton steps, "
          f"w = {opt.w:.6f}) (goal < 1 s): {'PASS' if results['c']['pass'] else 'FAIL'}")
    print(f"(d) model loaded {b1:.0f} MiB; peak while scoring {n1:,} tokens {a1:.0f} MiB (+{a1 - b1:.0f}), "
          f"{n4:,} tokens {a4:.0f} MiB (+{a4 - b4:.0f}) -> scoring's own peak {ratio_d:.3f}x; whole process {a4 / a1:.3f}x "
          f"(goal within 10%): {'PASS' if results['d']['pass'] else 'FAIL'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
