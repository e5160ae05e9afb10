"""Run a benchmark task (LAMBADA, ARC, CBT) for a large model alone and fused with a small one.

The weight ratio k is chosen on a validation part of the examples (exactly, from the
accuracy curve) and the fused model is reported on the disjoint rest, with a paired
bootstrap 95% interval for its change over the large model alone.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.scoring.scorer import ScoreConfig
from arfuse.search.accuracy import (
    Intervals, combine_groups, curve_from_intervals, intervals_from_probs, intervals_from_records, paired_bootstrap,
    three_sets,
)
from arfuse.tasks.configs import TaskConfig, load_task

PROMPTS = {
    "lambada": "lm-eval lambada_openai: context = passage without its last word; target = ' ' + last word",
    "arc": "lm-eval arc_easy/arc_challenge: 'Question: {stem}\\nAnswer:' then ' {choice}' per option",
    "cbt": "20 context sentences + the query up to XXXXX; each option = candidate + the query's rest",
}


@dataclass
class TaskRunConfig:
    task: str
    large: str
    small: str | None = None
    data: str | None = None
    limit: int | None = None
    valid_split: str = "0:20%"      # examples (by index) the weight is chosen on; the rest is reported
    score: ScoreConfig = field(default_factory=lambda: ScoreConfig(window=1024, stride=512, bos="auto", topk=32))
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    use_cache: bool = True
    n_boot: int = 10000
    seed: int = 0
    small_context_words: int | None = None  # the small model reads only the last N words of each context


def resolve_data(task: TaskConfig, data: str | None) -> Path:
    from arfuse.paths import shared_data_root

    if data:
        p = Path(data).expanduser()
        if not p.exists():
            raise ArfuseError(f"--data {data} does not exist: check the path")
        return p
    root = shared_data_root()
    if root is not None and (root / task.data).exists():
        return root / task.data
    raise ArfuseError(f"task {task.name!r} reads {task.data} under the shared data folder, which is not there: "
                      f"pass the file with --data PATH (or set ARFUSE_DATA)")


def parse_split(spec: str, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Validation and test indices from 'a:b' (example indices or percentages); 'none' = test only."""
    if spec in ("none", ""):
        idx = np.arange(n)
        return idx, idx, "none: k is chosen on the reported examples themselves (optimistic)"
    m = re.fullmatch(r"\s*([^:]*):([^:]*)\s*", spec)
    if not m:
        raise ArfuseError(f"--valid-split {spec!r}: give a:b, e.g. 0:20% or 0:500 (or none)")

    def bound(tok: str, default: int) -> int:
        tok = tok.strip()
        if not tok:
            return default
        try:
            v = float(tok[:-1]) / 100 * n if tok.endswith("%") else float(tok)
        except ValueError:
            raise ArfuseError(f"--valid-split {spec!r}: bounds are example indices or percentages") from None
        return int(round(min(max(v, 0), n)))

    a, b = bound(m[1], 0), bound(m[2], n)
    if not 0 < b - a < n:
        raise ArfuseError(f"--valid-split {spec!r} selects {max(b - a, 0)} of {n} examples: it must leave both a "
                          "validation and a test part")
    valid = np.arange(a, b)
    test = np.setdiff1d(np.arange(n), valid)
    return valid, test, f"examples {a}..{b - 1} choose k ({len(valid)}); the other {len(test)} are reported"


def _fused_accuracy(iv: Intervals, valid: np.ndarray, test: np.ndarray, n_boot: int, seed: int) -> dict:
    """Choose k on the validation part (accuracy-optimal, exact), report on the test part."""
    cv = curve_from_intervals(iv.subset(valid))
    best = cv.best()
    tiv = iv.subset(test)
    ct = curve_from_intervals(tiv)
    fused = tiv.right_at(best.k)
    boot = paired_bootstrap(fused, tiv.llm_right, n_boot=n_boot, seed=seed)
    tb = ct.best()
    return {
        "k": best.k, "k_range_valid": list(best.k_range), "w": best.k / (1 + best.k),
        "valid": {"n": len(valid), "acc_llm": cv.acc_llm, "acc_fused": best.accuracy, "exact": cv.exact},
        "test": {"n": len(test), "acc_llm": ct.acc_llm, "acc_slm": ct.acc_slm, "acc_fused": float(fused.mean()),
                 "undetermined": int((tiv.possibly_right_at(best.k) & ~fused).sum()), **boot},
        "test_oracle": {"k_star": tb.k, "k_range": list(tb.k_range), "acc": tb.accuracy, "gain": tb.gain,
                        "domain": ct.domain(), "exact": ct.exact, "n_thresholds": int(len(ct.thresholds))},
        "three_sets_test": three_sets(tiv, best.k),
    }


def run_task(cfg: TaskRunConfig, *, progress: bool = True) -> dict:
    from arfuse.adapters import load_model
    from arfuse.tasks import lambada, multiple_choice as mc
    from arfuse.tasks.loglik import score_continuations

    task = load_task(cfg.task)
    path = resolve_data(task, cfg.data)
    if task.kind == "lambada":
        examples = lambada.read_lambada(path, cfg.limit)
        reqs = lambada.requests(examples)
        prompt = PROMPTS["lambada"]
    else:
        examples = (mc.read_arc(path, task.prompt, task.choice, cfg.limit) if task.format == "arc"
                    else mc.read_cbt(path, cfg.limit))
        reqs = mc.requests(examples)
        prompt = PROMPTS[task.format]
    n = len(examples)
    specs = [cfg.large] + ([cfg.small] if cfg.small else [])
    models = [load_model(s, device=cfg.device, dtype=cfg.dtype) for s in specs]
    if task.kind == "lambada" and len(models) == 2:
        from arfuse.tasks.perplexity import check_same_vocab

        check_same_vocab(models)  # token-level argmax needs one vocabulary
    all_reqs = [reqs, reqs]
    if cfg.small_context_words is not None:
        if cfg.small_context_words < 1:
            raise ArfuseError(f"--small-context-words must be at least 1, got {cfg.small_context_words}")
        all_reqs[1] = [(_last_words(c, cfg.small_context_words), x) for c, x in reqs]
    conts = [score_continuations(m, rq, cfg.score, name=f"{task.name}", batch_size=cfg.batch_size,
                                 use_cache=cfg.use_cache, progress=progress) for m, rq in zip(models, all_reqs)]
    report: dict = {
        "task": task.name, "description": task.description, "config_file": task.source, "data": str(path),
        "n_examples": n, "limit": cfg.limit, "prompt_format": prompt,
        "scoring": {"bos": [bool(c.records.meta["bos"]) for c in conts], "topk": cfg.score.topk,
                    "window": "whole context (each request fits one window)"},
        "models": [{"spec": s, "name": m.info.name, "num_parameters": m.num_parameters} for s, m in zip(specs, models)],
        "small_context_words": cfg.small_context_words,
        "alone": [], "fused": {}, "per_example": [],
        "run_config": {"large": cfg.large, "small": cfg.small, "valid_split": cfg.valid_split, "topk": cfg.score.topk,
                       "limit": cfg.limit, "bos": cfg.score.bos},
    }
    if task.kind == "lambada":
        per_model = []
        for m, c in zip(models, conts):
            top1 = c.records.topk_ids[:, 0] == c.records.target
            right = np.ones(n, bool)
            np.logical_and.at(right, c.request, top1)
            ll = c.loglik()
            per_model.append((ll, right))
            report["per_example"].append({"acc": right.astype(int).tolist(), "loglik": ll.tolist()})
            report["alone"].append({"name": m.info.name, **lambada.word_metrics(ll, right),
                                    "target_tokens": int(c.n_tokens().sum())})
    else:
        per_model = []
        for m, c in zip(models, conts):
            s = mc.mc_scores(examples, c.loglik())
            per_model.append(s)
            report["per_example"].append({"acc": s.right(False).astype(int).tolist(),
                                          "acc_norm": s.right(True).astype(int).tolist()})
            report["alone"].append({"name": m.info.name, "acc": float(s.right(False).mean()),
                                    "acc_norm": float(s.right(True).mean()), "n": n})
    if cfg.small_context_words is not None and len(models) == 2:
        label = f"{models[1].info.name} (last {cfg.small_context_words} words of context)"
        report["alone"][1]["name"] = label
        report["models"][1]["name"] = label
    if len(models) == 1:
        return report
    report["param_ratio"] = models[0].num_parameters / models[1].num_parameters
    valid, test, split_desc = parse_split(cfg.valid_split, n)
    report["split"] = split_desc
    if task.kind == "lambada":
        iv = combine_groups(intervals_from_records(conts[0].records, conts[1].records), conts[0].request)
        report["fused"]["acc"] = _fused_accuracy(iv, valid, test, cfg.n_boot, cfg.seed)
        report["fused"]["perplexity"] = _fused_perplexity(conts, valid, test)
    else:
        for norm, key in ((False, "acc"), (True, "acc_norm")):
            sl, ss = per_model
            iv = intervals_from_probs(sl.probs(norm), ss.probs(norm), sl.gold, valid=sl.valid)
            report["fused"][key] = _fused_accuracy(iv, valid, test, cfg.n_boot, cfg.seed)
    return report


def _last_words(context: str, n: int) -> str:
    """The last ``n`` space-separated words of a context, keeping its trailing space if any."""
    words = context.split(" ")
    tail = " ".join(words[-(n + 1):]) if context.endswith(" ") else " ".join(words[-n:])
    return tail


def _fused_perplexity(conts, valid: np.ndarray, test: np.ndarray) -> dict:
    """Target perplexity of the token-level fused model at the NLL-optimal weight of the validation part."""
    from arfuse.fusion import linear
    from arfuse.search import optimal_weight

    lpl = conts[0].records.logp.astype(np.float64)
    lps = conts[1].records.logp.astype(np.float64)
    req = conts[0].request
    vmask = np.isin(req, valid)
    opt = optimal_weight(lpl[vmask], lps[vmask])
    fused = linear([lpl, lps], [opt.w, 1 - opt.w])
    n_req = conts[0].n_requests

    def ppl(lp, idx):
        per = np.bincount(req, weights=lp, minlength=n_req)[idx]
        return math.exp(-float(per.mean()))

    base, f = ppl(lpl, test), ppl(fused, test)
    return {"w": opt.w, "k": opt.k, "chosen_on": "validation part (NLL-optimal over target tokens)",
            "test": {"ppl_llm": base, "ppl_slm": ppl(lps, test), "ppl_fused": f, "gain_pct": 100 * (1 - f / base)}}


def report_markdown(r: dict) -> str:
    """A short Markdown summary of ``run_task``'s report."""
    lines = [f"### {r['task']}: {r['description']}", "",
             f"data: `{r['data']}` ({r['n_examples']} examples{'' if r['limit'] is None else ', --limit ' + str(r['limit'])}); "
             f"prompt: {r['prompt_format']}; BOS {r['scoring']['bos']}", ""]
    metrics = [k for k in ("acc", "acc_norm", "perplexity") if k in r["alone"][0]]
    lines.append("| model | params | " + " | ".join(metrics) + " |")
    lines.append("|---|---:|" + "---:|" * len(metrics))
    for info, m in zip(r["models"], r["alone"]):
        lines.append(f"| {m['name']} | {info['num_parameters'] / 1e6:.2f}M | " + " | ".join(f"{m[k]:.4f}" for k in metrics) + " |")
    if r["fused"]:
        lines += ["", f"fused (r = {r['param_ratio']:.1f}); {r['split']}:", "",
                  "| metric | k (valid) | LLM (test) | fused (test) | change | 95% CI | fixed / broken | k* on test |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for key in ("acc", "acc_norm"):
            if key in r["fused"]:
                f = r["fused"][key]
                t = f["test"]
                lines.append(f"| {key} | {_fk(f['k'])} | {t['acc_llm']:.4f} | {t['acc_fused']:.4f} | "
                             f"{100 * t['delta']:+.2f} pt | [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}] | "
                             f"{t['fixed']} / {t['broken']} | {_fk(f['test_oracle']['k_star'])} |")
        if "perplexity" in r["fused"]:
            p = r["fused"]["perplexity"]
            lines.append(f"| perplexity | {_fk(p['k'])} | {p['test']['ppl_llm']:.3f} | {p['test']['ppl_fused']:.3f} | "
                         f"{p['test']['gain_pct']:+.2f} % | | | |")
    return "\n".join(lines) + "\n"


def _fk(k: float) -> str:
    return "inf" if math.isinf(k) else f"{k:.4g}"


def asdict_safe(x):
    from arfuse.tasks.perplexity import json_safe

    return json_safe(asdict(x) if hasattr(x, "__dataclass_fields__") else x)
