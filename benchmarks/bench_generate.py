"""Generation speed of the fused model against the large model alone and transformers' assisted generation.

One run, the same models, the same prompts, 128 new tokens each (EOS suppressed everywhere, so every
method produces exactly as many tokens), greedy:
  - llm-alone:      the LLM alone with transformers `generate` (KV cache)
  - fused:          arfuse, P = w p_LLM + (1 - w) p_SLM, one KV cache per model
  - fused-spec:     arfuse speculative decoding (g chosen from the measured acceptance, unless --g),
                    drafts from the SLM, or copied from the text itself (lookup: every model scores
                    them in one pass; the output is still exactly the fused model's)
  - hf-assisted:    transformers assisted generation with the SLM as assistant and
                    `assistant_ensemble_weight = w` (the verifier's target is w p + (1 - w) q; the bonus
                    token comes from p alone, so it is not exactly the fused model)
at batch 1 (prompts one at a time), then at batch 8 (assisted generation is batch 1 only), then the
acceptance rate and speed against g, greedy and sampling (temperature 1). Two references show what
the lookup trick gives the LLM alone: arfuse's decoder with no SLM, and transformers' own prompt
lookup decoding (batch 1). SLM drafts run twice: with the drafter's output layer restricted to
candidate tokens while drafting (arfuse's default, arfuse.generation.draft_head) and with its whole
layer at every step; "hybrid" drafts (arfuse's default drafter) copy, per row, where copies of that
match length have been accepted at least as often as the SLM's drafts on the row's text, and use
the SLM otherwise.
"Where drafts come right" checks, at every position of the fused greedy continuations of the
batch-1 prompts, whether the SLM's best token and the lookup copy equal the fused model's token
(the first draft's acceptance, by source).

The SLM: any small model on the LLM's tokenizer (--slm; default runs/kjv-slm, the acceptance SLM
that `arfuse train --config configs/kjv-slm.toml --out runs/kjv-slm` trains). The weight: --weight,
or the NLL-optimal one on --weight-data (arfuse.tasks.heads.evaluate).

Usage: python benchmarks/bench_generate.py --slm runs/kjv-slm --passages "kjv[95%:]" --weight 0.938307 \
           --threads 1 --json benchmarks/results/generate.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "In 1969, the first humans to walk on the Moon",
    "A good recipe for bread needs only four ingredients:",
    "The main causes of the French Revolution were",
    "Python is a programming language that",
    "The ocean covers most of the Earth's surface, and",
    "To train a neural network, you first",
]


def passages(spec: str, n: int, chars: int) -> list[str]:
    """``n`` passages evenly spaced through data set ``spec``: each starts at a line start (a KJV verse)
    and ends at the last space within ``chars`` characters, so the model continues mid-sentence."""
    from arfuse.data.text import load_dataset

    import re

    text = "\n".join(load_dataset(spec).documents)
    out = []
    for i in range(n):
        at = i * len(text) // n
        m = re.compile(r"\n(?=\s*\d+ )").search(text, at)  # a numbered verse, else any line
        a = (m.start() if m else text.find("\n", at)) + 1
        p = text[a:a + chars]
        out.append(p[:p.rfind(" ")])
    return out


# ---- timing -----------------------------------------------------------------------------------
def nll_optimal_weight(large: str, slm: str, data: str) -> tuple[float, str]:
    """The exact NLL-optimal w on ``data`` (arfuse's evaluation head for causal LMs, cached scores)."""
    from arfuse.tasks.config import EvalConfig
    from arfuse.tasks.heads import evaluate

    report = evaluate(EvalConfig(large=large, smalls=[slm], data=data), progress=False)
    return report.weights[0], report.weight_source


def hf_generate(model, tok, prompts, n_new, **kw) -> tuple[int, float]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id or 0, **kw)
    dt = time.perf_counter() - t0
    return (out.shape[1] - enc.input_ids.shape[1]) * len(prompts), dt


def ours(llm, slm, prompts, n_new, w, **kw) -> tuple[int, float, object]:
    from arfuse.generation.api import generate

    t0 = time.perf_counter()
    res = generate(prompts, large=llm, small=slm, weight=w if slm is not None else None, max_new_tokens=n_new, stop_at_eos=False, **kw)
    dt = time.perf_counter() - t0
    return sum(len(r.token_ids) for r in res), dt, res[0].stats


def draft_agreement(llm, slm, prompts, n_new, w) -> dict:
    """At each position of the fused greedy continuation of each prompt: does the SLM's best token,
    the LLM's, or the lookup copy (by the length of the n-gram matched) equal the fused token?"""
    from arfuse.generation.api import generate
    from arfuse.generation.speculative import lookup_match

    counts: dict[str, list[int]] = {}

    def add(key: str, ok: bool) -> None:
        c = counts.setdefault(key, [0, 0])
        c[0] += int(ok)
        c[1] += 1

    for p in prompts:
        r = generate(p, large=llm, small=slm, weight=w, max_new_tokens=n_new, stop_at_eos=False)
        ids = llm.encode(p).ids
        seq = ids + r.token_ids
        best = {}  # each model's best next token after seq[:t], as it saw the text (with its own BOS rule)
        for name, m in (("slm", slm), ("llm", llm)):
            pre = [m.bos_id] if m.uses_bos("auto") else []
            top = m.logprobs(torch.tensor([pre + seq]))[0].argmax(-1).tolist()
            best[name] = top[len(pre) - 1:] if pre else [None] + top  # best[name][t]: the guess for seq[t]
        for t in range(len(ids), len(seq)):
            y = seq[t]
            add("slm", best["slm"][t] == y)
            add("llm", best["llm"][t] == y)
            copy, n = lookup_match(seq[:t], 1)
            add(f"lookup, {n}-gram match" if copy else "lookup, no match", bool(copy) and copy[0] == y)
            add("hybrid (lookup if a match, else slm)", copy[0] == y if copy else best["slm"][t] == y)
    total = counts["slm"][1]
    return {k: {"agree": a, "positions": m, "share_of_positions": m / total, "rate": a / m}
            for k, (a, m) in counts.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--slm", default="runs/kjv-slm", help="a small model on the LLM's tokenizer (default: runs/kjv-slm, "
                    "trained by `arfuse train --config configs/kjv-slm.toml --out runs/kjv-slm`)")
    ap.add_argument("--weight", type=float, help="the LLM's weight w (default: NLL-optimal on --weight-data)")
    ap.add_argument("--weight-data", default="kjv[90%:90.5%]", help="data the default weight is fitted on")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts-b1", type=int, default=3, help="prompts timed one at a time")
    ap.add_argument("--g", default="auto", help="draft length of fused-spec: an integer or auto")
    ap.add_argument("--g-sweep", default="1,2,3,4,6", help="draft lengths for the acceptance table")
    ap.add_argument("--sweep-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--skip-batch8", action="store_true")
    ap.add_argument("--rounds-b8", type=int, default=2, help="interleaved rounds of the batch-8 runs")
    ap.add_argument("--w-sweep", default="0.9,0.7,0.5", help="further weights for the speculation-vs-w table")
    ap.add_argument("--prompts", metavar="FILE", help="prompts, one per line (at least 8), instead of the built-in "
                    "general ones; benchmarks/prompts_kjv.txt holds verse openings from the held-out kjv[95%%:]")
    ap.add_argument("--passages", metavar="DATA", help="prompts: 8 passages of --passage-chars characters, evenly "
                    "spaced through a data set (e.g. \"kjv[95%%:]\", the KJV SLM's held-out part), each from a line start "
                    "and cut at a word boundary: continuing text of the SLM's domain, as a user of that fused model would")
    ap.add_argument("--passage-chars", type=int, default=350)
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args(argv)
    global PROMPTS
    if args.prompts:
        PROMPTS = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if len(PROMPTS) < 8:
            ap.error(f"--prompts {args.prompts}: {len(PROMPTS)} prompts, the batch-8 runs need at least 8")
    if args.passages:
        PROMPTS = passages(args.passages, 8, args.passage_chars)
    if args.threads:
        torch.set_num_threads(args.threads)
    from arfuse.adapters import load_model

    import transformers

    log = lambda *a: print(*a, flush=True)  # noqa: E731
    import shlex

    report: dict = {"command": "python benchmarks/bench_generate.py " + " ".join(
                        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
                    "threads": torch.get_num_threads(), "transformers": transformers.__version__,
                    "torch": torch.__version__, "new_tokens": args.new_tokens, "decoding": "greedy",
                    "prompts": (f"{len(PROMPTS)} passages of {args.passage_chars} characters from {args.passages}"
                                if args.passages else args.prompts or "built-in (general)"),
                    "prompt_texts": PROMPTS}
    t0 = time.time()
    llm = load_model(args.large)
    log(f"LLM {llm.info.name}: {llm.info.num_parameters / 1e6:.1f}M parameters ({time.time() - t0:.1f} s to load)")
    if not Path(args.slm).exists() and args.slm.startswith("runs/"):
        ap.error(f"--slm {args.slm} does not exist: train it with `arfuse train --config configs/kjv-slm.toml "
                 f"--out {args.slm}` (about 15 minutes on two cores), or give another small model")
    slm = load_model(args.slm)
    report["slm"] = {"spec": args.slm, "num_parameters": slm.info.num_parameters}
    log(f"SLM {slm.info.name}: {slm.info.num_parameters / 1e6:.1f}M parameters")
    if args.weight is None:
        w, report["weight_source"] = nll_optimal_weight(args.large, args.slm, args.weight_data)
    else:
        w = args.weight
        report["weight_source"] = "given (--weight)"
    report["weight"] = w
    log(f"w = {w:.4f} ({report['weight_source']}); k = w / (1 - w) = {w / (1 - w):.3f}")
    g = args.g if args.g == "auto" else int(args.g)
    tok = llm.tokenizer
    n = args.new_tokens
    hf_llm, hf_slm = llm.network(), slm.network()  # the transformers models, for transformers' own generate

    # ---- what one pass costs: the LLM over T new tokens (as when verifying T - 1 drafts), the SLM over one --
    from arfuse.generation.state import ModelState

    ctx = torch.tensor([llm.encode(" ".join(PROMPTS[:3])).ids[:9]])
    for label, on in (("pass_cost_stock", False), ("pass_cost", True)):  # F.linear; arfuse's generation kernels
        with contextlib.ExitStack() as active:
            for m in (llm, slm) if on else ():
                active.enter_context(m.fast_kernels().active())
            st_l, st_s = ModelState(llm), ModelState(slm)
            st_l.feed(ctx)
            st_s.feed(ctx)
            times = {T: [] for T in (1, 2, 3, 4, 5, 9)}
            t_slm = []
            for _ in range(7):
                for T in times:
                    t1 = time.perf_counter()
                    st_l.feed(ctx[:, :T])
                    times[T].append(time.perf_counter() - t1)
                    st_l.rollback(T, torch.tensor([0]))
                t1 = time.perf_counter()
                st_s.feed(ctx[:, :1])
                t_slm.append(time.perf_counter() - t1)
                st_s.rollback(1, torch.tensor([0]))
        med = {T: statistics.median(v) for T, v in times.items()}
        report[label] = {"llm_ms_by_tokens": {T: round(1000 * v, 1) for T, v in med.items()},
                         "llm_relative_to_one_token": {T: round(v / med[1], 3) for T, v in med.items()},
                         "slm_one_token_ms": round(1000 * statistics.median(t_slm), 1),
                         "slm_relative_to_llm_step": round(statistics.median(t_slm) / med[1], 3)}
        log(f"{label}: {report[label]}")

    # warm-up: first calls allocate and build kernels
    hf_generate(hf_llm, tok, PROMPTS[:1], 4)
    ours(llm, slm, PROMPTS[:1], 4, w)

    # ---- batch 1: methods interleaved prompt by prompt, so load changes hit them alike ----------
    spec_slm, spec_lookup = f"fused-spec (arfuse, SLM drafts, g={g})", f"fused-spec (arfuse, lookup drafts, g={g})"
    spec_full = f"fused-spec (arfuse, SLM drafts, whole draft head, g={g})"
    spec_hybrid = f"fused-spec (arfuse, hybrid drafts: the default, g={g})"
    methods = {
        "llm-alone (transformers generate)": lambda p: hf_generate(hf_llm, tok, [p], n, do_sample=False)[:2],
        "llm-alone (arfuse decoder, no SLM)": lambda p: ours(llm, None, [p], n, None)[:2],
        "fused (arfuse, non-speculative)": lambda p: ours(llm, slm, [p], n, w)[:2],
        spec_slm: lambda p: ours(llm, slm, [p], n, w, speculative=g, draft="slm"),
        spec_full: lambda p: ours(llm, slm, [p], n, w, speculative=g, draft="slm", draft_head="full"),
        spec_lookup: lambda p: ours(llm, slm, [p], n, w, speculative=g, draft="lookup"),
        spec_hybrid: lambda p: ours(llm, slm, [p], n, w, speculative=g, draft="hybrid"),
        f"hf-assisted (assistant_ensemble_weight={w:.4f})": lambda p: hf_generate(
            hf_llm, tok, [p], n, do_sample=False, assistant_model=hf_slm, assistant_ensemble_weight=w)[:2],
        # references: what the same lookup trick gives the LLM alone
        "ref: llm-alone + lookup drafts (arfuse decoder)": lambda p: ours(llm, None, [p], n, None, speculative=g,
                                                                        draft="lookup"),
        "ref: llm-alone + prompt lookup (transformers, 3 tokens)": lambda p: hf_generate(
            hf_llm, tok, [p], n, do_sample=False, prompt_lookup_num_tokens=3, max_matching_ngram_size=3)[:2],
    }
    tot = {k: [0, 0.0] for k in methods}
    per_prompt = {k: [] for k in methods}
    stats = {k: [] for k in methods}
    for i, p in enumerate(PROMPTS[:args.prompts_b1]):
        for k, fn in methods.items():
            out = fn(p)
            tot[k][0] += out[0]
            tot[k][1] += out[1]
            per_prompt[k].append(out[0] / out[1])
            if len(out) == 3:
                stats[k].append(out[2])
            log(f"  batch 1, prompt {i + 1}: {k}: {out[0] / out[1]:.2f} tokens/s")
    base = tot["llm-alone (transformers generate)"]
    hfa = [v for k, v in tot.items() if k.startswith("hf-assisted")][0]
    b1 = {}
    for k, (ntok, sec) in tot.items():
        b1[k] = {"tokens": ntok, "seconds": round(sec, 2), "tokens_per_s": ntok / sec,
                 "x_llm_alone": (ntok / sec) / (base[0] / base[1]), "x_hf_assisted": (ntok / sec) / (hfa[0] / hfa[1]),
                 "per_prompt_tokens_per_s": [round(x, 3) for x in per_prompt[k]]}
        if stats[k]:
            st = stats[k]
            b1[k].update(acceptance_rate=sum(x.accepted for x in st) / max(1, sum(x.drafted for x in st)),
                         tokens_per_llm_pass=ntok / max(1, sum(x.large_passes for x in st)),
                         draft_lengths_median=statistics.median([d for x in st for d in x.draft_lengths] or [0]),
                         cycles_by_draft={d: sum(x.cycles_by_draft.get(d, 0) for x in st)
                                          for d in ("slm", "lookup", "slm+copies")})
            if any(x.draft_head_positions for x in st):
                b1[k].update(draft_vocab_median=statistics.median([x.draft_vocab for x in st]),
                             draft_head_coverage=sum(x.draft_head_covered for x in st)
                             / sum(x.draft_head_positions for x in st))
    report["batch1"] = b1

    # ---- batch 8 ------------------------------------------------------------------------------------
    if not args.skip_batch8:
        b8 = {}
        fns = {
            "llm-alone (transformers generate)": lambda: hf_generate(hf_llm, tok, PROMPTS, n, do_sample=False)[:2],
            "llm-alone (arfuse decoder, no SLM)": lambda: ours(llm, None, PROMPTS, n, None)[:2],
            "fused (arfuse, non-speculative)": lambda: ours(llm, slm, PROMPTS, n, w)[:2],
            spec_slm: lambda: ours(llm, slm, PROMPTS, n, w, speculative=g, draft="slm"),
            spec_full: lambda: ours(llm, slm, PROMPTS, n, w, speculative=g, draft="slm", draft_head="full"),
            spec_lookup: lambda: ours(llm, slm, PROMPTS, n, w, speculative=g, draft="lookup"),
            spec_hybrid: lambda: ours(llm, slm, PROMPTS, n, w, speculative=g, draft="hybrid"),
        }
        for rnd in range(args.rounds_b8):  # interleaved rounds, summed
            for k, fn in fns.items():
                out = fn()
                v = b8.setdefault(k, {"tokens": 0, "seconds": 0.0})
                v["tokens"] += out[0]
                v["seconds"] += out[1]
                if len(out) == 3:
                    v.setdefault("acceptance", []).append(out[2].acceptance_rate)
                log(f"  batch 8, round {rnd + 1}: {k}: {out[0] / out[1]:.2f} tokens/s")
        for v in b8.values():
            v["tokens_per_s"] = v["tokens"] / v["seconds"]
            if "acceptance" in v:
                accs = [a for a in v.pop("acceptance") if a is not None]
                v["acceptance_rate"] = sum(accs) / len(accs) if accs else None
        base8 = b8["llm-alone (transformers generate)"]["tokens_per_s"]
        for v in b8.values():
            v["x_llm_alone"] = v["tokens_per_s"] / base8
        report["batch8"] = b8

    # ---- where drafts come right: first-draft acceptance by source ------------------------------------
    report["draft_agreement"] = {"prompts": args.prompts_b1, "new_tokens": n,
                                 "rows": draft_agreement(llm, slm, PROMPTS[:args.prompts_b1], n, w)}

    # ---- acceptance against g ------------------------------------------------------------------------
    sweep = []
    for mode, kw in (("greedy", {"draft": "slm"}), ("sampling T=1", {"temperature": 1.0, "seed": 0, "draft": "slm"}),
                     ("greedy, lookup", {"draft": "lookup"}), ("sampling, lookup", {"temperature": 1.0, "seed": 0,
                                                                                     "draft": "lookup"}),
                     ("greedy, hybrid", {"draft": "hybrid"}),
                     ("sampling, hybrid", {"temperature": 1.0, "seed": 0, "draft": "hybrid"}),
                     ("greedy, whole head", {"draft": "slm", "draft_head": "full"})):
        for gg in [int(x) for x in args.g_sweep.split(",")]:
            ntok, sec, st = ours(llm, slm, PROMPTS[:1], args.sweep_tokens, w, speculative=gg, **kw)
            spec_cycles = sum(st.cycles_by_draft.values())
            sweep.append({"mode": mode, "g": gg, "acceptance_rate": st.acceptance_rate,
                          "tokens_per_llm_pass": ntok / st.large_passes, "tokens_per_s": ntok / sec,
                          "draft_ms_per_cycle": 1000 * st.draft_seconds / max(1, spec_cycles),
                          "verify_ms_per_cycle": 1000 * st.verify_seconds / max(1, spec_cycles)})
            log(f"  {mode}, g={gg}: acceptance {st.acceptance_rate:.3f}, {ntok / st.large_passes:.2f} tokens per "
                f"LLM pass, {ntok / sec:.2f} tokens/s")
    report["acceptance_vs_g"] = {"prompt": PROMPTS[0], "new_tokens": args.sweep_tokens, "rows": sweep}

    # ---- where speculation pays: the same SLM at lower weights (a different fused model each) ----------
    wrows = []
    for ww in [w] + [float(x) for x in args.w_sweep.split(",") if x]:
        nb, sb = hf_generate(hf_llm, tok, PROMPTS[:1], args.sweep_tokens, do_sample=False)[:2]
        nf, sf, _ = ours(llm, slm, PROMPTS[:1], args.sweep_tokens, ww)
        ns, ss, st = ours(llm, slm, PROMPTS[:1], args.sweep_tokens, ww, speculative=g, draft="slm")
        row = {"w": ww, "llm_alone_tokens_per_s": nb / sb, "fused_x_llm_alone": (nf / sf) / (nb / sb),
               "spec_x_llm_alone": (ns / ss) / (nb / sb), "spec_x_fused": (ns / ss) / (nf / sf),
               "acceptance_rate": st.acceptance_rate, "tokens_per_llm_pass": ns / st.large_passes,
               "draft_lengths": st.draft_lengths}
        wrows.append(row)
        log(f"  w={ww:.4f}: fused {row['fused_x_llm_alone']:.3f}x, spec {row['spec_x_llm_alone']:.3f}x LLM alone, "
            f"acceptance {st.acceptance_rate}, {row['tokens_per_llm_pass']:.2f} tokens per LLM pass")
    report["weight_sweep"] = {"prompt": PROMPTS[0], "new_tokens": args.sweep_tokens, "decoding": "greedy", "rows": wrows}

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_report(report)
    print(text.getvalue(), end="")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        out.with_suffix(".txt").write_text(text.getvalue().lstrip("\n"))
        print(f"written: {out} and {out.with_suffix('.txt')}")
    return 0


def print_report(r: dict) -> None:
    print(f"\nLLM smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to float32) + SLM {r['slm'].get('name', r['slm'].get('spec'))}; "
          f"w = {r['weight']:.4f} ({r['weight_source']}); {r['new_tokens']} new tokens per prompt, greedy, EOS suppressed; "
          f"torch {r['torch']}, transformers {r['transformers']}, {r['threads']} thread(s); prompts: {r['prompts']}")
    for key, title in (("batch1", "batch 1 (prompts one at a time, methods interleaved)"), ("batch8", "batch 8 (left padding)")):
        if key not in r:
            continue
        print(f"\n{title}")
        print(f"{'method':58s} {'tokens/s':>9s} {'x LLM alone':>12s} {'x hf-assisted':>14s}")
        for k, v in r[key].items():
            xa = f"{v['x_hf_assisted']:.3f}" if "x_hf_assisted" in v else "-"
            extra = f"  acceptance {v['acceptance_rate']:.3f}" if v.get("acceptance_rate") is not None else ""
            extra += f", {v['tokens_per_llm_pass']:.2f} tokens/LLM pass" if v.get("tokens_per_llm_pass") else ""
            if v.get("draft_head_coverage") is not None:
                extra += (f", draft head {v['draft_vocab_median']:.0f} candidates, SLM best among them "
                          f"{v['draft_head_coverage']:.1%}")
            cyc = {d: c for d, c in (v.get("cycles_by_draft") or {}).items() if c}
            if len(cyc) > 1:
                extra += ", cycles: " + ", ".join(f"{d} {c}" for d, c in cyc.items())
            print(f"{k:58s} {v['tokens_per_s']:9.2f} {v['x_llm_alone']:12.3f} {xa:>14s}{extra}")
    for key, label in (("pass_cost_stock", "F.linear (stock)"), ("pass_cost", "arfuse generation kernels")):
        if key in r:
            pc = r[key]
            print(f"\none LLM pass over T new tokens, {label} (median of 7, ms): " + ", ".join(
                f"T={T}: {ms} ({pc['llm_relative_to_one_token'][T]}x)" for T, ms in pc["llm_ms_by_tokens"].items())
                  + f"; one SLM step: {pc['slm_one_token_ms']} ms ({pc['slm_relative_to_llm_step']}x an LLM step)")
    if "draft_agreement" in r:
        da = r["draft_agreement"]
        print(f"\nwhere drafts come right: positions of the fused greedy continuations ({da['prompts']} prompts x "
              f"{da['new_tokens']} tokens) where a source's next token is the fused model's")
        print(f"{'source':40s} {'positions':>10s} {'share':>7s} {'agree':>7s}")
        order = ["llm", "slm", "lookup, no match", "lookup, 1-gram match", "lookup, 2-gram match", "lookup, 3-gram match",
                 "hybrid (lookup if a match, else slm)"]
        for k, v in sorted(da["rows"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            print(f"{k:40s} {v['positions']:10d} {v['share_of_positions']:7.1%} {v['rate']:7.1%}")
    print(f"\nacceptance against g (prompt {r['acceptance_vs_g']['prompt'][:60]!r}..., {r['acceptance_vs_g']['new_tokens']} tokens)")
    print(f"{'mode':18s} {'g':>3s} {'acceptance':>11s} {'tokens/LLM pass':>16s} {'tokens/s':>9s} "
          f"{'draft ms/cycle':>15s} {'verify ms/cycle':>16s}")
    for row in r["acceptance_vs_g"]["rows"]:
        print(f"{row['mode']:18s} {row['g']:3d} {row['acceptance_rate']:11.3f} {row['tokens_per_llm_pass']:16.2f} "
              f"{row['tokens_per_s']:9.2f} {row.get('draft_ms_per_cycle', float('nan')):15.1f} "
              f"{row.get('verify_ms_per_cycle', float('nan')):16.1f}")
    if "weight_sweep" in r:
        ws = r["weight_sweep"]
        print(f"\nspeculation against w (greedy, SLM drafts, g auto, prompt {ws['prompt'][:60]!r}..., {ws['new_tokens']} tokens; "
              "each w is a different fused model)")
        print(f"{'w':>8s} {'fused x LLM':>12s} {'spec x LLM':>11s} {'spec x fused':>13s} {'acceptance':>11s} {'tokens/LLM pass':>16s}")
        for row in ws["rows"]:
            acc = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.3f}"
            print(f"{row['w']:8.4f} {row['fused_x_llm_alone']:12.3f} {row['spec_x_llm_alone']:11.3f} "
                  f"{row['spec_x_fused']:13.3f} {acc:>11s} {row['tokens_per_llm_pass']:16.2f}")


if __name__ == "__main__":
    sys.exit(main())
