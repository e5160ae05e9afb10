"""Quality and speed of every generation strategy, by continuation of held-out text (issue 17, item 3).

One run, the same passages and models: --passages passages evenly spaced through --data (the KJV
SLMs' held-out part), each a prompt of about --prompt-chars characters cut at a word boundary
(the prompts of benchmarks/bench_generate.py and bench_union.py); each strategy continues every
prompt greedily by --new-tokens tokens (EOS ignored, so every strategy writes exactly that many of
the LLM's tokens); chrF (sacrebleu, chrF with character 6-grams, beta 2) against the true
continuation: the text of the first --new-tokens tokens, in the LLM's tokenization, that follow
the prompt in the data. No judge model. The sanity column: the LLM's own NLL of the true
continuations given the prompts (teacher-forced), which no strategy can change.

Strategies:
  llm_alone          SmolLM2-135M alone (arfuse's decoder, KV cache)
  linear             the linear AR rule, P = w p_LLM + (1 - w) p_SLM, with the same-tokenizer KJV SLM
                     (runs/kjv-slm), token level; w from --union-json (bench_union.py's run: chosen on
                     kjv[90%:95%]), --linear-w, or else fitted on --valid here
  union              the union rule with the GPT-2-tokenizer KJV SLM (runs/kjv-slm-gpt2); w and k
                     from --union-json, --union-w/--union-k, or else fitted on --valid here
  specfuse           segment-level ensembling (SpecFuse) of the LLM and the GPT-2-tokenizer SLM:
                     KV caches kept across rounds, each model's candidate scored in one pass
  specfuse_reencode  the same, as the released SpecFuse code runs it: every round each model
                     re-reads the prompt and the whole text before drafting and again before
                     verifying (batch 1 only unless --reencode-batch8: it is the slow baseline)
  specfuse3          SpecFuse with three models: the LLM and both SLMs

Speed: tokens/s (the LLM's tokens of the texts) at batch 1 on the first --b1-passages passages
(to bound the run's time) and at batch 8 on all of them, each strategy after a warm-up call, as a
ratio to llm_alone measured in the same run. chrF is reported on the batch-8 texts (all passages)
and, for every strategy alike, on the batch-1 texts of the first --b1-passages passages. SpecFuse's
rows add the share of segments each model's draft won and the rounds after which models exited
(--patience lost rounds in a row; 0: no exit).

Usage: python benchmarks/bench_strategies.py --threads 2 --json benchmarks/results/strategies.json
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

STRATEGIES = ("llm_alone", "linear", "union", "specfuse", "specfuse_reencode", "specfuse3")


# ---- weights ----------------------------------------------------------------------------------
def resolve_weights(args, llm, same, cross) -> dict:
    """The linear rule's w and the union rule's (w, k): flags, else --union-json, else fitted on --valid."""
    prev = None
    if args.union_json and Path(args.union_json).exists():
        prev = json.loads(Path(args.union_json).read_text()).get("bits_per_byte") or None
    out: dict = {}
    if args.linear_w is not None:
        out["linear"] = {"w": args.linear_w, "source": "given (--linear-w)"}
    elif prev and any("linear rule" in r["method"] for r in prev):
        r = next(r for r in prev if "linear rule" in r["method"])
        out["linear"] = {"w": r["w"], "source": f"{args.union_json} (NLL-optimal on its validation data)"}
    else:
        out["linear"] = fit_linear(llm, same, args.valid, args.window)
    if args.union_w is not None and args.union_k is not None:
        out["union"] = {"w": args.union_w, "k": args.union_k, "source": "given (--union-w, --union-k)"}
    elif prev and any("union rule" in r["method"] for r in prev):
        r = next(r for r in prev if "union rule" in r["method"])
        out["union"] = {"w": args.union_w if args.union_w is not None else r["w"],
                        "k": args.union_k if args.union_k is not None else r["k"],
                        "source": f"{args.union_json} (k on a grid, w NLL-optimal, on its validation data)"}
    else:
        out["union"] = fit_union_rule(llm, cross, args.valid, args.window, args.ks, args.union_k, args.union_w)
    return out


def fit_linear(llm, slm, valid: str, window: int) -> dict:
    from arfuse.data.text import load_dataset
    from arfuse.scoring.scorer import ScoreConfig, score
    from arfuse.search.weights import optimal_weight

    t0 = time.perf_counter()
    cfg = ScoreConfig(window=window, convention="blocks", bos="never")
    ds = load_dataset(valid)
    rl, rs = (score(m, ds, cfg) for m in (llm, slm))
    w = optimal_weight(rl.logp, rs.logp).w
    print(f"  linear rule: w = {w:.4f}, NLL-optimal on {valid} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"w": w, "source": f"NLL-optimal on {valid} (fitted in this run)"}


def fit_union_rule(llm, slm, valid: str, window: int, ks: str, k: int | None, w: float | None) -> dict:
    from arfuse.data.text import load_dataset
    from arfuse.tasks.union_eval import fit_union, score_union

    t0 = time.perf_counter()
    grid = (k,) if k is not None else tuple(int(x) for x in ks.split(","))
    sv = score_union(llm, slm, load_dataset(valid), ks=grid, window=window)
    best = fit_union(sv, k=k, w=w)["best"]
    print(f"  union rule: k = {best['k']}, w = {best['w']:.4f}, on {valid} ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return {"w": best["w"], "k": best["k"], "source": f"k on {list(grid)}, w NLL-optimal, on {valid} (fitted in this run)"}


# ---- strategies -------------------------------------------------------------------------------
def strategies(args, llm, same, cross, weights) -> dict:
    """name -> (description, models, fn(prompts, n_new) -> list of GenerationResult)."""
    from arfuse.generation.api import generate
    from arfuse.generation.config import GenerationConfig
    from arfuse.generation.segment import SegmentDecoder

    seg = {"segment_len": args.segment_len, "scorer": args.scorer, "hedge_rate": args.hedge_rate,
           "patience": args.patience or None, "exit": args.exit}

    def token(small=None, **kw):
        return lambda ps, n: generate(ps, large=llm, small=small, max_new_tokens=n, stop_at_eos=False, **kw)

    def segments(models, reencode=False):
        def run(ps, n):
            dec = SegmentDecoder(models, GenerationConfig(max_new_tokens=n, stop_at_eos=False), reencode=reencode,
                                 **seg)
            for _ in dec.run(ps):
                pass
            for r in dec.results:
                r.stats = dec.stats
            return dec.results
        return run

    wl, wu = weights["linear"], weights["union"]
    names = lambda ms: [m.info.name for m in ms]  # noqa: E731
    return {
        "llm_alone": ("the LLM alone", names([llm]), token()),
        "linear": (f"linear AR rule, w = {wl['w']:.4f}, same-tokenizer SLM", names([llm, same]),
                   token(same, weight=wl["w"])),
        "union": (f"union rule, k = {wu['k']}, w = {wu['w']:.4f}, GPT-2-tokenizer SLM", names([llm, cross]),
                  token(cross, weight=wu["w"], rule="union", topk=wu["k"])),
        "specfuse": ("SpecFuse, LLM + GPT-2-tokenizer SLM", names([llm, cross]), segments([llm, cross])),
        "specfuse_reencode": ("SpecFuse as released (re-encodes every round)", names([llm, cross]),
                              segments([llm, cross], reencode=True)),
        "specfuse3": ("SpecFuse, LLM + both SLMs", names([llm, same, cross]), segments([llm, same, cross])),
    }


def paired_interval(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over passages and its 95% percentile bootstrap interval (passages resampled)."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fmt(x, spec=".1f", none="–") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--slm-same", default="runs/kjv-slm", help="SLM on the LLM's tokenizer")
    ap.add_argument("--slm-cross", default="runs/kjv-slm-gpt2", help="SLM on another tokenizer (GPT-2's)")
    ap.add_argument("--data", default="kjv[95%:]", help="held-out text the passages come from")
    ap.add_argument("--valid", default="kjv[90%:95%]", help="where weights are fitted when not given or read")
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=350)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--b1-passages", type=int, default=16, help="passages timed at batch 1 (the first ones)")
    ap.add_argument("--batch", type=int, default=8, help="the larger batch size")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="a comma-separated subset of "
                    + ", ".join(STRATEGIES))
    ap.add_argument("--reencode-batch8", action="store_true", help="also time specfuse_reencode at --batch")
    ap.add_argument("--union-json", default="benchmarks/results/union.json",
                    help="bench_union.py's results: the linear w and the union rule's w and k (chosen on kjv[90%%:95%%])")
    ap.add_argument("--linear-w", type=float, help="the linear rule's LLM weight (overrides --union-json)")
    ap.add_argument("--union-w", type=float, help="the union rule's LLM weight (overrides --union-json)")
    ap.add_argument("--union-k", type=int, help="the union rule's top-k (overrides --union-json)")
    ap.add_argument("--window", type=int, default=1024, help="scoring window when weights are fitted here")
    ap.add_argument("--ks", default="1,2,5,10,20,50", help="union rule: k grid when fitted here")
    ap.add_argument("--segment-len", type=int, default=10)
    ap.add_argument("--scorer", default="logprob", choices=("logprob", "byte", "logit"))
    ap.add_argument("--hedge-rate", type=float, default=0.5)
    ap.add_argument("--patience", type=int, default=3, help="SpecFuse: a model exits after losing this many rounds "
                    "in a row (0: never)")
    ap.add_argument("--exit", default="draft", choices=("draft", "all"), help="SpecFuse: an exited model stops "
                    "drafting but verifies (draft) or leaves (all)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", help="write every number (and the texts) here")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STRATEGIES]
    if bad:
        ap.error(f"unknown strategies {bad}: choose from {', '.join(STRATEGIES)}")
    if "llm_alone" not in chosen:
        chosen.insert(0, "llm_alone")   # every ratio is to it
    if args.threads:
        torch.set_num_threads(args.threads)
    for p in (args.slm_same, args.slm_cross):
        if p.startswith("runs/") and not Path(p).exists():
            ap.error(f"{p} does not exist: train it (`arfuse train --config configs/{Path(p).name}.toml --out {p}`)")

    import transformers

    from arfuse.adapters import load_model
    from arfuse.tasks.continuation import (chrf, continuation_nll, continuation_passages, run_continuations,
                                           segment_summary)

    log = lambda *a: print(*a, flush=True)  # noqa: E731
    llm, same, cross = load_model(args.large), load_model(args.slm_same), load_model(args.slm_cross)
    passages = continuation_passages(args.data, args.passages, args.prompt_chars, model=llm,
                                     cont_tokens=args.new_tokens)
    prompts, refs = [p.prompt for p in passages], [p.continuation for p in passages]
    nb1 = min(args.b1_passages, len(prompts))
    log(f"{len(passages)} passages of {args.data} ({args.prompt_chars} characters of prompt, cut at a word boundary); "
        f"{args.new_tokens} new tokens each, greedy, EOS ignored; reference: the true next {args.new_tokens} tokens "
        f"of {llm.info.name} (mean {np.mean([len(r) for r in refs]):.0f} characters); threads {torch.get_num_threads()}")
    weights = resolve_weights(args, llm, same, cross)
    log(f"weights: linear w = {weights['linear']['w']:.4f} ({weights['linear']['source']}); union k = "
        f"{weights['union']['k']}, w = {weights['union']['w']:.4f} ({weights['union']['source']})")

    t0 = time.perf_counter()
    nll = {m.info.name: continuation_nll(m, prompts, refs) for m in (llm, same, cross)}
    log(f"NLL of the true continuations (teacher-forced, {time.perf_counter() - t0:.1f} s): "
        + "; ".join(f"{n} {v.bits_per_byte:.4f} bits/byte, {v.nats_per_token:.3f} nats/token" for n, v in nll.items()))
    sanity = nll[llm.info.name]

    strat = {k: v for k, v in strategies(args, llm, same, cross, weights).items() if k in chosen}
    log("warm-up: one short call per strategy")
    for name, (_, _, fn) in strat.items():
        fn(prompts[:1], 4)

    runs: dict[str, dict[int, object]] = {name: {} for name in strat}
    for batch in (1, args.batch):
        ps = prompts[:nb1] if batch == 1 else prompts
        for name, (_, _, fn) in strat.items():
            if batch != 1 and name == "specfuse_reencode" and not args.reencode_batch8:
                continue
            run = run_continuations(lambda p, fn=fn: fn(p, args.new_tokens), ps, batch)
            runs[name][batch] = run
            log(f"  batch {batch}, {len(ps)} passages: {name:<18} {run.tok_s:7.1f} tok/s ({run.seconds:.1f} s)")

    # ---- quality and the table ----
    base_b1, base_bk = runs["llm_alone"][1], runs["llm_alone"].get(args.batch)
    report: dict = {
        "command": "python benchmarks/bench_strategies.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "data": args.data, "passages": len(passages), "prompt_chars": args.prompt_chars, "new_tokens": args.new_tokens,
        "b1_passages": nb1, "batch": args.batch, "decoding": "greedy, EOS ignored",
        "chrf": "sacrebleu CHRF() (chrF: character 6-grams, no word n-grams, beta 2)",
        "reference": f"the text of the true next {args.new_tokens} tokens of {llm.info.name}",
        "weights": weights, "segment_options": {"segment_len": args.segment_len, "scorer": args.scorer,
                                                "hedge_rate": args.hedge_rate, "patience": args.patience or None,
                                                "exit": args.exit},
        "nll_true_continuation": {n: v.as_dict() for n, v in nll.items()},
        "prompts": prompts, "references": refs, "strategies": {},
    }
    chrf_b1_base = chrf(base_b1.texts, refs[:nb1])
    chrf_all_base = chrf(base_bk.texts, refs) if base_bk else None
    rows = []
    for name, (desc, models, _) in strat.items():
        r1, rk = runs[name][1], runs[name].get(args.batch)
        c1 = chrf(r1.texts, refs[:nb1])
        ck = chrf(rk.texts, refs) if rk else None
        d1 = paired_interval(chrf_b1_base.per_passage, c1.per_passage)
        dk = paired_interval(chrf_all_base.per_passage, ck.per_passage) if ck and chrf_all_base else None
        entry = {
            "description": desc, "models": models,
            "chrf": ck.corpus if ck else None, "chrf_mean": ck.mean if ck else None,
            "chrf_per_passage": ck.per_passage if ck else None,
            "chrf_delta_vs_llm_alone": dk, "chrf_b1": c1.corpus, "chrf_b1_mean": c1.mean,
            "chrf_b1_per_passage": c1.per_passage, "chrf_b1_delta_vs_llm_alone": d1,
            "runs": {b: {**r.as_dict(), "vs_llm_alone": r.tok_s / runs["llm_alone"][b].tok_s} for b, r in runs[name].items()},
            "texts": (rk or r1).texts,
            "b1_texts_equal_batch_texts": (sum(a == b for a, b in zip(r1.texts, rk.texts)) if rk else None),
        }
        if name.startswith("specfuse"):
            entry["segments"] = {b: segment_summary(r.stats) for b, r in runs[name].items()}
        report["strategies"][name] = entry
        rows.append((name, entry))

    log("")
    log(f"### Continuation of {args.data}: {len(passages)} passages, {args.new_tokens} new tokens, greedy "
        f"(torch threads: {torch.get_num_threads()})")
    log("")
    log(f"chrF: on all {len(passages)} passages (batch-{args.batch} texts) and on the first {nb1} (batch-1 texts); "
        f"Δ: mean per-passage chrF difference to llm_alone with a 95% bootstrap interval. tok/s at batch 1: the "
        f"first {nb1} passages; at batch {args.batch}: all {len(passages)}. NLL: {llm.info.name}'s of the true "
        "continuations, bits/byte (the same for every row by construction: a sanity column).")
    log("")
    log(f"| strategy | chrF ({len(passages)}) | mean | Δ vs alone [95%] | chrF b1 ({nb1}) | tok/s b1 | × alone "
        f"| tok/s b{args.batch} | × alone | LLM NLL (bits/byte) |")
    log("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, e in rows:
        r = e["runs"]
        rk = r.get(args.batch)
        d = e["chrf_delta_vs_llm_alone"]
        log(f"| {name} | {fmt(e['chrf'])} | {fmt(e['chrf_mean'])} | "
            + (f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]" if d else "–")
            + f" | {e['chrf_b1']:.1f} | {r[1]['tok_s']:.1f} | {r[1]['vs_llm_alone']:.2f} | "
            + (f"{rk['tok_s']:.1f} | {rk['vs_llm_alone']:.2f}" if rk else "– (not run) | –")
            + f" | {sanity.bits_per_byte:.4f} |")
    seg_rows = [(n, e) for n, e in rows if "segments" in e]
    if seg_rows:
        log("")
        log("SpecFuse segments (rounds with a winner; 'won': the winning text was the model's draft, alone or with "
            "others that drafted the same; exits: prompts where the model stopped drafting, after which round)")
        log("")
        log("| strategy | batch | rounds | tokens/round | all drafters agreed | model | won | won alone | exited "
            "| exit round (median, min-max) |")
        log("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
        for name, e in seg_rows:
            for b, s in e["segments"].items():
                for mname, ms in s["models"].items():
                    ex = (f"{ms['exit_round_median']:g} ({ms['exit_round_min']}-{ms['exit_round_max']})"
                          if ms["exited_prompts"] else "never")
                    log(f"| {name} | {b} | {s['rounds']} | {s['tokens_per_round']:.1f} | "
                        f"{100 * s['all_drafters_agreed']:.0f}% | {mname} | {100 * ms['won']:.0f}% | "
                        f"{100 * ms['won_alone']:.0f}% | {ms['exited_prompts']}/{s['prompts']} | {ex} |")

    # ---- in plain words ----
    log("")
    for name, e in rows:
        if name == "llm_alone":
            continue
        d = e["chrf_delta_vs_llm_alone"] or e["chrf_b1_delta_vs_llm_alone"]
        where = f"{len(passages)} passages" if e["chrf_delta_vs_llm_alone"] else f"the first {nb1} passages"
        verdict = ("helps quality" if d[1] > 0 else "hurts quality" if d[2] < 0 else "no clear change in quality")
        r = e["runs"]
        speed = "; ".join(f"{r[b]['vs_llm_alone']:.2f}x llm_alone's speed at batch {b}" for b in r)
        log(f"{name}: {verdict} (chrF {d[0]:+.1f} per passage, 95% [{d[1]:+.1f}, {d[2]:+.1f}], on {where}); {speed}")
    goals = {}
    if "specfuse" in runs:
        g = report["strategies"]["specfuse"]["runs"][1]["vs_llm_alone"]
        goals["specfuse_b1_vs_llm_alone"] = g
        line = f"goal: SpecFuse at >= 0.5x llm_alone's tokens/s at batch 1: {g:.2f}x ({'met' if g >= 0.5 else 'not met'})"
        if "specfuse_reencode" in runs:
            v = runs["specfuse"][1].tok_s / runs["specfuse_reencode"][1].tok_s
            goals["specfuse_b1_vs_reencode"] = v
            same_texts = sum(a == b for a, b in zip(runs["specfuse"][1].texts, runs["specfuse_reencode"][1].texts))
            goals["specfuse_reencode_same_texts_b1"] = same_texts
            line += (f"; {v:.2f}x the released code's re-encoding loop (same texts on {same_texts} of {nb1} passages)")
        log(line)
    report["goals"] = goals
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
