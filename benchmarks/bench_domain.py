"""The paper's Table 2 setting: SmolLM2-135M fused with small models arfuse trained on its
tokenizer, in domain and out of domain. The LLM is never touched.

For every (SLM, benchmark) pair: the weight w is chosen (NLL-optimal, exact) on a validation
part and the gain is reported on a disjoint test part, with a 95% paired bootstrap interval over
blocks of 1024 tokens. All scoring is consecutive 1024-token blocks (--convention blocks), no
BOS, cached: a second run only recomputes the fusion (seconds).

    .venv/bin/python benchmarks/bench_domain.py \\
        [--slm kjv=runs/kjv-slm --slm shakespeare=runs/shakespeare-slm --slm enwiki=runs/zoo/enwiki-smollm2-2l256]

Benchmarks (validation part -> test part): King James Bible and tiny Shakespeare, the held-out
10% that no SLM trained on (kjv[90%:95%] -> kjv[95%:]); WikiText-2 (tokenized, the first 100,000
characters of valid -> the first 200,000 of test) and PTB (likewise). Writes
benchmarks/results/domain.json, benchmarks/results/domain.md and docs/img/domain_gain.png.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {   # name: (validation part, test part, the corpus an SLM must have trained on to be in domain)
    "kjv": ("kjv[90%:95%]", "kjv[95%:]", "kjv"),
    "tinyshakespeare": ("tinyshakespeare[90%:95%]", "tinyshakespeare[95%:]", "tinyshakespeare"),
    "wikitext2": ("wikitext2-valid[:100000]", "wikitext2-test[:200000]", "enwiki"),
    "ptb": ("ptb-valid[:100000]", "ptb-test[:200000]", None),
}
DEFAULT_SLMS = ["kjv=runs/kjv-slm", "shakespeare=runs/shakespeare-slm", "enwiki=runs/zoo/enwiki-smollm2-2l256"]


def slm_info(folder: Path) -> dict:
    """What the SLM's own arfuse.json and training log say about how it was made."""
    meta = json.loads((folder / "arfuse.json").read_text())
    log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return {"folder": str(folder), "arch": meta.get("arch"), "num_parameters": meta.get("num_parameters"),
            "train_data": meta["data"]["train"]["spec"],
            "steps": meta.get("step"), "val_ppl": meta.get("val_ppl"),
            "train_minutes": round(log[-1]["elapsed_s"] / 60, 1) if log else None,
            "stopped_early": meta.get("stopped_early")}


def fmt(x, nd=4):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--slm", action="append", metavar="NAME=FOLDER", help="an SLM (repeatable); default: "
                    + ", ".join(DEFAULT_SLMS))
    ap.add_argument("--only", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "domain_gain.png"))
    args = ap.parse_args(argv)

    import torch

    from arfuse.scoring.scorer import ScoreConfig
    from arfuse.tasks import EvalConfig, evaluate

    slms = []
    for item in args.slm or DEFAULT_SLMS:
        name, _, folder = item.partition("=")
        if not folder:
            ap.error(f"--slm {item!r}: give NAME=FOLDER, e.g. kjv=runs/kjv-slm")
        if not (Path(folder) / "arfuse.json").exists():
            if args.slm:
                ap.error(f"--slm {item}: {folder} is not a trained arfuse run (no arfuse.json); train it first")
            print(f"skipping {name}: {folder} not trained yet (see docs/training.md)")
            continue
        slms.append((name, Path(folder)))
    benches = args.only.split(",") if args.only else list(BENCHMARKS)
    score = ScoreConfig(window=1024, convention="blocks", bos="never")
    rows, t0 = [], time.time()
    for name, folder in slms:
        info = slm_info(folder)
        for bench in benches:
            valid, test, home = BENCHMARKS[bench]
            t1 = time.time()
            rep = evaluate(EvalConfig(large=args.large, smalls=[str(folder)], data=test, valid=valid, score=score),
                           progress=False)
            by = {r.kind: r for r in rep.rows}
            row = {"slm": name, "slm_info": info, "benchmark": bench, "valid": valid, "test": test,
                   "in_domain": home is not None and str(info["train_data"]).startswith(home),
                   "tokens": rep.data["scored"]["tokens"], "llm_ppl": by["large"].metrics["token_ppl"],
                   "slm_ppl": by["small"].metrics["token_ppl"], "fused_ppl": by["fused"].metrics["token_ppl"],
                   "gain_pct": by["fused"].gain_pct, "gain_ci": rep.gain_ci, "w": rep.weights[0], "k": rep.k,
                   "r": rep.param_ratio[0], "k_star_test": rep.k_star,
                   "domain_k_low": rep.domain_k[0] if rep.domain_k else None, "weight_source": rep.weight_source,
                   "windowing": rep.windowing, "curve": rep.curve, "seconds": round(time.time() - t1, 1)}
            rows.append(row)
            ci = rep.gain_ci
            print(f"{name:12s} {bench:16s} LLM {row['llm_ppl']:8.3f}  SLM {row['slm_ppl']:9.3f}  fused "
                  f"{row['fused_ppl']:8.3f}  gain {row['gain_pct']:+7.3f}% [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}]"
                  f"  w {row['w']:.6f}  k {fmt(row['k'], 2)}  ({row['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"large": args.large, "windowing": "consecutive blocks of 1024 (--convention blocks), BOS off",
              "command": "python benchmarks/bench_domain.py", "seconds": round(time.time() - t0, 1),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    (out / "domain.json").write_text(json.dumps(result, indent=1))
    md = ["| SLM (trained on) | params | benchmark (w chosen on -> reported on) | tokens | SmolLM2 PPL | SLM PPL | "
          "fused PPL | gain % [95% CI] | w | k | k* on test |", "|" + "---|" * 11]
    for r in rows:
        i, ci = r["slm_info"], r["gain_ci"]
        md.append(f"| {r['slm']} ({i['train_data']}, {i['steps']} steps, {i['train_minutes']} min) | "
                  f"{i['num_parameters'] / 1e6:.1f}M | {r['benchmark']}{' (in domain)' if r['in_domain'] else ''}: "
                  f"`{r['valid']}` -> `{r['test']}` | {r['tokens']:,} | {r['llm_ppl']:.3f} | {r['slm_ppl']:.2f} | "
                  f"{r['fused_ppl']:.3f} | {r['gain_pct']:+.2f} [{ci['ci_low']:+.2f}, {ci['ci_high']:+.2f}] | "
                  f"{r['w']:.4f} | {fmt(r['k'], 2)} | {fmt(r['k_star_test'], 2)} |")
    (out / "domain.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches), 3.4), squeeze=False)
        for ax, bench in zip(axes[0], benches):
            for r in (r for r in rows if r["benchmark"] == bench):
                if r["curve"]:
                    ax.plot(r["curve"]["k"], r["curve"]["gain_pct"], label=f"{r['slm']} SLM")
                    ax.plot([r["k"]], [r["gain_pct"]], "o", color=ax.lines[-1].get_color())
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{bench} (test part)")
            ax.set_xlabel("k = w / (1 - w)")
            lo = min([0.0] + [min(r["curve"]["gain_pct"]) for r in rows if r["benchmark"] == bench and r["curve"]])
            ax.set_ylim(max(lo, -3.0), None)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("perplexity gain over SmolLM2-135M, %")
        fig.suptitle("SmolLM2-135M + self-trained SLMs: gain against k (dot: the validation-chosen k)", fontsize=10)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    return result


if __name__ == "__main__":
    main()
