"""Perplexity of any registered fusion rule beside the linear one (`arfuse eval --rule NAME`).

The linear mixture of log p(target) is the fused log p(target), so cached records suffice for it.
Any other rule normalises over the whole vocabulary, so its fused log P(target) needs full
distributions: every model the rule reads in full runs once more over the data with the scorer's
windows (``arfuse.scoring.full``), the streams are zipped window by window, and the rule is
applied a few rows at a time; nothing of size V per token is kept for the test data. A model the
rule reads only through its argmax (the cosine rule's SLM) enters through its cached top-1.

Missing parameters are searched on --valid (else on the test data itself, said to be optimistic):
by the rule's own search where it has one (the cosine rule's exact power), else the weight w of two
models by a golden-section search on the validation NLL. The search keeps the validation data's
full distributions in memory (refused, with the fix, past MAX_VALID_BYTES).
"""
from __future__ import annotations

import numpy as np
import torch

from arfuse.errors import ArfuseError
from arfuse.fusion.registry import Rule, get_rule, make_rule
from arfuse.progress import token_progress
from arfuse.scoring.full import full_windows
from arfuse.scoring.scorer import score
from arfuse.data.text import load_dataset
from arfuse.tasks.metrics import bootstrap_ppl_gain, perplexity_metrics

MAX_VALID_BYTES = 3 * 2 ** 30
ROWS = 256  # rows per rule call: the temporaries are rows x V (float64 for the cosine rule)


def _check_complete(done: int, want: int, name: str) -> None:
    if done != want:
        raise ArfuseError(f"{name}: the full-distribution pass gives {done:,} targets, the cached records hold "
                          f"{want:,}; rescore with --no-cache")


def _check_targets(got: torch.Tensor, want: np.ndarray, at: int, name: str) -> None:
    if not np.array_equal(got.numpy(), want[at:at + len(got)]):
        raise ArfuseError(f"{name}: the full-distribution pass does not line up with the cached records at target "
                          f"{at}; rescore with --no-cache")


def _bound_rule(cfg, models) -> Rule:
    """``cfg.rule`` with ``cfg.rule_params`` (and ``cfg.weights`` for a weighted rule), bound to ``models``."""
    return make_rule(cfg.rule, cfg.weights if get_rule(cfg.rule).weighted else None, **cfg.rule_params).bind(models)


def _windows(rule: Rule, models, ds, cfg, recs, *, progress: bool):
    """Per window: the rule's inputs (a full (n, V) tensor per model it reads in full, the cached
    argmax ids (n,) of the others) and the targets, checked against the cached records."""
    target = recs[0].target
    full = [i for i in range(len(models)) if i not in rule.argmax_only]
    anchors = {i: torch.as_tensor(recs[i].topk_ids[:, 0]).long() for i in rule.argmax_only}
    streams = [full_windows(models[i], ds, cfg.score) for i in full]
    for i, s in zip(full, streams):
        _check_complete(s.n_targets, len(target), models[i].info.name)
    names = ", ".join(models[i].info.name for i in full)
    at = 0
    with token_progress(f"full distributions of {names} on {ds.name}", len(target), enabled=progress) as advance:
        for wins in zip(*streams):
            tgt = wins[0][1]
            for (_, t), i in zip(wins, full):
                _check_targets(t, target, at, models[i].info.name)
            lps = dict(zip(full, (lp for lp, _ in wins)))
            yield [lps[i] if i in lps else anchors[i][at:at + len(tgt)] for i in range(len(models))], tgt, at
            at += len(tgt)
            advance(len(tgt))
    _check_complete(at, len(target), models[full[0]].info.name)


def _fit(rule: Rule, models, ds, cfg, recs, *, progress: bool):
    """The rule with its missing parameters found on ``ds`` (its full distributions held in memory)."""
    n_full = len(models) - len(rule.argmax_only)
    n, vocab = len(recs[0].target), models[0].info.vocab_size
    need = n * vocab * 4 * n_full
    if need > MAX_VALID_BYTES:
        give = rule.flags(rule.missing()).replace(", ", " or ")
        raise ArfuseError(f"searching the {rule.name} rule's {', '.join(rule.missing())} keeps the full distributions "
                          f"of {ds.name} in memory: {n:,} tokens x {vocab:,} x {n_full} model(s) = "
                          f"{need / 2 ** 30:.1f} GiB; give a shorter --valid slice (e.g. [:20000] characters) "
                          f"or {give}")
    held: dict[int, torch.Tensor] = {}
    for inputs, tgt, at in _windows(rule, models, ds, cfg, recs, progress=progress):
        for i, x in enumerate(inputs):
            if i not in rule.argmax_only:
                if i not in held:  # filled window by window: one N x V copy per model
                    held[i] = torch.empty(n, x.shape[-1])
                held[i][at:at + len(tgt)] = x
    inputs = [held[i] if i in held else torch.as_tensor(recs[i].topk_ids[:, 0]).long() for i in range(len(models))]
    return rule.fit(inputs, torch.as_tensor(recs[0].target).long())


def _fused_targets(rule: Rule, models, ds, cfg, recs, *, progress: bool) -> np.ndarray:
    """log P(target) of the fused model at every cached position of ``ds`` (float64)."""
    out = np.empty(len(recs[0].target), np.float64)
    for inputs, tgt, at in _windows(rule, models, ds, cfg, recs, progress=progress):
        for a in range(0, len(tgt), ROWS):  # a few rows at a time
            b = min(len(tgt), a + ROWS)
            out[at + a:at + b] = rule.target_logprobs([x[a:b] for x in inputs], tgt[a:b]).numpy()
    return out


def add_rule_row(report, cfg, *, progress: bool = True) -> None:
    """Append the fused row of ``cfg.rule`` (any registered rule of causal LMs) to ``report.rows``
    and set ``report.rule`` (its name, parameters, where they came from, the gain's interval).

    ``report`` is the perplexity head's report of the same ``cfg`` (its first row the LLM alone);
    the records are the cached ones it scored, the full distributions are recomputed here."""
    from arfuse.adapters import load_model
    from arfuse.tasks.report import Row

    get_rule(cfg.rule)  # an unknown name fails before any model loads
    models = [load_model(s, device=cfg.device, dtype=cfg.dtype) for s in [cfg.large, *cfg.smalls]]
    rule = _bound_rule(cfg, models)
    data = load_dataset(cfg.data)
    valid = load_dataset(cfg.valid) if cfg.valid else None

    def records(ds):
        return [score(m, ds, cfg.score, batch_size=cfg.batch_size, use_cache=cfg.use_cache, progress=False)
                for m in models]

    if rule.missing():
        rule.check_fit(len(models))
        fit_ds = valid or data
        fit = _fit(rule, models, fit_ds, cfg, records(fit_ds), progress=progress)
        rule = fit.rule
        source = (f"{fit.how} on the validation data, {fit_ds.name}" if valid
                  else f"NLL-optimal on the test data itself ({fit_ds.name}): no --valid given, so the gain is "
                       "optimistic" + ("" if fit.exact else f"; {fit.how}"))
    else:
        source = rule.given()
    recs = records(data)
    out = _fused_targets(rule, models, data, cfg, recs, progress=progress)
    rl = recs[0]
    base = report.rows[0].metrics["token_ppl"]
    m = perplexity_metrics(out, rl.nbytes, rl.nchars, rl.nwords)
    report.rows.append(Row(rule.label(), "rule", m, 100.0 * (1.0 - m["token_ppl"] / base), rule.weights))
    ci = bootstrap_ppl_gain(rl.logp.astype(np.float64), out, block=cfg.score.window)
    report.rule = {"name": rule.name, "params": rule.settings(), "source": source, "gain_ci": ci}
