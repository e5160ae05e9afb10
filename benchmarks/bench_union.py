"""Fusion across tokenizers, measured in one run (issue 16).

The pair: SmolLM2-135M (its own byte-level BPE, 49,152 tokens) with the KJV small model trained on
GPT-2's tokenizer (50,257 tokens; `arfuse train --config configs/kjv-slm-gpt2.toml --out
runs/kjv-slm-gpt2`), against the same-tokenizer KJV small model (runs/kjv-slm, SmolLM2's tokenizer,
the same recipe). Weights are chosen on --valid and reported on --data.

(a) Bits per byte on --data, each with a block-bootstrap interval of the reduction against SmolLM2
    alone: SmolLM2 alone; the same-tokenizer SLM fused by the linear rule (token level, exact w);
    the GPT-2-tokenizer SLM fused by the segment mixture (exact w, over segments where both
    tokenizations have a boundary) and by the union rule, teacher-forced (it redistributes the LLM's
    probability of the union's strings; k on a grid, w exact, both on --valid; arfuse.tasks.union_eval). The goal: the cross-tokenizer fusion keeps at least
    80% of the same-tokenizer pair's bits-per-byte reduction.
(b) Generation tokens/s (greedy, EOS ignored, --new-tokens each) at batch 1 and 8 on passages of
    --data: SmolLM2 alone, the linear rule with the same-tokenizer SLM, the union rule with the
    GPT-2-tokenizer SLM (each model extends its own tokens, KV caches kept), and the union rule as
    UniTE's code runs it (the second model re-tokenizes and re-reads the whole text every step).
    Goals: union >= 0.7x SmolLM2 alone at batch 1, and >= 2x the re-tokenizing loop.
(c) The alignment's cost per generated token (the union rule and the extension, outside model calls).
(d) (a) and the batch-1 union speed with stories260K (llama2.c, SentencePiece tok512) as the partner.

Usage: python benchmarks/bench_union.py --threads 2 --json benchmarks/results/union.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import passages  # noqa: E402

LN2 = math.log(2)


def bootstrap_reduction(base_nll: np.ndarray, fused_nll: np.ndarray, nbytes: np.ndarray, *, block: int = 1024,
                        n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the bits-per-byte reduction (%, 1 - bpb_fused / bpb_base), paired
    block bootstrap over contiguous blocks of ``block`` positions (tokens or segments)."""
    n = len(base_nll)
    nb = max(1, n // block)
    edges = np.linspace(0, n, nb + 1).astype(int)
    b = np.add.reduceat(base_nll, edges[:-1])
    f = np.add.reduceat(fused_nll, edges[:-1])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, nb, size=(n_boot, nb))
    red = 100.0 * (1.0 - f[pick].sum(1) / b[pick].sum(1))
    return float(np.percentile(red, 2.5)), float(np.percentile(red, 97.5))


def bpb(nll_nats: np.ndarray, nbytes) -> float:
    return float(np.sum(nll_nats) / LN2 / np.sum(nbytes))


def row(name: str, base_nll, fused_nll, nbytes, **extra) -> dict:
    b, f = bpb(base_nll, nbytes), bpb(fused_nll, nbytes)
    lo, hi = bootstrap_reduction(np.asarray(base_nll, np.float64), np.asarray(fused_nll, np.float64),
                                 np.asarray(nbytes))
    return {"method": name, "bpb_llm": b, "bpb": f, "reduction_pct": 100.0 * (1 - f / b), "ci95": [lo, hi],
            "bytes": int(np.sum(nbytes)), **extra}


# ---- (a) bits per byte ------------------------------------------------------------------------
def linear_same(llm, slm, valid, data, cfg) -> dict:
    from arfuse.scoring.scorer import score
    from arfuse.search.weights import optimal_weight
    from arfuse.fusion import linear

    rv = [score(m, valid, cfg) for m in (llm, slm)]
    rt = [score(m, data, cfg) for m in (llm, slm)]
    opt = optimal_weight(rv[0].logp, rv[1].logp)
    fused = linear([rt[0].logp.astype(np.float64), rt[1].logp.astype(np.float64)], [opt.w, 1 - opt.w])
    return row(f"+ {slm.info.name} (same tokenizer), linear rule, token level", -rt[0].logp.astype(np.float64),
               -fused, rt[0].nbytes, w=opt.w, units=len(rt[0]), unit="tokens")


def segment_mixture(llm, slm, valid, data, cfg) -> dict:
    from arfuse.scoring.scorer import score
    from arfuse.scoring.segments import segment_records
    from arfuse.search.weights import optimal_weight
    from arfuse.fusion import linear

    def segs(ds):
        recs = [score(m, ds, cfg) for m in (llm, slm)]
        return segment_records(recs, ds)

    sv, st = segs(valid), segs(data)
    opt = optimal_weight(sv.logp[0], sv.logp[1])
    fused = linear([st.logp[0], st.logp[1]], [opt.w, 1 - opt.w])
    return row(f"+ {slm.info.name} (other tokenizer), segment mixture", -st.logp[0], -fused, st.nbytes, w=opt.w,
               units=int(st.logp.shape[1]), unit="segments", bytes_dropped=int(st.bytes_dropped))


def union_rule(llm, slm, valid, data, window, ks) -> tuple[dict, dict]:
    from arfuse.tasks.union_eval import fit_union, mix_logp, score_union

    t0 = time.perf_counter()
    sv = score_union(llm, slm, valid, ks=ks, window=window)
    st = score_union(llm, slm, data, ks=ks, window=window)
    fit = fit_union(sv)
    b = fit["best"]
    fused = mix_logp(st, b["k"], b["w"])
    r = row(f"+ {slm.info.name} (other tokenizer), union rule, teacher-forced", -st.lp_large, -fused, st.nbytes,
            k=b["k"], w=b["w"], coverage=st.coverage(b["k"]), units=len(st.lp_large),
            unit="LLM tokens", seconds=time.perf_counter() - t0,
            by_k={kk: {"w": f["w"], "valid_bpb": f["nll"] / LN2 / float(np.sum(sv.nbytes)),
                       "coverage": f["coverage"]} for kk, f in fit["by_k"].items()})
    return r, b


# ---- (b) generation ---------------------------------------------------------------------------
def gen(llm, small, prompts, n_new, batch, **kw) -> dict:
    from arfuse.generation.api import generate

    t0 = time.perf_counter()
    n = 0
    stats = None
    for i in range(0, len(prompts), batch):
        res = generate(prompts[i:i + batch], large=llm, small=small, max_new_tokens=n_new, stop_at_eos=False, **kw)
        n += res[0].stats.new_tokens
        stats = res[0].stats
    dt = time.perf_counter() - t0
    return {"tokens": n, "seconds": dt, "tok_s": n / dt, "rule": stats.rule}


def gen_union(llm, small, prompts, n_new, batch, w, k, retokenize=False) -> dict:
    from arfuse.generation.config import GenerationConfig
    from arfuse.generation.api import build_rule
    from arfuse.generation.union import UnionDecoder

    rule = build_rule([llm, small], rule="union", weight=w, topk=k)
    t0 = time.perf_counter()
    n, steps, align, texts = 0, 0, 0.0, []
    for i in range(0, len(prompts), batch):
        dec = UnionDecoder([llm, small], rule, GenerationConfig(max_new_tokens=n_new, stop_at_eos=False),
                           retokenize=retokenize)
        for _ in dec.run(prompts[i:i + batch]):
            pass
        n += sum(len(r.token_ids) for r in dec.results)   # the text in the LLM's tokens, as for the others
        steps += dec.stats.new_tokens
        align += dec.align_seconds
        texts += [r.text for r in dec.results]
    dt = time.perf_counter() - t0
    return {"tokens": n, "union_steps": steps, "seconds": dt, "tok_s": n / dt, "align_ms_per_token": 1000 * align / n,
            "align_share": align / dt, "texts": texts[:2]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--slm-same", default="runs/kjv-slm", help="SLM on the LLM's tokenizer")
    ap.add_argument("--slm-cross", default="runs/kjv-slm-gpt2", help="SLM on another tokenizer (GPT-2's)")
    ap.add_argument("--weak", default="stories260k", help="a weak partner with another tokenizer ('' to skip)")
    ap.add_argument("--valid", default="kjv[90%:95%]")
    ap.add_argument("--data", default="kjv[95%:]")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--ks", default="1,2,5,10,20,50", help="union rule: top-k values tried on --valid")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--generation-only", metavar="JSON", help="rerun (b)-(d)'s generation with the weights and k of an "
                    "earlier run's JSON (bits per byte not recomputed); merged into --json")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from arfuse.adapters import load_model
    from arfuse.data.text import load_dataset
    from arfuse.scoring.scorer import ScoreConfig

    ks = tuple(int(x) for x in args.ks.split(","))
    cfg = ScoreConfig(window=args.window, convention="blocks", bos="never")
    llm = load_model(args.large)
    same, cross = load_model(args.slm_same), load_model(args.slm_cross)
    valid, data = load_dataset(args.valid), load_dataset(args.data)
    out: dict = {"large": llm.info.name, "slm_same": same.info.name, "slm_cross": cross.info.name,
                 "valid": valid.name, "data": data.name, "window": args.window, "convention": "blocks",
                 "bos": "never", "threads": torch.get_num_threads(), "bits_per_byte": []}

    def show(r):
        lo, hi = r["ci95"]
        print(f"  {r['method']:<72} bpb {r['bpb']:.4f} (LLM {r['bpb_llm']:.4f})  reduction {r['reduction_pct']:+.3f}% "
              f"[{lo:+.3f}, {hi:+.3f}]  w = {r['w']:.4f}", flush=True)

    if args.generation_only:
        prev = json.loads(Path(args.generation_only).read_text())
        out = {**prev, "threads": torch.get_num_threads()}
        r_lin = next(r for r in prev["bits_per_byte"] if "linear rule" in r["method"])
        best = next(r for r in prev["bits_per_byte"] if "union rule" in r["method"])
        weak = load_model(args.weak) if args.weak else None
        w_best = next(r for r in prev["weak_partner"]["bits_per_byte"] if "union rule" in r["method"]) if weak else None
        return generation(args, out, llm, same, cross, weak, data, r_lin, best, w_best)
    print(f"(a) bits per byte on {data.name}, weights chosen on {valid.name}", flush=True)
    r_lin = linear_same(llm, same, valid, data, cfg)
    show(r_lin)
    r_seg = segment_mixture(llm, cross, valid, data, cfg)
    show(r_seg)
    r_uni, best = union_rule(llm, cross, valid, data, args.window, ks)
    show(r_uni)
    for r in (r_seg, r_uni):
        r["kept_of_same_tokenizer_pct"] = 100.0 * r["reduction_pct"] / r_lin["reduction_pct"]
        print(f"  {r['method']}: keeps {r['kept_of_same_tokenizer_pct']:.1f}% of the same-tokenizer reduction "
              f"(goal: 80%)", flush=True)
    out["bits_per_byte"] = [r_lin, r_seg, r_uni]
    weak = load_model(args.weak) if args.weak else None
    if weak is not None:
        win = min(args.window, weak.info.max_length or args.window)   # stories260K reads 512 tokens at most
        print(f"(d) the same with {weak.info.name} as the partner (windows of {win} tokens)", flush=True)
        w_seg = segment_mixture(llm, weak, valid, data, ScoreConfig(window=win, convention="blocks", bos="never"))
        show(w_seg)
        w_uni, w_best = union_rule(llm, weak, valid, data, win, ks)
        show(w_uni)
        out["weak_partner"] = {"model": weak.info.name, "window": win, "bits_per_byte": [w_seg, w_uni]}
    if args.skip_generation:
        return write(args, out)
    return generation(args, out, llm, same, cross, weak, data, r_lin, best, w_best if weak is not None else None)


def write(args, out: dict) -> int:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


def generation(args, out, llm, same, cross, weak, data, r_lin, best, w_best) -> int:
    prompts = passages(args.data, args.prompts, 300)
    w, k = best["w"], best["k"]
    gens = {}
    print(f"(b) generation, {args.new_tokens} new tokens per prompt, {len(prompts)} passages of {data.name}, "
          f"union rule at k = {k}, w = {w:.4f}; linear rule at w = {r_lin['w']:.4f}", flush=True)
    gen(llm, same, prompts[:1], 4, 1, weight=r_lin["w"])   # warm-up: kernels measured, caches allocated
    gen_union(llm, cross, prompts[:1], 4, 1, w, k)
    for batch in (1, 8):
        g = gens[batch] = {
            "llm_alone": gen(llm, None, prompts, args.new_tokens, batch),
            "linear_same_tokenizer": gen(llm, same, prompts, args.new_tokens, batch, weight=r_lin["w"]),
            "union": gen_union(llm, cross, prompts, args.new_tokens, batch, w, k),
            "union_retokenize_every_step": gen_union(llm, cross, prompts, args.new_tokens, batch, w, k,
                                                     retokenize=True),
        }
        base = g["llm_alone"]["tok_s"]
        for name, v in g.items():
            v["vs_llm_alone"] = v["tok_s"] / base
        g["union"]["vs_retokenize"] = g["union"]["tok_s"] / g["union_retokenize_every_step"]["tok_s"]
        print(f"  batch {batch}: " + "; ".join(f"{n} {v['tok_s']:.1f} tok/s ({v['vs_llm_alone']:.2f}x)"
                                               for n, v in g.items())
              + f"; union vs re-tokenizing loop {g['union']['vs_retokenize']:.2f}x", flush=True)
        print(f"  (c) alignment cost, batch {batch}: {g['union']['align_ms_per_token']:.2f} ms per generated "
              f"token ({100 * g['union']['align_share']:.1f}% of the union rule's time)", flush=True)
    out["generation"] = gens
    if weak is not None:
        wg = gen_union(llm, weak, prompts, args.new_tokens, 1, w_best["w"], w_best["k"])
        wg["vs_llm_alone"] = wg["tok_s"] / gens[1]["llm_alone"]["tok_s"]
        out["weak_partner"]["generation_batch1"] = wg
        print(f"  (d) union rule with {weak.info.name}, batch 1: {wg['tok_s']:.1f} tok/s "
              f"({wg['vs_llm_alone']:.2f}x SmolLM2 alone)", flush=True)
    return write(args, out)


if __name__ == "__main__":
    raise SystemExit(main())
