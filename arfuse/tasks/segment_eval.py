"""The causal head across tokenizers: the segment mixture (DESIGN.md, "Across tokenizers").

Models with different tokenizers cannot be fused token by token, but the mixture of their
probabilities of the same text is exact on segments, the pieces between the byte offsets where
every tokenization has a boundary (``arfuse.scoring.segments``): each model's log-probability of
a segment is the sum of its cached token log-probs inside it, and the fused model's is
``log(w p_L(seg) + (1 - w) p_S(seg))``. The NLL is convex in w there too, so the weight comes from
the same exact search (on the segments of --valid, or given), and everything is reported in units
every tokenizer shares: bits per byte and word perplexity over the common segments (each model's
token perplexity over its own tokens inside them is shown beside). The gain is the relative
reduction of bits per byte, with a paired block bootstrap over segments."""
from __future__ import annotations

import math

import numpy as np

from arfuse.data.text import load_dataset
from arfuse.errors import ArfuseError
from arfuse.fusion import linear, uniform, w_to_k
from arfuse.scoring.scorer import score
from arfuse.scoring.segments import Segments, segment_records
from arfuse.search import mixture_nll
from arfuse.tasks.choose import add_domain_and_curve
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.report import (EvalReport, Row, domain_lines, gain_cell, note_lines, table, weight_cells,
                                 weight_lines)

LN2 = math.log(2.0)
MODE = "segment mixture across tokenizers"


def shared_tokenizer(models) -> bool:
    """True when every model has the first one's vocabulary size and tokenizer fingerprint."""
    fp, size = models[0].tokenizer_fingerprint(), models[0].info.vocab_size
    return all(m.info.vocab_size == size and m.tokenizer_fingerprint() == fp for m in models[1:])


def segment_metrics(lp: np.ndarray, seg: Segments, tokens: int | None = None) -> dict:
    """Bits per byte and per character, word perplexity (and, for one model, its token perplexity over
    its own ``tokens`` inside the segments) of per-segment log-probs."""
    nll = -float(np.sum(lp, dtype=np.float64))
    n_bytes, n_chars, n_words = int(seg.nbytes.sum()), int(seg.nchars.sum()), int(seg.nwords.sum())
    return {
        "nll": nll,
        "bits_per_byte": nll / LN2 / n_bytes if n_bytes else math.nan,
        "bits_per_char": nll / LN2 / n_chars if n_chars else math.nan,
        "word_ppl": math.exp(nll / n_words) if n_words else math.nan,
        "token_ppl": math.exp(nll / tokens) if tokens else math.nan,
        "tokens": tokens, "segments": len(seg), "bytes": n_bytes, "chars": n_chars, "words": n_words,
    }


def bootstrap_bpb_gain(base_lp: np.ndarray, fused_lp: np.ndarray, nbytes: np.ndarray, *, block: int,
                       n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The reduction of bits per byte of ``fused`` against ``base`` (in % and in bits per byte) with
    percentile intervals from a paired bootstrap over contiguous blocks of ``block`` segments."""
    base = np.asarray(base_lp, np.float64)
    fused = np.asarray(fused_lp, np.float64)
    n = len(base)
    if n == 0 or fused.shape != base.shape:
        raise ArfuseError(f"bootstrap over segments: {n} segments, shapes {base.shape} and {fused.shape}")
    starts = np.arange(0, n, block)
    nb = -np.add.reduceat(base, starts)                 # per block: the base NLL, the fused NLL, the bytes
    nf = -np.add.reduceat(fused, starts)
    by = np.add.reduceat(np.asarray(nbytes, np.float64), starts)
    idx = np.random.default_rng(seed).integers(0, len(nb), size=(n_boot, len(nb)))
    sb, sf, sy = nb[idx].sum(1), nf[idx].sum(1), by[idx].sum(1)
    a = (1.0 - level) / 2.0
    pct_lo, pct_hi = np.quantile(100.0 * (1.0 - sf / sb), [a, 1.0 - a])
    bpb_lo, bpb_hi = np.quantile((sb - sf) / LN2 / sy, [a, 1.0 - a])
    return {"gain_pct": 100.0 * (1.0 - nf.sum() / nb.sum()), "ci_low": float(pct_lo), "ci_high": float(pct_hi),
            "bpb_reduction": float((nb.sum() - nf.sum()) / LN2 / by.sum()), "bpb_ci_low": float(bpb_lo),
            "bpb_ci_high": float(bpb_hi), "level": level, "n_boot": n_boot, "block_segments": block,
            "blocks": len(nb), "seed": seed, "unit": "segments"}


def _segments(models, names, ds, cfg: EvalConfig, *, progress: bool) -> Segments:
    recs = [score(m, ds, cfg.score, batch_size=cfg.batch_size, use_cache=cfg.use_cache, progress=progress)
            for m in models]
    seg = segment_records(recs, ds, names)
    if len(seg) == 0:
        raise ArfuseError(f"{', '.join(names)} share no token boundary inside {ds.name} after their first scored "
                          "tokens: give more text")
    seg.meta["bos"] = [bool(r.meta["bos"]) for r in recs]
    return seg


def evaluate_segments(cfg: EvalConfig, models, data=None, valid=None, *, progress: bool = True) -> EvalReport:
    """The causal report of ``models`` (loaded, the LLM first; different tokenizers) by the segment mixture,
    on ``data`` and ``valid`` (loaded from ``cfg`` when not given)."""
    from arfuse.tasks.perplexity import _choose

    from arfuse.fusion.registry import cross_tokenizer_hint, get_rule

    if get_rule(cfg.rule).same_vocab and cfg.rule != "linear":
        raise ArfuseError(f"the {cfg.rule} rule fuses token by token and needs one tokenizer, but "
                          + " and ".join(m.info.name for m in models) + " have different ones: "
                          + cross_tokenizer_hint() + ", or drop --rule (the linear rule fuses them by the exact "
                          "segment mixture)")
    if not get_rule(cfg.rule).same_vocab and len(models) != 2:
        raise ArfuseError(f"the {cfg.rule} rule is evaluated across tokenizers for one large and one small model, "
                          f"{len(models)} given")
    for m in models:  # before any scoring: each model reads windows of the same number of its own tokens
        if m.info.max_length is not None and cfg.score.window > m.info.max_length:
            raise ArfuseError(f"--window {cfg.score.window} exceeds {m.info.name}'s context of {m.info.max_length} "
                              f"tokens: use --window {m.info.max_length} or less")
    names = [m.info.name for m in models]
    data = data if data is not None else load_dataset(cfg.data)
    valid = valid if valid is not None or not cfg.valid else load_dataset(cfg.valid)
    seg = _segments(models, names, data, cfg, progress=progress)
    vseg = _segments(models, names, valid, cfg, progress=progress) if valid else None
    fit = vseg or seg
    notes: list[str] = []
    weights, source, opt = _choose(cfg, list(fit.logp), names, data, valid, notes)
    if cfg.weights is None:
        source += f"; fitted on {len(fit):,} segments"
    lps = list(seg.logp)
    base = segment_metrics(lps[0], seg, int(seg.tokens[0]))

    def row(name, kind, lp, w=None, tokens=None):
        m = segment_metrics(lp, seg, tokens)
        return Row(name, kind, m, 100.0 * (1.0 - m["bits_per_byte"] / base["bits_per_byte"]), w)

    rows = [row(names[0], "large", lps[0], tokens=int(seg.tokens[0]))]
    rows += [row(n, "small", lp, tokens=int(t)) for n, lp, t in zip(names[1:], lps[1:], seg.tokens[1:])]
    rows.append(row("uniform average", "uniform", uniform(lps), [1.0 / len(lps)] * len(lps)))
    fused = linear(lps, weights)
    rows.append(row("AR fused (segments)", "fused", fused, weights))
    block = max(1, round(cfg.score.window * len(seg) / max(int(seg.tokens[0]), 1)))  # about a window of LLM tokens
    dropped = seg.bytes_dropped
    if dropped:
        notes.append(f"{dropped:,} of {seg.bytes_total:,} bytes of {data.name} are dropped from every model alike: "
                     "those before the first common boundary after each model's first scored token"
                     + (f" and {seg.docs_dropped:,} document(s) some model scored nothing of" if seg.docs_dropped
                        else ""))
    report = EvalReport(
        head="causal", config=cfg.to_dict(),
        models=[{"name": m.info.name, "spec": s, "kind": m.info.kind, "num_parameters": m.num_parameters,
                 "vocab_size": m.info.vocab_size, "identity": m.info.identity, "tokenizer": m.tokenizer_fingerprint()}
                for m, s in zip(models, [cfg.large, *cfg.smalls])],
        data={"name": data.name, "source": data.source, "chars": data.n_chars, "documents": len(data.documents),
              "sha256": data.content_hash, "scored": seg.totals, "fusion": MODE},
        valid=({"name": valid.name, "source": valid.source, "chars": valid.n_chars, "sha256": valid.content_hash,
                "scored": vseg.totals} if valid else None),
        windowing=f"{cfg.score.describe()}; {MODE}", bos=seg.meta["bos"],
        weights=weights, k=w_to_k(weights[0]) if len(weights) == 2 else None, weight_source=source,
        search="given" if cfg.weights is not None else "nll",
        param_ratio=[models[0].num_parameters / m.num_parameters for m in models[1:]], rows=rows,
        gain_of="bits per byte", notes=notes,
        gain_ci=bootstrap_bpb_gain(lps[0], fused, seg.nbytes, block=block))
    if cfg.rule != "linear":  # a rule across tokenizers (union): its teacher-forced row
        from arfuse.tasks.union_eval import add_union_row

        add_union_row(report, cfg, models, data, valid, progress=progress)
    if len(models) == 2:  # on the reported data; the curve's gain is the bits-per-byte reduction too
        with np.errstate(divide="ignore", invalid="ignore"):  # the domain's search at w = 0, where a segment the
            # SLM finds far less likely than the LLM underflows log(1 + (1 - w)(p_S / p_L - 1)) to log 0 (harmless)
            add_domain_and_curve(report, lps[0], lps[1], points=cfg.curve_points, data_name=data.name)
        if report.curve is not None:
            nll_large = mixture_nll(lps[0], lps[1], 1.0)
            report.curve["gain_pct"] = [
                100.0 * (1.0 - mixture_nll(lps[0], lps[1], 1.0 if math.isinf(k) else k / (1.0 + k)) / nll_large)
                for k in report.curve["k"]]
        if opt is not None:
            report.optimum_iterations = opt.iterations
    return report


def is_segment_report(report: EvalReport) -> bool:
    return (report.data or {}).get("fusion") == MODE


def describe(report: EvalReport) -> str:
    """A segment-mixture report as text."""
    data, sc = report.data, report.data["scored"]
    toks = ", ".join(f"{n} {t:,}" for n, t in sc["tokens_per_model"].items())
    lines = [(f"{data['name']} ({data['chars']:,} characters; {data['source']})"),
             (f"{MODE}: {sc['segments']:,} segments, {sc['bytes']:,} bytes covered, {sc['bytes_dropped']:,} dropped "
              f"(of {sc['bytes_total']:,}); tokens inside them: {toks}"),
             f"{report.windowing}; BOS " + ", ".join(f"{'on' if b else 'off'} for {m['name']}"
                                                    for b, m in zip(report.bos, report.models))]

    def cells(r: Row, n_params: int | None) -> list[str]:
        m = r.metrics
        tok = "" if m.get("tokens") is None else f"{m['token_ppl']:.4f}"
        return ["" if n_params is None else f"{n_params / 1e6:.2f}M", tok, f"{m['word_ppl']:.4f}",
                f"{m['bits_per_byte']:.4f}", gain_cell(r, "+.3f"), *weight_cells(r.weights, k_for_any=True)]

    lines.append(table(report, ["model", "params", "own token PPL", "word PPL", "bits/byte", "bpb gain %", "w", "k"],
                       cells))
    lines += weight_lines(report)
    if report.gain_ci:
        ci = report.gain_ci
        lines.append(f"AR fused vs {report.models[0]['name']}: {ci['bpb_reduction']:+.4f} bits/byte less "
                     f"({ci['gain_pct']:+.3f}%), {100 * ci['level']:.0f}% interval [{ci['bpb_ci_low']:+.4f}, "
                     f"{ci['bpb_ci_high']:+.4f}] bits/byte ([{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}]%) "
                     f"(paired bootstrap over {ci['blocks']:,} blocks of {ci['block_segments']:,} segments)")
    return "\n".join(lines + domain_lines(report) + note_lines(report))
