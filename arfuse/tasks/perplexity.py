"""The causal-LM head: perplexity of a large model fused with smaller ones, on cached records.

Each model scores the text once (cached); everything else runs on the per-token records: each
model alone, the uniform average, the fused model at the given or the NLL-optimal weights (exact
for two models, EM on the simplex for K), the gain's block-bootstrap interval, and for two models
the improvement domain and the gain curve on the reported data. A non-linear rule adds its own
row (``arfuse.tasks.rule_eval``). Models with different tokenizers are fused by the exact mixture on
the segments where every tokenization has a boundary (``arfuse.tasks.segment_eval``)."""
from __future__ import annotations

import numpy as np

from arfuse.data.text import load_dataset
from arfuse.errors import ArfuseError
from arfuse.fusion import check_same_vocab, linear, uniform, w_to_k
from arfuse.fusion.registry import cross_tokenizer_hint
from arfuse.scoring.records import TokenRecords
from arfuse.scoring.scorer import ScoreConfig, score
from arfuse.tasks import segment_eval
from arfuse.tasks.choose import add_domain_and_curve, nll_weights
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.metrics import bootstrap_ppl_gain, perplexity_metrics
from arfuse.tasks.report import (EvalReport, Row, domain_lines, gain_cell, note_lines, rule_lines, table,
                                 weight_cells, weight_lines)

KIND = "causal language models"


def check_aligned(records: list[TokenRecords], names: list[str]) -> None:
    """Models with the same tokenizer score the same targets, position by position."""
    a = records[0]
    for r, n in zip(records[1:], names[1:]):
        if len(r) != len(a) or not np.array_equal(r.target, a.target):
            raise ArfuseError(f"{n} and {names[0]} tokenize the data differently ({len(r):,} vs {len(a):,} scored "
                              f"tokens): linear fusion needs one tokenizer; {cross_tokenizer_hint()}")


def _score(cfg: EvalConfig, models, data, valid, *, progress: bool):
    """(test records, valid records or None): every model scores each data set once (cached)."""
    check_same_vocab(models, "linear")
    names = [m.info.name for m in models]

    def score_all(ds):
        recs = [score(m, ds, cfg.score, batch_size=cfg.batch_size, use_cache=cfg.use_cache, progress=progress)
                for m in models]
        check_aligned(recs, names)
        return recs

    test_recs = score_all(data)
    return test_recs, score_all(valid) if valid else None


def _choose(cfg: EvalConfig, fit_lps, names, data, valid, notes: list[str]):
    """(weights, where they came from, the two-model optimum or None) on --valid, else on the test data."""
    if cfg.weights is not None:
        return list(cfg.weights), "given (--weight)" if len(cfg.weights) == 2 else "given (--weights)", None
    ch = nll_weights(fit_lps)
    if ch.optimum is not None:
        source = (f"NLL-optimal on the validation data ({valid.name})" if valid
                  else f"NLL-optimal on the test data itself ({data.name}): no --valid given, so the gain is optimistic")
        if ch.optimum.at_boundary and ch.optimum.w >= 1.0:
            notes.append(f"{names[1]} cannot improve {names[0]} on the {'validation' if valid else 'test'} data: "
                         "the optimal weight is w = 1 (the LLM alone)")
        return ch.weights, source, ch.optimum
    source = (f"NLL-optimal (EM on the simplex, {ch.iterations} iterations) on "
              + (f"the validation data ({valid.name})" if valid else f"the test data itself ({data.name}): no --valid given"))
    if not ch.converged:
        notes.append("EM did not reach its tolerance: the weights are approximate")
    return ch.weights, source, None


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> EvalReport:
    """Score every model once (cached), then fuse, search and report on the cached arrays."""
    if cfg.objective == "accuracy":
        raise ArfuseError("objective 'accuracy' is for image classifiers: language models are fused at the "
                          "NLL-optimal (perplexity) weight; drop --objective")
    from arfuse.adapters import load_model

    data = load_dataset(cfg.data)
    valid = load_dataset(cfg.valid) if cfg.valid else None
    models = [load_model(s, device=cfg.device, dtype=cfg.dtype) for s in [cfg.large, *cfg.smalls]]
    if not segment_eval.shared_tokenizer(models):  # different tokenizers: the exact mixture on common segments
        return segment_eval.evaluate_segments(cfg, models, data, valid, progress=progress)
    test_recs, valid_recs = _score(cfg, models, data, valid, progress=progress)
    names = [m.info.name for m in models]
    lps = [r.logp.astype(np.float64) for r in test_recs]
    notes: list[str] = []
    weights, source, opt = _choose(cfg, [r.logp.astype(np.float64) for r in (valid_recs or test_recs)], names, data,
                                   valid, notes)
    rec0 = test_recs[0]
    base = perplexity_metrics(lps[0], rec0.nbytes, rec0.nchars, rec0.nwords)

    def row(name, kind, lp, w=None):
        m = perplexity_metrics(lp, rec0.nbytes, rec0.nchars, rec0.nwords)
        return Row(name, kind, m, 100.0 * (1.0 - m["token_ppl"] / base["token_ppl"]), w)

    rows = [row(names[0], "large", lps[0])]
    rows += [row(n, "small", lp) for n, lp in zip(names[1:], lps[1:])]
    rows.append(row("uniform average", "uniform", uniform(lps), [1.0 / len(lps)] * len(lps)))
    rows.append(row("AR fused", "fused", linear(lps, weights), weights))
    report = EvalReport(
        head="causal", config=cfg.to_dict(),
        models=[{"name": m.info.name, "spec": s, "kind": m.info.kind, "num_parameters": m.num_parameters,
                 "vocab_size": m.info.vocab_size, "identity": m.info.identity}
                for m, s in zip(models, [cfg.large, *cfg.smalls])],
        data={"name": data.name, "source": data.source, "chars": data.n_chars, "documents": len(data.documents),
              "sha256": data.content_hash, "scored": rec0.totals},
        valid=({"name": valid.name, "source": valid.source, "chars": valid.n_chars, "sha256": valid.content_hash,
                "scored": valid_recs[0].totals} if valid else None),
        windowing=cfg.score.describe(), bos=[bool(r.meta["bos"]) for r in test_recs],
        weights=weights, k=w_to_k(weights[0]) if len(weights) == 2 else None, weight_source=source,
        search="given" if cfg.weights is not None else "nll",
        param_ratio=[models[0].num_parameters / m.num_parameters for m in models[1:]], rows=rows,
        gain_of="token perplexity", notes=notes,
        gain_ci=bootstrap_ppl_gain(lps[0], linear(lps, weights), block=cfg.score.window))
    if len(models) == 2:  # the improvement domain and the gain curve are properties of the reported (test) data
        add_domain_and_curve(report, lps[0], lps[1], points=cfg.curve_points, data_name=data.name)
        if opt is not None:
            report.optimum_iterations = opt.iterations
    if cfg.rule != "linear":
        from arfuse.tasks.rule_eval import add_rule_row

        add_rule_row(report, cfg, progress=progress)
    return report


def describe(report: EvalReport) -> str:
    """The causal-LM report as text."""
    if segment_eval.is_segment_report(report):
        return segment_eval.describe(report)
    data = report.data
    lines = [(f"{data['name']} ({data['scored']['tokens']:,} tokens scored, {data['chars']:,} characters; "
              f"{data['source']})"),
             f"{report.windowing}; BOS " + ", ".join(f"{'on' if b else 'off'} for {m['name']}"
                                                    for b, m in zip(report.bos, report.models))]

    def cells(r: Row, n_params: int | None) -> list[str]:
        m = r.metrics
        return ["" if n_params is None else f"{n_params / 1e6:.2f}M", f"{m['token_ppl']:.4f}", f"{m['word_ppl']:.4f}",
                f"{m['bits_per_byte']:.4f}", gain_cell(r, "+.3f"), *weight_cells(r.weights, k_for_any=True)]

    lines.append(table(report, ["model", "params", "token PPL", "word PPL", "bits/byte", "gain %", "w", "k"], cells))
    lines += weight_lines(report)
    if report.gain_ci:
        ci = report.gain_ci
        lines.append(f"AR fused vs {report.models[0]['name']}: {ci['gain_pct']:+.3f}% token perplexity, "
                     f"{100 * ci['level']:.0f}% interval [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}]% "
                     f"(paired bootstrap over {ci['blocks']:,} blocks of {ci['block_tokens']:,} tokens)")
    lines += rule_lines(report)
    return "\n".join(lines + domain_lines(report) + note_lines(report))


def family_members(specs, data_spec, *, score_cfg: ScoreConfig, device, dtype, batch_size, use_cache, progress,
                   **_):
    """The AR law's members (``arfuse.tasks.law``): one record per token; every member needs the same
    tokenizer."""
    from arfuse.adapters import load_model
    from arfuse.search.law import Member

    data = load_dataset(data_spec)
    models = [load_model(s, device=device, dtype=dtype) for s in specs]
    check_same_vocab(models, "linear")  # the AR law's pairs fuse token by token
    members = []
    for s, m in zip(specs, models):
        rec = score(m, data, score_cfg, batch_size=batch_size, use_cache=use_cache, progress=progress)
        members.append(Member(m.info.name if m.info.name not in [x.name for x in members] else s, m.num_parameters,
                              rec, s))
    info = {"name": data.name, "source": data.source, "sha256": data.content_hash, "windowing": score_cfg.describe(),
            "tokens": len(members[0].records), "topk": score_cfg.topk}
    return members, info
