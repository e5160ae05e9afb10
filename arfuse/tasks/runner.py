"""Run a benchmark task (LAMBADA, ARC, CBT) for a large model alone and fused with a small one.

The weight ratio k is chosen on a validation part of the examples (exactly, from the
accuracy curve) and the fused model is reported on the disjoint rest, with a paired
bootstrap 95% interval for its change over the large model alone. Any other registered rule
(``--rule``): multiple choice fuses the answer distributions and takes the most accurate w on
a grid of the validation part; LAMBADA fuses full next-token distributions at the target
tokens, its parameters NLL-optimal on the validation part (``arfuse.tasks.lambada``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.formatting import fmt_k
from arfuse.fusion.linear import LinearRule, w_to_k
from arfuse.fusion.registry import Rule, available_rules, get_rule, make_rule, resolve_weights
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
    rule: str = "linear"            # any registered fusion rule (arfuse.fusion.available_rules())
    rule_params: dict = field(default_factory=dict)
    weight: float | None = None     # the LLM's weight w, fixed (None: chosen on the validation part)


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


def _fused_accuracy(iv: Intervals, valid: np.ndarray, test: np.ndarray, n_boot: int, seed: int,
                    w: float | None = None) -> dict:
    """Choose k on the validation part (accuracy-optimal, exact), or take the given ``w``; report
    on the test part."""
    cv = curve_from_intervals(iv.subset(valid))
    if w is None:
        best = cv.best()
        k, fixed = best.k, {"k_range_valid": list(best.k_range), "w": best.k / (1 + best.k)}
        acc_valid = best.accuracy
    else:
        k = w_to_k(w)
        fixed = {"w": w, "chosen_on": "given (--weight)"}
        acc_valid = cv.accuracy_at(k)
    tiv = iv.subset(test)
    ct = curve_from_intervals(tiv)
    fused = tiv.right_at(k)
    boot = paired_bootstrap(fused, tiv.llm_right, n_boot=n_boot, seed=seed)
    tb = ct.best()
    return {
        "k": k, **fixed,
        "valid": {"n": len(valid), "acc_llm": cv.acc_llm, "acc_fused": acc_valid, "exact": cv.exact},
        "test": {"n": len(test), "acc_llm": ct.acc_llm, "acc_slm": ct.acc_slm, "acc_fused": float(fused.mean()),
                 "undetermined": int((tiv.possibly_right_at(k) & ~fused).sum()), **boot},
        "test_oracle": {"k_star": tb.k, "k_range": list(tb.k_range), "acc": tb.accuracy, "gain": tb.gain,
                        "domain": ct.domain(), "exact": ct.exact, "n_thresholds": int(len(ct.thresholds))},
        "three_sets_test": three_sets(tiv, k),
    }


def run_task(cfg: TaskRunConfig, *, progress: bool = True) -> dict:
    """Score the task's requests once per model (cached), report each model alone and, with a small
    model, the fused one under ``cfg.rule`` on the test part."""
    from arfuse.adapters import load_model

    task = load_task(cfg.task)
    path = resolve_data(task, cfg.data)
    examples, reqs, prompt = _read_task(task, path, cfg.limit)
    specs = [cfg.large] + ([cfg.small] if cfg.small else [])
    rule = _task_rule(cfg, task, len(specs))  # checked before any model loads
    models = [load_model(s, device=cfg.device, dtype=cfg.dtype) for s in specs]
    if rule is not None and task.kind == "lambada":
        rule.bind(models)  # token-level fusion: one vocabulary (and whatever the rule reads of the models)
    all_reqs = _requests_per_model(cfg, reqs, len(models))
    from arfuse.tasks.loglik import score_continuations

    conts = [score_continuations(m, rq, cfg.score, name=f"{task.name}", batch_size=cfg.batch_size,
                                 use_cache=cfg.use_cache, progress=progress) for m, rq in zip(models, all_reqs)]
    report = _report_head(cfg, task, path, prompt, specs, models, conts, len(examples))
    per_model = _alone(report, task, examples, models, conts)
    if cfg.small_context_words is not None and len(models) == 2:
        label = f"{models[1].info.name} (last {cfg.small_context_words} words of context)"
        report["alone"][1]["name"] = label
        report["models"][1]["name"] = label
    if rule is None:
        return report
    report["param_ratio"] = models[0].num_parameters / models[1].num_parameters
    valid, test, split_desc = parse_split(cfg.valid_split, len(examples))
    report["split"] = split_desc
    if isinstance(rule, LinearRule):
        _fuse_linear(report, task, conts, per_model, valid, test, cfg)
        if task.kind != "lambada":
            _fuse_segments_mc(report, examples, models, all_reqs, conts, per_model, valid, test, cfg)
    elif task.kind == "lambada":
        _fuse_rule_lambada(report, rule, models, all_reqs, conts, per_model, valid, test, cfg, progress)
    else:
        for norm, key in ((False, "acc"), (True, "acc_norm")):
            report["fused"][key] = _rule_accuracy_mc(rule, per_model, norm, valid, test, cfg)
        chosen = report["fused"]["acc"]["chosen_on"]
        report["rule"] = _rule_info(rule, chosen + ("; acc and acc_norm each choose their own w" if rule.missing()
                                                    else ""))
    return report


def _read_task(task: TaskConfig, path: Path, limit: int | None):
    """The task's examples, its (context, continuation) requests and the prompt format's description."""
    from arfuse.tasks import lambada, multiple_choice as mc

    if task.kind == "lambada":
        examples = lambada.read_lambada(path, limit)
        return examples, lambada.requests(examples), PROMPTS["lambada"]
    examples = (mc.read_arc(path, task.prompt, task.choice, limit) if task.format == "arc"
                else mc.read_cbt(path, limit))
    return examples, mc.requests(examples), PROMPTS[task.format]


def _task_rule(cfg: TaskRunConfig, task: TaskConfig, n_models: int) -> Rule | None:
    """``cfg.rule`` with its parameters and weight checked (None without a small model)."""
    cls = get_rule(cfg.rule)  # an unknown name fails with the choices, with or without --small
    if n_models == 1:
        if cfg.weight is not None:
            raise ArfuseError("--weight fuses the large model with a small one: give --small as well")
        return None
    if cfg.weight is not None and not cls.weighted:
        raise ArfuseError(f"the {cls.name} rule takes no weight ({cls.summary}): drop --weight")
    if task.kind != "lambada" and cls.over_tokens:
        others = [n for n in available_rules() if not get_rule(n).over_tokens]
        raise ArfuseError(f"the {cls.name} rule reads the tokens themselves ({cls.summary}): it fuses next-token "
                          f"distributions, not the answers of a multiple-choice task; use one of {', '.join(others)}")
    if task.kind == "lambada" and not cls.same_vocab:
        raise ArfuseError(f"the {cls.name} rule fuses models with different tokenizers; LAMBADA's fused argmax is "
                          "token by token, over one vocabulary: fuse models that share a tokenizer")
    ws = resolve_weights(cfg.weight, None, n_models) if cls.weighted else None
    params = {k: v for k, v in cfg.rule_params.items() if v is not None}
    rule = make_rule(cfg.rule, ws, **params).check_models(n_models)
    if task.kind == "lambada":
        rule.check_fit(n_models)  # what its search cannot find fails before any scoring
    elif [m for m in rule.missing() if m != "weights"]:
        raise _missing_error(rule)
    return rule


def _requests_per_model(cfg: TaskRunConfig, reqs: list, n_models: int) -> list[list]:
    all_reqs = [reqs] * max(n_models, 2)
    if cfg.small_context_words is not None:
        if cfg.small_context_words < 1:
            raise ArfuseError(f"--small-context-words must be at least 1, got {cfg.small_context_words}")
        all_reqs[1] = [(_last_words(c, cfg.small_context_words), x) for c, x in reqs]
    return all_reqs


def _report_head(cfg: TaskRunConfig, task: TaskConfig, path: Path, prompt: str, specs, models, conts, n: int) -> dict:
    return {
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


def _alone(report: dict, task: TaskConfig, examples, models, conts) -> list:
    """Each model alone into ``report``; returns per model (loglik, right) for LAMBADA, MCScores otherwise."""
    from arfuse.tasks import lambada, multiple_choice as mc

    n = len(examples)
    per_model = []
    for m, c in zip(models, conts):
        if task.kind == "lambada":
            top1 = c.records.topk_ids[:, 0] == c.records.target
            right = np.ones(n, bool)
            np.logical_and.at(right, c.request, top1)
            ll = c.loglik()
            per_model.append((ll, right))
            report["per_example"].append({"acc": right.astype(int).tolist(), "loglik": ll.tolist()})
            report["alone"].append({"name": m.info.name, **lambada.word_metrics(ll, right),
                                    "target_tokens": int(c.n_tokens().sum())})
        else:
            s = mc.mc_scores(examples, c.loglik())
            per_model.append(s)
            report["per_example"].append({"acc": s.right(False).astype(int).tolist(),
                                          "acc_norm": s.right(True).astype(int).tolist()})
            report["alone"].append({"name": m.info.name, "acc": float(s.right(False).mean()),
                                    "acc_norm": float(s.right(True).mean()), "n": n})
    return per_model


def _fuse_linear(report: dict, task: TaskConfig, conts, per_model, valid, test, cfg: TaskRunConfig) -> None:
    """The AR mixture: exact accuracy curves (k chosen on the validation part, or --weight)."""
    if task.kind == "lambada":
        iv = combine_groups(intervals_from_records(conts[0].records, conts[1].records), conts[0].request)
        report["fused"]["acc"] = _fused_accuracy(iv, valid, test, cfg.n_boot, cfg.seed, cfg.weight)
        report["fused"]["perplexity"] = _fused_perplexity(conts, valid, test, cfg.weight)
    else:
        for norm, key in ((False, "acc"), (True, "acc_norm")):
            sl, ss = per_model
            iv = intervals_from_probs(sl.probs(norm), ss.probs(norm), sl.gold, valid=sl.valid)
            report["fused"][key] = _fused_accuracy(iv, valid, test, cfg.n_boot, cfg.seed, cfg.weight)


SEGMENT_ROW = "segment mixture (per option)"


def _fuse_segments_mc(report: dict, examples, models, all_reqs, conts, per_model, valid, test,
                      cfg: TaskRunConfig) -> None:
    """The segment mixture within each option, next to the whole-option fusion over answers: each
    option cut at the byte offsets where both models end a token, ll_seg(w) = sum over its segments
    of log(w p_L(seg) + (1 - w) p_S(seg)); the pick is the argmax of ll_seg(w) (acc) or of
    ll_seg(w) / completion_len (acc_norm). w: the most accurate on the validation part over
    ``W_GRID`` (ties: the largest), or --weight; reported on the test part like the rule rows.
    Computed for every pair: with one tokenizer each segment is one token (the token-level linear
    mixture of the option's tokens)."""
    from arfuse.tasks import multiple_choice as mc

    same = models[0].tokenizer_fingerprint() == models[1].tokenizer_fingerprint()
    segs = mc.option_segments(conts, token_level=same)
    out = {"name": SEGMENT_ROW, "tokenizers": "one" if same else "different", **segs.totals,
           "description": ("each option cut at the byte offsets where both models end a token; ll_seg(w) = sum over "
                           "segments of log(w p_L(seg) + (1 - w) p_S(seg)); argmax over options of ll_seg(w) (acc) "
                           "or ll_seg(w) / completion_len (acc_norm)"
                           + ("; one tokenizer: each segment is one token (the token-level linear mixture)"
                              if segs.token_level else ""))}
    for norm, key in ((False, "acc"), (True, "acc_norm")):
        base = per_model[0]
        if cfg.weight is None:
            w, _ = mc.choose_segment_weight(segs, base, examples, norm, valid)
            chosen = (f"the most accurate w on the validation part, on a grid of {len(mc.W_GRID)} points in [0, 1] "
                      "(ties: the largest w); not an exact curve")
        else:
            w, chosen = float(cfg.weight), "given (--weight)"
        both = np.union1d(valid, test)
        right = mc.segment_right(segs, base, examples, [w], norm, rows=both)[0]
        llm, slm = per_model[0].right(norm), per_model[1].right(norm)
        boot = paired_bootstrap(right[test], llm[test], n_boot=cfg.n_boot, seed=cfg.seed)
        out[key] = {"rule": f"{SEGMENT_ROW}, w = {w:.4g}", "w": w, "k": w_to_k(w), "chosen_on": chosen,
                    "valid": {"n": len(valid), "acc_llm": float(llm[valid].mean()),
                              "acc_fused": float(right[valid].mean())},
                    "test": {"n": len(test), "acc_llm": float(llm[test].mean()), "acc_slm": float(slm[test].mean()),
                             "acc_fused": float(right[test].mean()), **boot}}
    report["segment_mixture"] = out


def _missing_error(rule: Rule) -> ArfuseError:
    missing = [m for m in rule.missing() if m != "weights"]
    return ArfuseError(f"the {rule.name} rule needs {', '.join(missing)} ({rule.flags(missing)}): on a multiple-"
                       "choice task arfuse chooses only the weight w, on the validation part")


def _rule_accuracy(rule: Rule, chosen: str, fused_test, llm_right, slm_right, valid, test, cfg: TaskRunConfig,
                   valid_info: dict) -> dict:
    """The fused model's accuracy on the test part with the paired bootstrap of its change."""
    boot = paired_bootstrap(fused_test, llm_right[test], n_boot=cfg.n_boot, seed=cfg.seed)
    w = rule.weights[0] if rule.weights is not None and len(rule.weights) == 2 else None
    return {"rule": rule.describe(), "w": w, "k": None if w is None else w_to_k(w), "chosen_on": chosen,
            "valid": {"n": len(valid), **valid_info},
            "test": {"n": len(test), "acc_llm": float(llm_right[test].mean()), "acc_slm": float(slm_right[test].mean()),
                     "acc_fused": float(np.mean(fused_test)), **boot}}


def _rule_accuracy_mc(rule: Rule, scores, norm: bool, valid, test, cfg: TaskRunConfig) -> dict:
    """Any rule over the answer distributions (softmax of ll, or of ll / length for acc_norm)."""
    from arfuse.tasks.multiple_choice import choose_weight, rule_right

    fitted, chosen = (choose_weight(rule, scores, norm, valid) if rule.missing() else (rule, rule.given()))
    fused = rule_right(fitted, scores, norm)
    llm, slm = scores[0].right(norm), scores[1].right(norm)
    return _rule_accuracy(fitted, chosen, fused[test], llm, slm, valid, test, cfg,
                          {"acc_llm": float(llm[valid].mean()), "acc_fused": float(fused[valid].mean())})


def _fuse_rule_lambada(report: dict, rule: Rule, models, all_reqs, conts, per_model, valid, test,
                       cfg: TaskRunConfig, progress: bool) -> None:
    """Any rule of one vocabulary at LAMBADA's target tokens: full distributions, one forward per passage."""
    from arfuse.tasks import lambada

    if rule.missing():
        fit = lambada.rule_fit(rule, models, all_reqs, conts, cfg.score, valid, progress=progress)
        rule, chosen = fit.rule, f"{fit.how}, on the validation part's target tokens (acc and perplexity alike)"
    else:
        chosen = rule.given()
    right, ll = lambada.rule_results(rule, models, all_reqs, conts, cfg.score, test, progress=progress)
    (ll_l, right_l), (ll_s, right_s) = per_model
    report["fused"]["acc"] = _rule_accuracy(rule, chosen, right, right_l, right_s, valid, test, cfg, {})
    base, fused = math.exp(-float(ll_l[test].mean())), math.exp(-float(ll.mean()))
    acc = report["fused"]["acc"]
    report["fused"]["perplexity"] = {
        "w": acc["w"], "k": acc["k"], "chosen_on": chosen,
        "test": {"ppl_llm": base, "ppl_slm": math.exp(-float(ll_s[test].mean())), "ppl_fused": fused,
                 "gain_pct": 100 * (1 - fused / base)}}
    report["rule"] = _rule_info(rule, chosen)


def _rule_info(rule: Rule, source: str) -> dict:
    return {"name": rule.name, "describe": rule.describe(), "params": rule.settings(), "source": source}


def _last_words(context: str, n: int) -> str:
    """The last ``n`` space-separated words of a context, keeping its trailing space if any."""
    words = context.split(" ")
    tail = " ".join(words[-(n + 1):]) if context.endswith(" ") else " ".join(words[-n:])
    return tail


def _fused_perplexity(conts, valid: np.ndarray, test: np.ndarray, w: float | None = None) -> dict:
    """Target perplexity of the token-level fused model at the NLL-optimal weight of the validation
    part (or the given ``w``)."""
    from arfuse.fusion import linear
    from arfuse.search import optimal_weight

    lpl = conts[0].records.logp.astype(np.float64)
    lps = conts[1].records.logp.astype(np.float64)
    req = conts[0].request
    if w is None:
        vmask = np.isin(req, valid)
        opt = optimal_weight(lpl[vmask], lps[vmask])
        w, k, chosen = opt.w, opt.k, "validation part (NLL-optimal over target tokens)"
    else:
        k, chosen = w_to_k(w), "given (--weight)"
    fused = linear([lpl, lps], [w, 1 - w])
    n_req = conts[0].n_requests

    def ppl(lp, idx):
        per = np.bincount(req, weights=lp, minlength=n_req)[idx]
        return math.exp(-float(per.mean()))

    base, f = ppl(lpl, test), ppl(fused, test)
    return {"w": w, "k": k, "chosen_on": chosen,
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
        lines += _fused_markdown(r)
    return "\n".join(lines) + "\n"


def _fused_markdown(r: dict) -> list[str]:
    lines = ["", f"fused (r = {r['param_ratio']:.1f}); {r['split']}:", ""]
    if "rule" in r:
        lines[-1:] = [f"rule: {r['rule']['describe']}; chosen: {r['rule']['source']}", ""]
    lines += ["| metric | k (valid) | LLM (test) | fused (test) | change | 95% CI | fixed / broken | k* on test |",
              "|---|---:|---:|---:|---:|---|---:|---:|"]
    for key in ("acc", "acc_norm"):
        if key in r["fused"]:
            f = r["fused"][key]
            t = f["test"]
            k_star = f["test_oracle"]["k_star"] if "test_oracle" in f else None
            lines.append(f"| {key} | {fmt_k(f['k'])} | {t['acc_llm']:.4f} | {t['acc_fused']:.4f} | "
                         f"{100 * t['delta']:+.2f} pt | [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}] | "
                         f"{t['fixed']} / {t['broken']} | {fmt_k(k_star)} |")
    seg = r.get("segment_mixture")
    if seg:
        for key in ("acc", "acc_norm"):
            f = seg[key]
            t = f["test"]
            lines.append(f"| {key}, {SEGMENT_ROW} | {fmt_k(f['k'])} | {t['acc_llm']:.4f} | {t['acc_fused']:.4f} | "
                         f"{100 * t['delta']:+.2f} pt | [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}] | "
                         f"{t['fixed']} / {t['broken']} | - |")
        lines += ["", f"acc, acc_norm: whole-option fusion over answers (each model's softmax over the options); "
                      f"{SEGMENT_ROW}: {seg['description']}; tokenizers: {seg['tokenizers']}; {seg['segments']:,} "
                      f"segments of {seg['options']:,} options, tokens per model {seg['tokens_per_model']}; w chosen: "
                      f"{seg['acc']['chosen_on']}"]
    if "perplexity" in r["fused"]:
        p = r["fused"]["perplexity"]
        lines.append(f"| perplexity | {fmt_k(p['k'])} | {p['test']['ppl_llm']:.3f} | {p['test']['ppl_fused']:.3f} | "
                     f"{p['test']['gain_pct']:+.2f} % | | | |")
    return lines
