"""Masked-LM perplexity of protein models (ESM-2), alone and fused per masked position.

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
from dataclasses import asdict, dataclass, field

import numpy as np

from arfuse.data.fasta import MaskConfig, load_protein_dataset
from arfuse.errors import ArfuseError

LOSS_CAP = 70.0  # a mean cross-entropy above this is reported as infinite perplexity (the paper's rule)


def masked_ppl(logp: np.ndarray) -> float:
    """exp of the mean cross-entropy over masked positions; inf above the paper's cap of 70."""
    if len(logp) == 0:
        return math.nan
    ce = -float(np.mean(np.asarray(logp, np.float64)))
    return math.inf if ce > LOSS_CAP else math.exp(ce)


# ---- evaluation -------------------------------------------------------------------------
@dataclass
class MLMRow:
    name: str
    kind: str                # "large", "small", "uniform", "fused"
    ppl: float               # masked-position perplexity
    ce: float                # mean cross-entropy (nats) over masked positions
    accuracy: float | None   # top-1 accuracy of the masked residue (None for mixtures of several models)
    gain_pct: float          # perplexity gain over the large model, in %
    weights: list[float] | None = None


@dataclass
class MaskedLMReport:
    models: list[dict]
    data: dict
    valid: dict | None
    masking: str
    masked_positions: int
    weights: list[float]
    k: float | None
    weight_source: str
    param_ratio: list[float]
    rows: list[MLMRow]
    domain_k: tuple[float, float] | None = None
    k_star: float | None = None
    curve: dict | None = None     # perplexity gain (%) over the large model at weight ratios k (two models)
    notes: list[str] = field(default_factory=list)

    def plot(self, path: str) -> str:
        """Masked-PPL gain over the large model against k, the improvement domain shaded, k* and the used k marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.curve is None:
            raise ArfuseError("no gain curve to plot: it exists for two models whose improvement domain is not empty")
        ks, gains = self.curve["k"], self.curve["gain_pct"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(ks, gains, color="C0", lw=2, label="fused vs large (masked-position perplexity)")
        if self.domain_k:
            ax.axvspan(max(self.domain_k[0], ks[0]), ks[-1], color="C2", alpha=0.12,
                       label=f"improvement domain k > {self.domain_k[0]:.3g}")
        if self.k_star is not None and math.isfinite(self.k_star):
            ax.axvline(self.k_star, color="C3", ls="--", lw=1, label=f"k* = {self.k_star:.3g}")
        if self.k is not None and math.isfinite(self.k):
            fused = next(r for r in self.rows if r.kind == "fused")
            ax.plot([self.k], [fused.gain_pct], "o", color="C1", label=f"used k = {self.k:.3g} ({fused.gain_pct:+.2f}%)")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("weight ratio k = w / (1 - w)")
        ax.set_ylabel("masked-PPL gain over the large model (%)")
        ax.set_title(f"{self.models[0]['name']} + {self.models[1]['name']} on {self.data['name']}\n{self.masking}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def to_dict(self) -> dict:
        from arfuse.tasks.classification import json_safe

        return json_safe(asdict(self))

    def to_json(self, indent: int = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A plain-text table of each model alone, the uniform average and the fused model."""
        from arfuse.tasks.classification import fmt_k, render_table

        params = {m["name"]: m["num_parameters"] for m in self.models}
        head = (f"{self.data['name']}: {self.data['sequences']} sequences, {self.data['residues']:,} residues, "
                f"{self.masked_positions:,} masked positions ({self.data['source']})\n{self.masking}")
        rows = [[r.name, f"{params[r.name]:,}" if r.name in params else "",
                 f"{r.ppl:.4f}", f"{r.ce:.4f}", "" if r.accuracy is None else f"{100 * r.accuracy:.2f}",
                 f"{r.gain_pct:+.3f}" if r.kind != "large" else "",
                 "" if r.weights is None else f"{r.weights[0]:.6f}",
                 "" if r.weights is None or len(r.weights) != 2 else fmt_k(r.weights[0] / (1 - r.weights[0]) if r.weights[0] < 1 else math.inf)]
                for r in self.rows]
        lines = [head, render_table(["model", "params", "masked PPL", "CE (nats)", "acc %", "gain %", "w", "k"], rows)]
        lines.append(f"weight source: {self.weight_source}")
        if self.k_star is not None:
            dom = f"k > {self.domain_k[0]:.4g}" if self.domain_k else "empty"
            lines.append(f"NLL optimum on the reported data: k* = {fmt_k(self.k_star)}; improvement domain {dom}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def score_family(specs: list[str], data: str, *, mask: MaskConfig = MaskConfig(), device: str = "cpu",
                 batch_size: int = 8, use_cache: bool = True, progress: bool = True):
    """Load each ESM model and score ``data`` with it (cached): (models, dataset, records),
    the records aligned masked position by masked position."""
    from arfuse.adapters.protein import load_protein_model
    from arfuse.scoring.masked import score_masked

    models = [load_protein_model(s, device=device) for s in specs]
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


def evaluate_masked_lm(large: str, smalls: list[str] | str, data: str, *, valid: str | None = None,
                       weight: float | None = None, weights: list[float] | None = None,
                       mask: MaskConfig = MaskConfig(), device: str = "cpu", batch_size: int = 8,
                       use_cache: bool = True, progress: bool = True) -> MaskedLMReport:
    """Masked-position perplexity of ``large``, each small model, and their AR fusion.

    The weight is ``weight`` (the large model's w) or ``weights`` (one per model) when given,
    else the exact NLL optimum on ``valid`` (or on ``data`` itself, said in the report).
    """
    from arfuse.fusion import check_weights, linear, uniform, w_to_k
    from arfuse.search import gain_curve, improvement_domain, optimal_weight, optimal_weights_em

    smalls = [smalls] if isinstance(smalls, str) else list(smalls)
    if weight is not None:
        if weights is not None:
            raise ArfuseError("give weight (the large model's w) or weights (one per model), not both")
        if len(smalls) != 1:
            raise ArfuseError(f"weight is for two models but {1 + len(smalls)} were given: give weights=[w1, w2, ...]")
        weights = [weight, 1.0 - weight]
    if weights is not None:
        weights = check_weights(weights, 1 + len(smalls))
    specs = [large, *smalls]
    models, ds, recs = score_family(specs, data, mask=mask, device=device, batch_size=batch_size,
                                    use_cache=use_cache, progress=progress)
    names = [m.info.name for m in models]
    vds = None
    lps = [r.logp.astype(np.float64) for r in recs]
    fit = lps
    if valid:
        _, vds, vrecs = score_family(specs, valid, mask=mask, device=device, batch_size=batch_size,
                                     use_cache=use_cache, progress=progress)
        fit = [r.logp.astype(np.float64) for r in vrecs]
    notes: list[str] = []
    if weights is not None:
        source = "given"
    elif len(models) == 2:
        opt = optimal_weight(fit[0], fit[1])
        weights = [opt.w, 1.0 - opt.w]
        source = (f"NLL-optimal on the validation data ({vds.name})" if vds else
                  f"NLL-optimal on the reported data itself ({ds.name}): no validation data given, so the gain is optimistic")
    else:
        ws, iters, conv = optimal_weights_em(fit)
        weights = ws.tolist()
        source = f"NLL-optimal (EM, {iters} iterations) on " + (f"the validation data ({vds.name})" if vds else f"{ds.name} itself")
        if not conv:
            notes.append("EM did not reach its tolerance: the weights are approximate")
    base = masked_ppl(lps[0])

    def row(name, kind, lp, acc, w=None):
        p = masked_ppl(lp)
        return MLMRow(name, kind, p, -float(np.mean(lp)), acc, 100.0 * (1.0 - p / base), w)

    accs = [float(np.mean(r.topk_ids[:, 0] == r.target)) for r in recs]
    rows = [row(names[0], "large", lps[0], accs[0])]
    rows += [row(n, "small", lp, a) for n, lp, a in zip(names[1:], lps[1:], accs[1:])]
    fused_acc = uni_acc = None
    if len(models) == 2 and recs[0].topk_ids.shape[1] >= models[0].info.vocab_size:
        from arfuse.tasks.classification import fused_predictions

        fused_acc = float(np.mean(fused_predictions(recs[0], recs[1], weights[0]) == recs[0].target))
        uni_acc = float(np.mean(fused_predictions(recs[0], recs[1], 0.5) == recs[0].target))
    rows.append(row("uniform average", "uniform", uniform(lps), uni_acc, [1.0 / len(lps)] * len(lps)))
    rows.append(row("AR fused", "fused", linear(lps, weights), fused_acc, list(weights)))
    report = MaskedLMReport(
        models=[{"name": m.info.name, "spec": s, "kind": m.info.kind, "num_parameters": m.num_parameters,
                 "identity": m.info.identity} for m, s in zip(models, specs)],
        data=ds.summary(), valid=vds.summary() if vds else None, masking=mask.describe(),
        masked_positions=len(recs[0]), weights=list(weights), k=w_to_k(weights[0]) if len(weights) == 2 else None,
        weight_source=source, param_ratio=[models[0].num_parameters / m.num_parameters for m in models[1:]],
        rows=rows, notes=notes)
    if len(models) == 2:
        opt_t = optimal_weight(lps[0], lps[1])
        report.k_star = opt_t.k
        dom = improvement_domain(lps[0], lps[1], opt_t)
        report.domain_k = (w_to_k(dom[0]), math.inf) if dom else None
        if dom:
            k_lo = max(w_to_k(dom[0]) / 4, 1e-3)
            k_hi = max(opt_t.k * 8, k_lo * 100) if math.isfinite(opt_t.k) else k_lo * 1000
            ks = np.geomspace(k_lo, k_hi, 200)
            report.curve = {"k": ks.tolist(), "gain_pct": gain_curve(lps[0], lps[1], ks).tolist()}
    if any(math.isinf(r.ppl) for r in rows):
        notes.append(f"a mean cross-entropy above {LOSS_CAP:g} nats is reported as infinite perplexity (the paper's rule)")
    return report


def law_members(specs: list[str], data: str, *, mask: MaskConfig = MaskConfig(), device: str = "cpu",
                batch_size: int = 8, use_cache: bool = True, progress: bool = True,
                num_parameters: dict | None = None):
    """The family's members and data info for ``arfuse.search.law.analyse_family``: one
    record per masked residue, the whole vocabulary kept (exact accuracy curves)."""
    from arfuse.search.law import Member

    if len(specs) < 2:
        raise ArfuseError(f"--family needs at least 2 models (comma-separated), got {len(specs)}: {specs}")
    models, ds, recs = score_family(specs, data, mask=mask, device=device, batch_size=batch_size,
                                    use_cache=use_cache, progress=progress)
    members = [Member(m.info.name, (num_parameters or {}).get(m.info.name, m.num_parameters), r, s)
               for s, m, r in zip(specs, models, recs)]
    info = {"name": ds.name, "source": ds.source, "sha256": ds.content_hash, "windowing": mask.describe(),
            "tokens": len(recs[0]), "topk": recs[0].topk_ids.shape[1], "unit": "masked residue"}
    return members, info
