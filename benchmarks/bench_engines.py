"""llama.cpp against transformers, alone and inside arfuse (issue 19): one run, the same text and prompts.

1. Scoring tokens/s on --score-data with disjoint windows of --window tokens (each window: its input
   tokens, one target per input token; BOS never):
     - llama.cpp alone: llama.cpp's own tokenizer, each window evaluated in a reset context with
       logits for every position, log-softmax of the targets in numpy (no arfuse)
     - arfuse score() with the llama.cpp backend (use_cache=False)
     - arfuse score() with the transformers backend (use_cache=False)
   and each engine's token perplexity on that text (llama.cpp against transformers, relative).
2. Generation tokens/s at batch 1, greedy, --new-tokens new tokens (EOS suppressed everywhere) on
   --prompts passages of --passage-chars characters of --passages (bench_generate.passages):
     - llama.cpp alone: Llama.create_completion(prompt token ids, max_tokens, temperature=0,
       repeat_penalty=1, EOS masked by a logits processor), reset context, model already loaded
     - arfuse, llama.cpp backend alone (the default steps="auto", and steps="batched")
     - fused with --slm at --weight, the SLM on transformers (plain, speculative="auto")
     - fused with --slm exported to GGUF (--slm-gguf; `arfuse export-gguf`) on llama.cpp too (plain,
       speculative="auto"): both models on llama.cpp, the drafter cheap
     - arfuse, transformers backend alone; fused speculative="auto"
   methods interleaved prompt by prompt, one warm-up call each before timing.
3. Exactness: for each engine pairing, speculative greedy text == plain fused greedy text, per prompt;
   where they part, the token index and the plain run's top-two fused probability gap there.
   3b. --batch prompts at once (rows of one llama.cpp context) against the same prompts one at a time,
   llama.cpp LLM alone and fused with the SLM on llama.cpp: tokens/s, and whether each row's tokens equal
   its prompt's alone.

llama.cpp built with llamafile (the stock build) computes a lone token with other kernels than a batch
of two or more (on SmolLM2's Q4_1 file up to 1.5 nats apart over the vocabulary); speculative verification
runs batches, so one-token steps there would let speculative and plain fused greedy text part at
near-ties. The adapter's default steps="auto" probes the build at load: one-token steps where they equal
a full pass bit for bit (the Makefile's build, without llamafile), else each lone token as a batch of two
(arfuse.adapters.llamacpp.STEP_MODES). The "steps=batched" rows show what the fallback costs.
4. The cost of one llama.cpp pass over T = 1, 2, 3, 4, 8 tokens after a 200-token context (the verifying
   pass of a speculative cycle with T - 1 drafts), median of --pass-reps, against T = 1; from it and the
   measured acceptance, the ceiling of fused decoding with every overhead left out.
5. The same for the LLM's weights requantised by llama.cpp to each of --pass-types (q8_0, f16, f32): whether
   any weight type makes a pass over 2+ tokens cheap enough on this machine for speculation to pay.

The llama.cpp contexts of "llama.cpp alone" come from the adapter's own helper
(LlamaCppLM._new_context: use_extra_bufts=False, logits_all=True), since a plain Llama(...) on
SmolLM2's Q4_1 GGUF crashes in its first eval in this llama-cpp-python build.

Usage: python benchmarks/bench_engines.py --threads 2 --json benchmarks/results/engines.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def log_softmax_targets(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(len(targets)), targets] - lse


def llamacpp_alone_score(llm, text: str, window: int) -> tuple[int, float, float]:
    """(targets, seconds, mean NLL): llama.cpp tokenization, reset context per disjoint window."""
    from arfuse.adapters.llamacpp import _trim_kv

    t0 = time.perf_counter()
    ids = np.array(llm.tokenize(text.encode(), add_bos=False, special=False), dtype=np.int64)
    nll, n = 0.0, 0
    a = 0
    while a + 1 < len(ids):
        inp = ids[a:a + window]
        tgt = ids[a + 1:a + window + 1]
        inp = inp[:len(tgt)]
        llm.reset()
        _trim_kv(llm)
        llm.eval(inp.tolist())
        lp = log_softmax_targets(np.asarray(llm.scores[:len(inp)]), tgt)
        nll -= lp.sum()
        n += len(tgt)
        a += window
    return n, time.perf_counter() - t0, nll / n


def fused_top2_gap(large, small, w: float, prompt: str, prefix: list[int]) -> float:
    """P's top-two probability gap after ``prompt`` + ``prefix``, from each model's full pass."""
    ids = torch.tensor([large.encode(prompt).ids + list(prefix)])
    p = w * large.logprobs(ids)[0, -1].double().exp() + (1 - w) * small.logprobs(ids)[0, -1].double().exp()
    top = p.topk(2).values
    return float(top[0] - top[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llamacpp", default="llamacpp:smollm2-135m")
    ap.add_argument("--large", default="smollm2-135m", help="the transformers backend's model")
    ap.add_argument("--slm", default="runs/kjv-slm")
    ap.add_argument("--slm-gguf", help="the SLM as GGUF for llama.cpp (default: --slm exported to "
                                       "SLM/model.f16.gguf by arfuse export-gguf, once)")
    ap.add_argument("--slm-gguf-dtype", default="f16", choices=["f16", "f32"])
    ap.add_argument("--weight", type=float, default=0.9399, help="w (chosen on kjv[90%%:95%%], results/union.json)")
    ap.add_argument("--score-data", default="kjv[95%:95.5%]")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--passages", default="kjv[95%:]")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--passage-chars", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp threads")
    ap.add_argument("--batch", type=int, default=4, help="prompts generated at once in the batch section")
    ap.add_argument("--pass-reps", type=int, default=30, help="repetitions of each pass-cost measurement")
    ap.add_argument("--pass-types", default="q8_0,f16,f32",
                    help="GGUF types the LLM's weights are requantised to (by llama.cpp) for the pass-cost table; "
                         "'' skips it")
    ap.add_argument("--from-json", help="print the report of an earlier run's JSON again (nothing is measured)")
    ap.add_argument("--json", help="write every number here (and the printed text next to it, .txt)")
    args = ap.parse_args(argv)
    bad = [t for t in args.pass_types.split(",") if t and t not in GGUF_TYPES]
    if bad:
        ap.error(f"--pass-types: {', '.join(map(repr, bad))} not among {', '.join(GGUF_TYPES)}")
    if args.from_json:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_report(json.loads(Path(args.from_json).read_text()))
        print(out.getvalue(), end="")
        Path(args.from_json).with_suffix(".txt").write_text(out.getvalue())
        return 0
    torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    import llama_cpp
    import transformers
    from bench_generate import passages

    from arfuse.adapters import load_model
    from arfuse.adapters.llamacpp import _trim_kv, load_llamacpp
    from arfuse.data.text import load_dataset
    from arfuse.generation.api import generate
    from arfuse.scoring.scorer import ScoreConfig, score

    report: dict = {"command": "python benchmarks/bench_engines.py " + " ".join(
                        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
                    "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                    "llama_cpp_python": llama_cpp.__version__, "weight": args.weight, "slm": args.slm,
                    "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()}
    problems: list[str] = []
    lc = load_llamacpp(args.llamacpp, n_threads=args.threads)
    lc_batched = load_llamacpp(args.llamacpp, n_threads=args.threads, steps="batched")
    report["steps_auto"] = {"chose": lc.steps, "probe": lc.steps_probe}
    log(f"steps=auto chose {lc.steps!r} ({lc.steps_probe})")
    tf = load_model(args.large)
    slm = load_model(args.slm)
    slm_gguf = Path(args.slm_gguf) if args.slm_gguf else Path(args.slm) / f"model.{args.slm_gguf_dtype}.gguf"
    if not slm_gguf.exists():
        from arfuse.train.export_gguf import export_gguf

        t0 = time.perf_counter()
        res = export_gguf(args.slm, slm_gguf, dtype=args.slm_gguf_dtype)
        report["slm_export"] = {**res.describe(), "seconds": time.perf_counter() - t0}
        log(f"exported {args.slm} to {slm_gguf} ({res.arch}, {res.dtype}) in {time.perf_counter() - t0:.1f} s")
    slm_lc = load_llamacpp(f"llamacpp:{slm_gguf}", n_threads=args.threads)
    raw = lc._new_context()   # "llama.cpp alone": the adapter's context helper, used directly
    report["models"] = {"llamacpp": lc.info.name, "llamacpp_gguf": lc.path, "transformers": tf.info.name,
                        "slm": slm.info.name, "slm_gguf": str(slm_gguf)}
    log(f"loaded {lc.info.name}, {tf.info.name}, {slm.info.name}")

    # ---- 1. scoring ---------------------------------------------------------------------------------
    ds = load_dataset(args.score_data)
    text = "\n".join(ds.documents)
    cfg = ScoreConfig(window=args.window, convention="disjoint", bos="never")
    warm = text[:2000]
    llamacpp_alone_score(raw, warm, args.window)        # warm-ups
    small = load_dataset("kjv[95%:95.05%]")
    score(lc, small, cfg, use_cache=False, progress=False)
    score(tf, small, cfg, use_cache=False, progress=False)
    sc = {}
    n, sec, nll = llamacpp_alone_score(raw, text, args.window)
    sc["llama.cpp alone"] = {"tokens": n, "seconds": sec, "nll": nll}
    log(f"scoring: llama.cpp alone {n / sec:.1f} tokens/s")
    for key, m in (("arfuse, llama.cpp backend", lc), ("arfuse, transformers backend", tf)):
        t0 = time.perf_counter()
        rec = score(m, ds, cfg, use_cache=False, progress=False)
        sec = time.perf_counter() - t0
        sc[key] = {"tokens": len(rec), "seconds": sec, "nll": float(-np.mean(rec.logp.astype(np.float64)))}
        sc[key]["_logp"] = rec.logp.astype(np.float64)
        log(f"scoring: {key} {len(rec) / sec:.1f} tokens/s")
    for v in sc.values():
        v["tokens_per_s"] = v["tokens"] / v["seconds"]
        v["perplexity"] = math.exp(v["nll"])
    base_s = sc["llama.cpp alone"]["tokens_per_s"]
    tf_s = sc["arfuse, transformers backend"]["tokens_per_s"]
    for v in sc.values():
        v["x_llamacpp_alone"] = v["tokens_per_s"] / base_s
        v["x_transformers"] = v["tokens_per_s"] / tf_s
    # the SLM's GGUF export on llama.cpp against its checkpoint on transformers, the same windows
    s_tf = score(slm, ds, cfg, use_cache=False, progress=False).logp.astype(np.float64)
    s_lc = score(slm_lc, ds, cfg, use_cache=False, progress=False).logp.astype(np.float64)
    slm_gap = {"tokens": len(s_tf), "mean": float(np.mean(np.abs(s_tf - s_lc))), "max": float(np.max(np.abs(s_tf - s_lc))),
               "ppl_transformers": math.exp(-s_tf.mean()), "ppl_llamacpp": math.exp(-s_lc.mean())}
    a, b = sc["arfuse, llama.cpp backend"].pop("_logp"), sc["arfuse, transformers backend"].pop("_logp")
    ppl_lc, ppl_tf = sc["arfuse, llama.cpp backend"]["perplexity"], sc["arfuse, transformers backend"]["perplexity"]
    same = len(a) == len(b)
    report["scoring"] = {
        "data": args.score_data, "window": args.window, "convention": "disjoint", "bos": "never", "rows": sc,
        "ppl_rel_diff_llamacpp_vs_transformers": (ppl_lc - ppl_tf) / ppl_tf,
        "ppl_rel_diff_llamacpp_alone_vs_transformers": (sc["llama.cpp alone"]["perplexity"] - ppl_tf) / ppl_tf,
        "same_token_count_arfuse_vs_llamacpp_tokenizer": sc["llama.cpp alone"]["tokens"] == len(a),
        "per_token_logp_abs_diff_llamacpp_vs_transformers": (
            {"mean": float(np.mean(np.abs(a - b))), "max": float(np.max(np.abs(a - b)))} if same else None),
        "slm_gguf_vs_checkpoint_target_logp_abs_diff": slm_gap}

    # ---- 2. generation, batch 1 ----------------------------------------------------------------------
    prompts = passages(args.passages, args.prompts, args.passage_chars)
    nn, w = args.new_tokens, args.weight
    eos = lc.eos_id
    mask_eos = llama_cpp.LogitsProcessorList([lambda ids, s: (s.__setitem__(eos, -np.inf), s)[1]]) if eos is not None else None

    def lc_alone(p):
        ids = lc.encode(p).ids
        raw.reset()
        _trim_kv(raw)
        t0 = time.perf_counter()
        out = raw.create_completion(ids, max_tokens=nn, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0, logits_processor=mask_eos, stop=[])
        dt = time.perf_counter() - t0
        return out["usage"]["completion_tokens"], dt, out["choices"][0]["text"], None, None

    def ours(large, small=None, **kw):
        def fn(p):
            t0 = time.perf_counter()
            r = generate(p, large=large, small=small, weight=w if small is not None else None, max_new_tokens=nn,
                         stop_at_eos=False, **kw)
            dt = time.perf_counter() - t0
            return len(r.token_ids), dt, r.text, r.stats, r.token_ids
        return fn

    SPEC_BOTH = "arfuse, llama.cpp LLM + kjv-slm on llama.cpp fused, speculative=auto"
    methods = {
        "llama.cpp alone (create_completion)": lc_alone,
        "arfuse, llama.cpp LLM alone": ours(lc),
        "arfuse, llama.cpp LLM alone, steps=batched": ours(lc_batched),
        f"arfuse, llama.cpp LLM + kjv-slm fused (w={w})": ours(lc, slm),
        "arfuse, llama.cpp LLM + kjv-slm fused, speculative=auto": ours(lc, slm, speculative="auto"),
        f"arfuse, llama.cpp LLM + kjv-slm on llama.cpp fused (w={w})": ours(lc, slm_lc),
        SPEC_BOTH: ours(lc, slm_lc, speculative="auto"),
        f"arfuse, llama.cpp LLM steps=batched + kjv-slm on llama.cpp fused (w={w})": ours(lc_batched, slm_lc),
        "arfuse, llama.cpp LLM steps=batched + kjv-slm on llama.cpp fused, speculative=auto":
            ours(lc_batched, slm_lc, speculative="auto"),
        "arfuse, transformers LLM alone": ours(tf),
        f"arfuse, transformers LLM + kjv-slm fused (w={w})": ours(tf, slm),
        "arfuse, transformers LLM + kjv-slm fused, speculative=auto": ours(tf, slm, speculative="auto"),
    }
    pairs = {  # plain fused method -> its speculative method, and the models that define P
        f"arfuse, llama.cpp LLM + kjv-slm fused (w={w})": ("arfuse, llama.cpp LLM + kjv-slm fused, speculative=auto", lc, slm),
        f"arfuse, llama.cpp LLM + kjv-slm on llama.cpp fused (w={w})": (SPEC_BOTH, lc, slm_lc),
        f"arfuse, llama.cpp LLM steps=batched + kjv-slm on llama.cpp fused (w={w})":
            ("arfuse, llama.cpp LLM steps=batched + kjv-slm on llama.cpp fused, speculative=auto", lc_batched, slm_lc),
        f"arfuse, transformers LLM + kjv-slm fused (w={w})": ("arfuse, transformers LLM + kjv-slm fused, speculative=auto", tf, slm),
    }
    tot = {k: [0, 0.0] for k in methods}
    texts = {k: [] for k in methods}
    token_ids = {k: [] for k in methods}
    stats = {k: [] for k in methods}
    errors = {}
    for k, fn in methods.items():   # one warm-up call each
        try:
            fn(prompts[0])
        except Exception as e:  # noqa: BLE001 -- a mixed-engine failure is a finding, not a crash
            errors[k] = f"{type(e).__name__}: {e}"
            problems.append(f"{k}: {errors[k]}")
            log(f"ERROR in warm-up of {k}: {errors[k]}")
    for i, p in enumerate(prompts):
        for k, fn in methods.items():
            if k in errors:
                continue
            try:
                ntok, dt, txt, st, ids = fn(p)
            except Exception as e:  # noqa: BLE001
                errors[k] = f"{type(e).__name__}: {e}"
                problems.append(f"{k}: {errors[k]}")
                continue
            tot[k][0] += ntok
            tot[k][1] += dt
            texts[k].append(txt)
            token_ids[k].append(ids)
            if st is not None:
                stats[k].append(st)
            log(f"  prompt {i + 1}: {k}: {ntok / dt:.2f} tokens/s")
    gen = {}
    for k, (ntok, sec) in tot.items():
        if k in errors:
            gen[k] = {"error": errors[k]}
            continue
        gen[k] = {"tokens": ntok, "seconds": sec, "tokens_per_s": ntok / sec}
        st = stats[k]
        if st and any(x.drafted for x in st):
            gen[k]["acceptance_rate"] = sum(x.accepted for x in st) / max(1, sum(x.drafted for x in st))
            gen[k]["tokens_per_llm_pass"] = ntok / max(1, sum(x.large_passes for x in st))
    A = gen["llama.cpp alone (create_completion)"].get("tokens_per_s")
    E = gen["arfuse, transformers LLM alone"].get("tokens_per_s")
    for v in gen.values():
        if "tokens_per_s" in v:
            v["x_llamacpp_alone"] = v["tokens_per_s"] / A if A else None
            v["x_transformers_alone"] = v["tokens_per_s"] / E if E else None
    # same greedy continuations?
    agree = {}
    ref = texts["llama.cpp alone (create_completion)"]
    for k in ("arfuse, llama.cpp LLM alone", "arfuse, llama.cpp LLM alone, steps=batched", "arfuse, transformers LLM alone"):
        if texts[k] and ref:
            agree[k] = [x == y for x, y in zip(texts[k], ref)]
    # exactness: speculative == plain fused greedy, per prompt; where they part, P's top-two gap there
    exact = {}
    for plain_k, (spec_k, large, small) in pairs.items():
        if plain_k in errors or spec_k in errors:
            continue
        rows = []
        for p, a_ids, b_ids in zip(prompts, token_ids[plain_k], token_ids[spec_k]):
            i = next((j for j, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), None)
            rows.append({"same": i is None and len(a_ids) == len(b_ids)} if i is None else
                        {"same": False, "first_diff": i, "fused_top2_gap": fused_top2_gap(large, small, w, p, a_ids[:i])})
        exact[f"{spec_k} == {plain_k}"] = rows
    report["generation"] = {"prompts": f"{len(prompts)} passages of {args.passage_chars} characters from {args.passages}",
                            "prompt_texts": prompts, "new_tokens": nn, "decoding": "greedy, EOS suppressed",
                            "batch": 1, "rows": gen, "same_text_as_reference": agree, "speculative_equals_plain": exact,
                            "texts": {k: v for k, v in texts.items()}}

    # ---- 3b. several prompts at once: the rows of one llama.cpp context, fed in one call per step ---------
    batch_prompts = passages(args.passages, args.batch, args.passage_chars)
    batched = {}
    for label, small in (("llama.cpp LLM alone", None), ("llama.cpp LLM + kjv-slm on llama.cpp fused", slm_lc)):
        kw = dict(large=lc, small=small, weight=w if small is not None else None, max_new_tokens=nn, stop_at_eos=False)
        generate(batch_prompts[:2], **kw)   # warm-up
        t0 = time.perf_counter()
        one = [generate(p, **kw) for p in batch_prompts]
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = generate(batch_prompts, **kw)
        t_all = time.perf_counter() - t0
        n = sum(len(r.token_ids) for r in together)
        batched[label] = {"prompts": len(batch_prompts), "tokens": n, "one_at_a_time_s": t_one, "together_s": t_all,
                          "one_at_a_time_tokens_per_s": sum(len(r.token_ids) for r in one) / t_one,
                          "together_tokens_per_s": n / t_all, "speedup": t_one / t_all,
                          "same_tokens": [a.token_ids == b.token_ids for a, b in zip(one, together)]}
        log(f"batch {len(batch_prompts)}: {label}: {t_one / t_all:.2f}x")
    report["batched_generation"] = batched

    # ---- 4. the cost of a pass over T tokens --------------------------------------------------------
    ctx_ids = lc.encode(text[:4000]).ids[:200]
    extra = lc.encode(text[4000:6000]).ids[:8]
    costs = pass_costs(raw, ctx_ids, extra, args.pass_reps)
    slm_raw = slm_lc._new_context()   # the SLM's one-token step on llama.cpp, the same way
    slm_raw.eval(ctx_ids)
    times = []
    for _ in range(args.pass_reps):
        t0 = time.perf_counter()
        slm_raw.eval(extra[:1])
        times.append(time.perf_counter() - t0)
        slm_raw.n_tokens = len(ctx_ids)
        _trim_kv(slm_raw)
    c_slm = float(np.median(times))
    # the ceiling of a speculative cycle with g drafts at the measured acceptance a, every overhead and the
    # prefill left out: E[tokens] = (1 - a^(g+1)) / (1 - a) per cycle of g + 1 SLM steps and one LLM pass
    # over g + 1 tokens, against llama.cpp alone's one-token pass per token
    a = gen[SPEC_BOTH].get("acceptance_rate")
    ceiling = None if a is None else spec_ceiling(costs, c_slm, a)
    report["pass_cost"] = {"context": len(ctx_ids), "reps": args.pass_reps,
                           "seconds": {str(T): c for T, c in costs.items()},
                           "x_one_token": {str(T): c / costs[1] for T, c in costs.items()},
                           "slm_one_token_seconds": c_slm, "speculative_ceiling": ceiling}
    # 5. the same weights in other GGUF types (llama.cpp's own requantisation): is a pass over 2+ tokens
    # cheap for any of them on this machine? (the ceiling at the acceptance measured above)
    types = [t for t in args.pass_types.split(",") if t]
    if types:
        import tempfile

        by_type = {}
        with tempfile.TemporaryDirectory() as tmp:
            for t in types:
                dst = Path(tmp) / f"{Path(lc.path).stem}.{t}.gguf"
                log(f"requantising {Path(lc.path).name} to {t}")
                try:
                    requantize(lc.path, dst, t)
                except RuntimeError as e:   # a full disk, say: the rest of the run is kept
                    by_type[t] = {"error": str(e)}
                    problems.append(f"pass cost as {t}: {e}")
                    continue
                m = load_llamacpp(f"llamacpp:{dst}", n_threads=args.threads)
                ctx = m._new_context()
                c = pass_costs(ctx, ctx_ids, extra, args.pass_reps)
                by_type[t] = {"mb": dst.stat().st_size / 1e6, "seconds": {str(T): v for T, v in c.items()},
                              "steps_auto": m.steps,
                              "ceiling": None if a is None else spec_ceiling(c, c_slm, a)}
                ctx.close()
                del m, ctx
        report["pass_cost"]["by_type"] = {"source": Path(lc.path).name, "source_mb": Path(lc.path).stat().st_size / 1e6,
                                          "types": by_type}

    # ---- goals ---------------------------------------------------------------------------------------
    r_score = sc["arfuse, llama.cpp backend"]["x_llamacpp_alone"]
    r_dec = gen["arfuse, llama.cpp LLM alone"].get("x_llamacpp_alone")
    r_spec = gen[SPEC_BOTH].get("x_llamacpp_alone")
    r_spec_tf = gen["arfuse, llama.cpp LLM + kjv-slm fused, speculative=auto"].get("x_llamacpp_alone")
    report["goals"] = [
        {"goal": "arfuse on llama.cpp scores at >= 0.9x llama.cpp alone", "ratio": r_score, "met": r_score >= 0.9},
        {"goal": "arfuse on llama.cpp decodes SmolLM2 alone at >= 0.9x llama.cpp alone", "ratio": r_dec,
         "met": r_dec is not None and r_dec >= 0.9},
        {"goal": "arfuse fused speculative (llama.cpp LLM, KJV SLM on llama.cpp) >= 1.0x llama.cpp alone at batch 1",
         "ratio": r_spec, "met": r_spec is not None and r_spec >= 1.0},
        {"goal": "(also) arfuse fused speculative (llama.cpp LLM, KJV SLM on transformers) >= 1.0x llama.cpp alone",
         "ratio": r_spec_tf, "met": r_spec_tf is not None and r_spec_tf >= 1.0},
        {"goal": "speculative greedy text == plain fused greedy text (every engine pairing and steps mode)",
         "ratio": None, "met": bool(exact) and all(r["same"] for v in exact.values() for r in v)},
    ]
    report["problems"] = problems

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_report(report)
    print(out.getvalue(), end="")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        path.with_suffix(".txt").write_text(out.getvalue())
        print(f"written: {path} and {path.with_suffix('.txt')}")
    return 0


def pass_costs(llm, ctx_ids: list[int], extra: list[int], reps: int) -> dict[int, float]:
    """Median seconds of one pass over T = 1, 2, 3, 4, 8 tokens after ``ctx_ids``, on a Llama context."""
    from arfuse.adapters.llamacpp import _trim_kv

    costs = {}
    for T in (1, 2, 3, 4, 8):
        times = []
        llm.reset()
        _trim_kv(llm)
        llm.eval(ctx_ids)
        for _ in range(reps):
            t0 = time.perf_counter()
            llm.eval(extra[:T])
            times.append(time.perf_counter() - t0)
            llm.n_tokens = len(ctx_ids)
            _trim_kv(llm)
        costs[T] = float(np.median(times))
    return costs


def cycle_tokens(a: float, g: int) -> float:
    """Expected tokens of a speculative cycle with g drafts, each accepted with probability a."""
    return g + 1.0 if a >= 1 else (1 - a ** (g + 1)) / (1 - a)


def spec_ceiling(costs: dict[int, float], c_slm: float, a: float) -> dict:
    """Fused decoding with every overhead and the prefill left out, against one-token passes alone: plain
    (one pass and one SLM step per token) and speculative with g = 1, 2, 3 drafts at acceptance a
    (E[tokens] = (1 - a^(g+1)) / (1 - a) per cycle of g + 1 SLM steps and one pass over g + 1 tokens)."""
    best = max((cycle_tokens(a, g) / (costs[g + 1] + (g + 1) * c_slm), g) for g in (1, 2, 3))
    return {"acceptance": a, "best_g": best[1], "x_llamacpp_alone": best[0] * costs[1],
            "plain_fused_x_llamacpp_alone": costs[1] / (costs[1] + c_slm)}


GGUF_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}   # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def requantize(src: str, dst: Path, kind: str) -> None:
    """``src`` written as GGUF type ``kind`` by llama.cpp's own quantiser (quantised tensors are
    dequantised first: the same weights, up to the new type's rounding)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = GGUF_TYPES[kind]
    p.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not write {src} as {kind} (llama_model_quantize returned {rc})")


def needed_acceptance(pc: dict) -> dict[int, float | None]:
    """Per draft length g, the acceptance a at which (1 - a^(g+1)) / (1 - a) tokens per cycle of one LLM pass over
    g + 1 tokens and g + 1 SLM steps match llama.cpp alone's one-token pass per token (bisection; None: not below 1)."""
    cost = {int(T): sec for T, sec in pc["seconds"].items()}
    c_slm = pc["slm_one_token_seconds"]
    out = {}
    for g in (1, 2, 3):
        if g + 1 not in cost:
            continue
        rate = lambda a: cycle_tokens(a, g) / (cost[g + 1] + (g + 1) * c_slm) * cost[1]  # noqa: E731
        lo, hi = 0.0, 0.999999
        if rate(hi) < 1.0:
            out[g] = None
            continue
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if rate(mid) < 1.0 else (lo, mid)
        out[g] = hi
    return out


def print_report(r: dict) -> None:
    s = r["scoring"]
    print(f"# llama.cpp vs transformers (issue 19)\n\n{r['models']['llamacpp']} ({Path(r['models']['llamacpp_gguf']).name}) "
          f"and {r['models']['transformers']} (transformers, float32); SLM {r['models']['slm']}, w = {r['weight']}; "
          f"{r['threads']} thread(s); llama-cpp-python {r['llama_cpp_python']}, torch {r['torch']}, "
          f"transformers {r['transformers']}")
    print(f"\nllama.cpp build: {r['llama_cpp_system_info']}")
    sa = r["steps_auto"]
    print(f"\nsteps=auto chose {sa['chose']!r}: one-token steps against a full pass over {sa['probe']['tokens']} tokens, "
          f"largest logit difference {sa['probe']['max_abs_logit_diff']}")
    print(f"\n## Scoring: {s['data']}, disjoint windows of {s['window']}, BOS never\n")
    print("| engine | tokens | seconds | tokens/s | x llama.cpp alone | x transformers | perplexity |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, v in s["rows"].items():
        print(f"| {k} | {v['tokens']} | {v['seconds']:.2f} | {v['tokens_per_s']:.1f} | {v['x_llamacpp_alone']:.3f} | "
              f"{v['x_transformers']:.3f} | {v['perplexity']:.4f} |")
    d = s["per_token_logp_abs_diff_llamacpp_vs_transformers"]
    print(f"\nperplexity, llama.cpp vs transformers (both through arfuse): {100 * s['ppl_rel_diff_llamacpp_vs_transformers']:+.3f}%; "
          f"llama.cpp alone vs transformers: {100 * s['ppl_rel_diff_llamacpp_alone_vs_transformers']:+.3f}%; "
          f"same target count with llama.cpp's tokenizer: {s['same_token_count_arfuse_vs_llamacpp_tokenizer']}"
          + (f"; per-token |logp| difference mean {d['mean']:.4f}, max {d['max']:.4f}" if d else ""))
    g2 = s.get("slm_gguf_vs_checkpoint_target_logp_abs_diff")
    if g2:
        print(f"\nSLM {r['models']['slm']} exported to GGUF ({Path(r['models']['slm_gguf']).name}) on llama.cpp vs its checkpoint "
              f"on transformers, {g2['tokens']} targets: |logp| difference mean {g2['mean']:.2e}, max {g2['max']:.2e}; "
              f"perplexity {g2['ppl_llamacpp']:.4f} vs {g2['ppl_transformers']:.4f}")
    g = r["generation"]
    print(f"\n## Generation: batch 1, {g['decoding']}, {g['new_tokens']} new tokens, {g['prompts']}\n")
    print("| method | tokens | seconds | tokens/s | x llama.cpp alone | x transformers alone | acceptance | tokens/LLM pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, v in g["rows"].items():
        if "error" in v:
            print(f"| {k} | error: {v['error'][:200]} | | | | | | |")
            continue
        acc = f"{v['acceptance_rate']:.3f}" if v.get("acceptance_rate") is not None else "-"
        tpp = f"{v['tokens_per_llm_pass']:.2f}" if v.get("tokens_per_llm_pass") is not None else "-"
        print(f"| {k} | {v['tokens']} | {v['seconds']:.2f} | {v['tokens_per_s']:.2f} | {v['x_llamacpp_alone']:.3f} | "
              f"{v['x_transformers_alone']:.3f} | {acc} | {tpp} |")
    print("\nsame greedy text as the reference (per prompt): " + "; ".join(
        f"{k}: {v}" for k, v in g["same_text_as_reference"].items()) + " (reference: llama.cpp alone unless named)")
    print("\nspeculative == plain fused greedy text (per prompt; where not, the token index and P's top-two gap there):")
    for k, v in g["speculative_equals_plain"].items():
        cells = ["same" if x["same"] else f"differs at token {x['first_diff']} (top-two gap {x['fused_top2_gap']:.2e})" for x in v]
        print(f"- {k}: {'; '.join(cells)}")
    bg = r.get("batched_generation")
    if bg:
        first = next(iter(bg.values()))
        print(f"\n## {first['prompts']} prompts at once (the rows of one llama.cpp context, fed in one call per step) "
              "against the same prompts one at a time, greedy\n")
        print("| method | one at a time, tokens/s | together, tokens/s | speedup | same tokens |\n|---|---:|---:|---:|---|")
        for k, v in bg.items():
            print(f"| arfuse, {k} | {v['one_at_a_time_tokens_per_s']:.1f} | {v['together_tokens_per_s']:.1f} | "
                  f"{v['speedup']:.2f}x | {v['same_tokens']} |")
    pc = r.get("pass_cost")
    if pc:
        print(f"\n## One llama.cpp pass over T tokens after {pc['context']} tokens of context (median of {pc['reps']})\n")
        print("| T | ms | x T = 1 |\n|---:|---:|---:|")
        for T, sec in pc["seconds"].items():
            print(f"| {T} | {1000 * sec:.2f} | {pc['x_one_token'][T]:.2f} |")
        print(f"\nThe SLM's one-token step on llama.cpp: {1000 * pc['slm_one_token_seconds']:.2f} ms.")
        c = pc.get("speculative_ceiling")
        if c:
            print(f"Ceiling of fused decoding with every overhead and the prefill left out, against llama.cpp alone's "
                  f"one-token pass: plain {c['plain_fused_x_llamacpp_alone']:.3f}x; speculative at the measured "
                  f"acceptance {c['acceptance']:.3f}, best g = {c['best_g']}: {c['x_llamacpp_alone']:.3f}x")
            need = needed_acceptance(pc)
            print("Acceptance a drafter would need for that ceiling to reach 1.0x: " + "; ".join(
                f"g = {g}: {a:.3f}" if a is not None else f"g = {g}: none below 1" for g, a in need.items()))
        bt = pc.get("by_type")
        if bt:
            print(f"\n## The same weights in other GGUF types (requantised from {bt['source']} by llama.cpp): one pass "
                  "over T tokens, as above\n")
            print("| type | MB | T = 1 ms | T = 2 | T = 3 | T = 4 | T = 8 | ceiling plain | ceiling speculative |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            rows = {f"{bt['source']} (as run above)": {"mb": bt["source_mb"], "seconds": pc["seconds"],
                                                       "ceiling": pc.get("speculative_ceiling")}, **bt["types"]}
            for t, v in rows.items():
                if "error" in v:
                    print(f"| {t} | error: {v['error'][:200]} | | | | | | | |")
                    continue
                sec = v["seconds"]
                c1 = sec["1"]
                xs = " | ".join(f"{sec[T] / c1:.2f}x" for T in ("2", "3", "4", "8"))
                cl = v.get("ceiling")
                cp = f"{cl['plain_fused_x_llamacpp_alone']:.3f}x" if cl else "-"
                cs = f"{cl['x_llamacpp_alone']:.3f}x (g = {cl['best_g']})" if cl else "-"
                print(f"| {t} | {v['mb']:.0f} | {1000 * c1:.2f} | {xs} | {cp} | {cs} |")
    print("\n## Issue 19 goals\n")
    for x in r["goals"]:
        ratio = f"{x['ratio']:.3f}x" if x["ratio"] is not None else "n/a"
        print(f"- {x['goal']}: {ratio if x['ratio'] is not None else ''} -> {'MET' if x['met'] else 'NOT MET'}")
    if r["problems"]:
        print("\nproblems: " + "; ".join(r["problems"]))


if __name__ == "__main__":
    raise SystemExit(main())
