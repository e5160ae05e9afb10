"""Perplexity evaluation of a large model fused with smaller ones, on cached records."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.fusion import check_weights, linear, uniform, w_to_k
from arfuse.scoring.records import TokenRecords
from arfuse.scoring.scorer import ScoreConfig, score
from arfuse.search import gain_curve, improvement_domain, optimal_weight, optimal_weights_em
from arfuse.data.text import load_dataset
from arfuse.tasks.metrics import bootstrap_ppl_gain, perplexity_metrics


@dataclass
class EvalConfig:
    large: str
    smalls: list[str]
    data: str
    valid: str | None = None
    weights: list[float] | None = None     # one per model, the LLM first; None -> search
    score: ScoreConfig = field(default_factory=ScoreConfig)
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 4
    use_cache: bool = True


@dataclass
class Row:
    name: str
    kind: str            # "large", "small", "uniform", "fused"
    metrics: dict
    gain_pct: float      # token-perplexity gain over the LLM, in %
    weights: list[float] | None = None


@dataclass
class EvalReport:
    config: dict
    models: list[dict]
    data: dict
    valid: dict | None
    windowing: str
    bos: list[bool]
    weights: list[float]
    k: float | None
    weight_source: str
    param_ratio: list[float]
    rows: list[Row]
    domain_w: tuple[float, float] | None = None
    domain_k: tuple[float, float] | None = None
    k_star: float | None = None
    optimum_iterations: int | None = None
    curve: dict | None = None
    gain_ci: dict | None = None      # block-bootstrap interval of the fused row's gain (arfuse.tasks.metrics)
    cosine: dict | None = None       # --rule cosine: its power, where it came from, its gain's interval
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        return json_safe(d)


def json_safe(x):
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return json_safe(x.item())
    return x


def check_aligned(records: list[TokenRecords], names: list[str]) -> None:
    """Models with the same tokenizer score the same targets, position by position."""
    a = records[0]
    for r, n in zip(records[1:], names[1:]):
        if len(r) != len(a) or not np.array_equal(r.target, a.target):
            raise ArfuseError(f"{n} and {names[0]} tokenize the data differently ({len(r):,} vs {len(a):,} scored "
                              "tokens): linear fusion needs one tokenizer; use the top-k-union rule (--rule union) "
                              "for models with different tokenizers, or compare them in bits per byte")


def check_same_vocab(models) -> None:
    big = models[0]
    for m in models[1:]:
        if m.info.vocab_size != big.info.vocab_size:
            raise ArfuseError(
                f"vocabularies differ ({big.info.vocab_size:,} tokens in {big.info.name} vs {m.info.vocab_size:,} in "
                f"{m.info.name}): use the top-k-union rule (--rule union) for models with different tokenizers")
        if m.tokenizer_fingerprint() != big.tokenizer_fingerprint():
            raise ArfuseError(
                f"{big.info.name} and {m.info.name} have vocabularies of the same size ({m.info.vocab_size:,}) but "
                "different tokenizers: use the top-k-union rule (--rule union) for models with different tokenizers")


def evaluate(cfg: EvalConfig, *, progress: bool = True, curve_points: int = 200) -> EvalReport:
    """Score every model once (cached), then fuse, search and report on the cached arrays."""
    from arfuse.adapters import load_model

    if cfg.weights is not None:
        check_weights(cfg.weights, 1 + len(cfg.smalls))
    data = load_dataset(cfg.data)
    valid = load_dataset(cfg.valid) if cfg.valid else None
    specs = [cfg.large, *cfg.smalls]
    models = [load_model(s, device=cfg.device, dtype=cfg.dtype) for s in specs]
    check_same_vocab(models)
    names = [m.info.name for m in models]

    def score_all(ds):
        recs = [score(m, ds, cfg.score, batch_size=cfg.batch_size, use_cache=cfg.use_cache, progress=progress)
                for m in models]
        check_aligned(recs, names)
        return recs

    test_recs = score_all(data)
    valid_recs = score_all(valid) if valid else None
    lps = [r.logp.astype(np.float64) for r in test_recs]
    fit_lps = [r.logp.astype(np.float64) for r in (valid_recs or test_recs)]
    notes: list[str] = []
    opt = None
    if cfg.weights is not None:
        weights = list(cfg.weights)
        source = "given (--weight)"
    elif len(models) == 2:
        opt = optimal_weight(fit_lps[0], fit_lps[1])
        weights = [opt.w, 1.0 - opt.w]
        source = (f"NLL-optimal on the validation data ({valid.name})" if valid
                  else f"NLL-optimal on the test data itself ({data.name}): no --valid given, so the gain is optimistic")
        if opt.at_boundary and opt.w >= 1.0:
            notes.append(f"{names[1]} cannot improve {names[0]} on the {'validation' if valid else 'test'} data: "
                         "the optimal weight is w = 1 (the LLM alone)")
    else:
        ws, iters, conv = optimal_weights_em(fit_lps)
        weights = ws.tolist()
        source = (f"NLL-optimal (EM on the simplex, {iters} iterations) on "
                  + (f"the validation data ({valid.name})" if valid else f"the test data itself ({data.name}): no --valid given"))
        if not conv:
            notes.append("EM did not reach its tolerance: the weights are approximate")
    rec0 = test_recs[0]
    base = perplexity_metrics(lps[0], rec0.nbytes, rec0.nchars, rec0.nwords)

    def row(name, kind, lp, w=None):
        m = perplexity_metrics(lp, rec0.nbytes, rec0.nchars, rec0.nwords)
        return Row(name, kind, m, 100.0 * (1.0 - m["token_ppl"] / base["token_ppl"]), w)

    rows = [row(names[0], "large", lps[0])]
    rows += [row(n, "small", lp) for n, lp in zip(names[1:], lps[1:])]
    rows.append(row("uniform average", "uniform", uniform(lps), [1.0 / len(lps)] * len(lps)))
    rows.append(row("AR fused", "fused", linear(lps, weights), weights))
    ratio = [models[0].num_parameters / m.num_parameters for m in models[1:]]
    report = EvalReport(
        config={"large": cfg.large, "smalls": cfg.smalls, "data": cfg.data, "valid": cfg.valid,
                "score": asdict(cfg.score), "device": cfg.device, "dtype": cfg.dtype},
        models=[{"name": m.info.name, "spec": s, "kind": m.info.kind, "num_parameters": m.num_parameters,
                 "vocab_size": m.info.vocab_size, "identity": m.info.identity} for m, s in zip(models, specs)],
        data={"name": data.name, "source": data.source, "chars": data.n_chars, "documents": len(data.documents),
              "sha256": data.content_hash, "scored": rec0.totals},
        valid=({"name": valid.name, "source": valid.source, "chars": valid.n_chars, "sha256": valid.content_hash,
                "scored": valid_recs[0].totals} if valid else None),
        windowing=cfg.score.describe(), bos=[bool(r.meta["bos"]) for r in test_recs],
        weights=weights, k=w_to_k(weights[0]) if len(weights) == 2 else None,
        weight_source=source, param_ratio=ratio, rows=rows, notes=notes,
        gain_ci=bootstrap_ppl_gain(lps[0], linear(lps, weights), block=cfg.score.window))
    if len(models) == 2:
        # the improvement domain and the gain curve are properties of the reported (test) data
        opt_test = optimal_weight(lps[0], lps[1])
        dom = improvement_domain(lps[0], lps[1], opt_test)
        report.k_star = opt_test.k
        report.optimum_iterations = opt_test.iterations
        if opt is not None:
            report.optimum_iterations = opt.iterations
        if dom is not None:
            report.domain_w = dom
            report.domain_k = (w_to_k(dom[0]), math.inf)
            k_lo = max(w_to_k(dom[0]) / 4, 1e-3)
            k_hi = max(opt_test.k * 8, k_lo * 100) if math.isfinite(opt_test.k) else k_lo * 1000
            ks = np.geomspace(k_lo, k_hi, curve_points)
            report.curve = {"k": ks.tolist(), "gain_pct": gain_curve(lps[0], lps[1], ks).tolist(),
                            "k_star_test": opt_test.k, "data": data.name}
    return report
