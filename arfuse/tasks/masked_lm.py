"""The masked-LM head: masked-position perplexity of protein models (ESM-2), alone and fused per masked position.

The paper's definition (Appendix C): 15% of the residues are masked (special tokens
never), and perplexity is the exponentiated mean cross-entropy over the masked positions,
``exp(-sum log p(true residue) / n_masked)`` over the whole data set; a mean loss above 70
is reported as infinite. Masked positions depend only on the sequence and the seed, so
every model (and every batch size) sees the same masks, and the fused model is
``log(w p_L + (1 - w) p_S)`` at each masked position.

Sequences longer than ``max_residues`` are scored in consecutive crops of at most that
many residues, each with its own <cls> and <eos>.
"""
from __future__ import annotations

import math

import numpy as np

from arfuse.data.fasta import MaskConfig, load_protein_dataset
from arfuse.errors import ArfuseError
from arfuse.formatting import fmt_k
from arfuse.fusion import linear, uniform, w_to_k
from arfuse.tasks.choose import add_domain_and_curve, nll_weights
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.heads import refuse_rule
from arfuse.tasks.report import EvalReport, Row, gain_cell, note_lines, table, weight_cells

LOSS_CAP = 70.0  # a mean cross-entropy above this is reported as infinite perplexity (the paper's rule)

KIND = "masked language models"


def masked_ppl(logp: np.ndarray) -> float:
    """exp of the mean cross-entropy over masked positions; inf above the paper's cap of 70."""
    if len(logp) == 0:
        return math.nan
    ce = -float(np.mean(np.asarray(logp, np.float64)))
    return math.inf if ce > LOSS_CAP else math.exp(ce)


def score_family(specs: list[str], data: str, *, mask: MaskConfig = MaskConfig(), device: str = "cpu",
                 batch_size: int = 8, use_cache: bool = True, progress: bool = True):
    """Load each ESM model and score ``data`` with it (cached): (models, dataset, records),
    the records aligned masked position by masked position."""
    from arfuse.adapters import load_any
    from arfuse.scoring.masked import score_masked

    models = [load_any(s, device=device) for s in specs]
    for m in models[1:]:
        if m.vocab != models[0].vocab:
            raise ArfuseError(f"{m.info.name} and {models[0].info.name} have different vocabularies: per-position "
                              "fusion needs the same residue alphabet in the same order")
    names = [m.info.name for m in models]
    if len(set(names)) != len(names):
        raise ArfuseError(f"the same model is given twice ({', '.join(names)}): fuse different models")
    ds = load_protein_dataset(data)
    recs = [score_masked(m, ds, mask, batch_size=batch_size, use_cache=use_cache, progress=progress) for m in models]
    for r, n in zip(recs[1:], names[1:]):
        if not np.array_equal(r.target, recs[0].target) or not np.array_equal(r.pos, recs[0].pos):
            raise ArfuseError(f"{n} and {names[0]} scored different masked positions: use the same mask settings")
    return models, ds, recs


def _choose(cfg: EvalConfig, fit: list[np.ndarray], ds, vds, notes: list[str]) -> tuple[list[float], str]:
    """(weights, where they came from): given, else the NLL optimum on the validation data (else the reported)."""
    if cfg.weights is not None:
        return list(cfg.weights), "given"
    ch = nll_weights(fit)
    if ch.optimum is not None:
        return ch.weights, (f"NLL-optimal on the validation data ({vds.name})" if vds else
                            f"NLL-optimal on the reported data itself ({ds.name}): no validation data given, so the "
                            "gain is optimistic")
    if not ch.converged:
        notes.append("EM did not reach its tolerance: the weights are approximate")
    return ch.weights, (f"NLL-optimal (EM, {ch.iterations} iterations) on "
                        + (f"the validation data ({vds.name})" if vds else f"{ds.name} itself"))


def _rows(names: list[str], recs, lps: list[np.ndarray], weights: list[float], vocab_size: int) -> list[Row]:
    base = masked_ppl(lps[0])

    def row(name, kind, lp, acc, w=None):
        p = masked_ppl(lp)
        return Row(name, kind, {"ppl": p, "ce": -float(np.mean(lp)), "accuracy": acc}, 100.0 * (1.0 - p / base), w)

    accs = [float(np.mean(r.topk_ids[:, 0] == r.target)) for r in recs]
    rows = [row(names[0], "large", lps[0], accs[0])]
    rows += [row(n, "small", lp, a) for n, lp, a in zip(names[1:], lps[1:], accs[1:])]
    fused_acc = uni_acc = None  # top-1 of a mixture: from whole distributions, kept for two models
    if len(recs) == 2 and recs[0].topk_ids.shape[1] >= vocab_size:
        from arfuse.tasks.classification import fused_predictions

        fused_acc = float(np.mean(fused_predictions(recs[0], recs[1], weights[0]) == recs[0].target))
        uni_acc = float(np.mean(fused_predictions(recs[0], recs[1], 0.5) == recs[0].target))
    rows.append(row("uniform average", "uniform", uniform(lps), uni_acc, [1.0 / len(lps)] * len(lps)))
    rows.append(row("AR fused", "fused", linear(lps, weights), fused_acc, list(weights)))
    return rows


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> EvalReport:
    """Masked-position perplexity of ``cfg.large``, each small model, their uniform average and
    their AR fusion, at ``cfg.weights`` or the exact NLL optimum on ``cfg.valid`` (or on ``cfg.data``
    itself, said in the report)."""
    refuse_rule(cfg, "masked")
    if cfg.objective == "accuracy":
        raise ArfuseError("objective 'accuracy' is for image classifiers: masked LMs are searched for NLL; "
                          "drop --objective")
    specs = [cfg.large, *cfg.smalls]
    kw = dict(mask=cfg.mask, device=cfg.device, batch_size=cfg.batch_size, use_cache=cfg.use_cache, progress=progress)
    models, ds, recs = score_family(specs, cfg.data, **kw)
    names = [m.info.name for m in models]
    lps = [r.logp.astype(np.float64) for r in recs]
    fit, vds = lps, None
    if cfg.valid:
        _, vds, vrecs = score_family(specs, cfg.valid, **kw)
        fit = [r.logp.astype(np.float64) for r in vrecs]
    notes: list[str] = []
    weights, source = _choose(cfg, fit, ds, vds, notes)
    rows = _rows(names, recs, lps, weights, models[0].info.vocab_size)
    report = EvalReport(
        head="masked", config=cfg.to_dict(),
        models=[{"name": m.info.name, "spec": s, "kind": m.info.kind, "num_parameters": m.num_parameters,
                 "identity": m.info.identity} for m, s in zip(models, specs)],
        data=ds.summary(), valid=vds.summary() if vds else None, windowing=cfg.mask.describe(),
        masked_positions=len(recs[0]), weights=list(weights), k=w_to_k(weights[0]) if len(weights) == 2 else None,
        weight_source=source, search="given" if cfg.weights is not None else "nll",
        param_ratio=[models[0].num_parameters / m.num_parameters for m in models[1:]], rows=rows,
        gain_of="masked-position perplexity", notes=notes)
    if len(models) == 2:
        add_domain_and_curve(report, lps[0], lps[1], points=cfg.curve_points, data_name=ds.name)
    if any(math.isinf(r.metrics["ppl"]) for r in rows):
        notes.append(f"a mean cross-entropy above {LOSS_CAP:g} nats is reported as infinite perplexity (the paper's rule)")
    return report


def describe(report: EvalReport) -> str:
    """The masked-LM report as text."""
    d = report.data
    lines = [(f"{d['name']}: {d['sequences']} sequences, {d['residues']:,} residues, "
              f"{report.masked_positions:,} masked positions ({d['source']})"), report.windowing]

    def cells(r: Row, n_params: int | None) -> list[str]:
        m = r.metrics
        return ["" if n_params is None else f"{n_params:,}", f"{m['ppl']:.4f}", f"{m['ce']:.4f}",
                "" if m["accuracy"] is None else f"{100 * m['accuracy']:.2f}", gain_cell(r, "+.3f"),
                *weight_cells(r.weights)]

    lines.append(table(report, ["model", "params", "masked PPL", "CE (nats)", "acc %", "gain %", "w", "k"], cells))
    lines.append(f"weight source: {report.weight_source}")
    if report.k_star is not None:
        dom = f"k > {report.domain_k[0]:.4g}" if report.domain_k else "empty"
        lines.append(f"NLL optimum on the reported data: k* = {fmt_k(report.k_star)}; improvement domain {dom}")
    return "\n".join(lines + note_lines(report))


def family_members(specs, data_spec, *, mask: MaskConfig, device, batch_size, use_cache, progress, **_):
    """The AR law's members (``arfuse.tasks.law``): one record per masked residue, the whole vocabulary
    kept (exact accuracy curves)."""
    from arfuse.search.law import Member

    models, ds, recs = score_family(specs, data_spec, mask=mask, device=device, batch_size=batch_size,
                                    use_cache=use_cache, progress=progress)
    members = [Member(m.info.name, m.num_parameters, r, s) for s, m, r in zip(specs, models, recs)]
    info = {"name": ds.name, "source": ds.source, "sha256": ds.content_hash, "windowing": mask.describe(),
            "tokens": len(recs[0]), "topk": recs[0].topk_ids.shape[1], "unit": "masked residue"}
    return members, info
