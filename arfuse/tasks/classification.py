"""Classification accuracy of a large image classifier fused with smaller ones, on cached records.

Each model scores the images once (cached); everything else runs on the per-image
records: each model's top-1, the fused model's top-1 at a given weight, the exact
NLL-optimal weight, and the exact accuracy curve over every k = w / (1 - w) (from the
exchange thresholds, ``arfuse.search.accuracy``) with its optimum, improvement domain, the
paper's three sets and the flips. The weight is chosen on ``valid`` and reported on
``data``; without ``valid`` it is chosen on ``data`` itself and the report says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.scoring.records import TokenRecords
from arfuse.tasks.perplexity import json_safe

SEARCHES = ("accuracy", "nll")


# ---- helpers shared with the masked-LM task ---------------------------------------------
def fmt_k(k: float | None) -> str:
    if k is None:
        return "-"
    return "inf" if math.isinf(k) else f"{k:.4g}"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns (readable in a terminal and on GitHub)."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def full_logprobs(rec: TokenRecords) -> np.ndarray:
    """(N, C) log-probs of every candidate from records that kept all C of them."""
    n, k = rec.topk_ids.shape
    c = int(rec.meta.get("vocab_size", k))
    if k < c:
        raise ArfuseError(f"{rec.meta.get('model', 'a model')}'s records keep only its top {k} of {c} candidates: "
                          "score with every candidate kept (the default) to compute fused predictions exactly")
    out = np.full((n, c), -np.inf, np.float64)
    np.put_along_axis(out, rec.topk_ids.astype(np.int64), rec.topk_logp.astype(np.float64), axis=1)
    return out


def fused_predictions(rec_large: TokenRecords, rec_small: TokenRecords | None, w: float,
                      more: list[tuple[TokenRecords, float]] | None = None) -> np.ndarray:
    """argmax of log(w p_L + (1 - w) p_S) per example, computed directly (ties: lowest index).

    With ``more`` (records, weight) pairs, the K-model mixture whose weights are ``w``, then
    ``1 - w - sum(more weights)`` for ``rec_small`` and the given ones for the rest.
    """
    from arfuse.fusion import linear

    lps = [full_logprobs(rec_large)]
    ws = [w]
    if rec_small is not None:
        lps.append(full_logprobs(rec_small))
        ws.append(1.0 - w - sum(x for _, x in (more or [])))
    for r, x in more or []:
        lps.append(full_logprobs(r))
        ws.append(x)
    return np.asarray(linear(lps, ws)).argmax(axis=1)


# ---- the report ---------------------------------------------------------------------------
@dataclass
class ClassRow:
    name: str
    kind: str              # "large", "small", "uniform", "fused"
    accuracy: float        # top-1, as a fraction
    right: int
    nll: float             # mean cross-entropy of the true class (nats)
    gain_pp: float         # top-1 gain over the large model, percentage points
    weights: list[float] | None = None


@dataclass
class ClassificationReport:
    models: list[dict]
    data: dict
    valid: dict | None
    search: str
    weights: list[float]
    k: float | None
    weight_source: str
    param_ratio: list[float]
    rows: list[ClassRow]
    nll_optimum: dict | None = None       # exact NLL optimum on the reported data (two models)
    accuracy_curve: dict | None = None    # exact accuracy curve summary on the reported data (two models)
    sets: dict | None = None              # the paper's three sets and flips at the used k
    bootstrap: dict | None = None         # paired bootstrap of fused minus large at the used k
    curve: dict | None = None             # exact step curve on the reported data: k edges, gain in pp per segment
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def to_json(self, indent: int = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str) -> str:
        """Top-1 gain over the large model against k (exact step curve), the used k and the NLL optimum marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.curve is None:
            raise ArfuseError("no accuracy curve to plot: it exists for two models (a large and one small)")
        edges = np.asarray(self.curve["edges"], np.float64)
        gain = np.asarray(self.curve["gain_pp"], np.float64)
        inner = edges[1:-1]
        lo_k = max(inner.min() / 3, 1e-3) if len(inner) else 1e-2
        hi_k = min(inner.max() * 3, 1e4) if len(inner) else 1e2
        xs = np.clip(np.repeat(edges, 2)[1:-1], lo_k, hi_k)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(xs, np.repeat(gain, 2), color="C0", lw=1.5, label="fused - large (exact, every k)")
        if self.k is not None and 0 < self.k < math.inf:
            ax.axvline(self.k, color="C3", ls="--", lw=1, label=f"used k = {fmt_k(self.k)}")
        if self.nll_optimum and 0 < self.nll_optimum["k"] < math.inf:
            ax.axvline(self.nll_optimum["k"], color="C2", ls=":", lw=1.2,
                       label=f"NLL optimum k* = {fmt_k(self.nll_optimum['k'])}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("weight ratio k = w / (1 - w)")
        ax.set_ylabel("top-1 gain over the large model (pp)")
        names = [m["name"] for m in self.models]
        ax.set_title(f"{names[0]} + {names[1]} on {self.data['name']} ({self.data['images']:,} images)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def table(self) -> str:
        d = self.data
        params = {m["name"]: m["num_parameters"] for m in self.models}
        lines = [f"{d['name']}: {d['images']:,} images, {d['classes']} classes ({d['source']})"]
        if d.get("skipped"):
            lines.append(f"skipped {d['skipped']} image(s) that do not decode: {', '.join(d['skipped_files'][:5])}")
        rows = [[r.name, f"{params[r.name] / 1e6:.3f}M" if r.name in params else "", f"{100 * r.accuracy:.2f}",
                 f"{r.right:,}", f"{r.nll:.4f}", f"{r.gain_pp:+.2f}" if r.kind != "large" else "",
                 "" if r.weights is None else f"{r.weights[0]:.6f}",
                 "" if r.weights is None or len(r.weights) != 2 else fmt_k(_k(r.weights[0]))] for r in self.rows]
        lines.append(render_table(["model", "params", "top-1 %", "right", "NLL", "gain pp", "w", "k"], rows))
        lines.append(f"weight source: {self.weight_source}")
        if self.param_ratio:
            lines.append("parameter ratio r = " + ", ".join(f"{x:.2f}" for x in self.param_ratio))
        if self.nll_optimum:
            o = self.nll_optimum
            lines.append(f"NLL optimum on {d['name']}: k* = {fmt_k(o['k'])} (w = {o['w']:.6f}), "
                         f"top-1 there {100 * o['accuracy']:.2f}%")
        if self.accuracy_curve:
            c = self.accuracy_curve
            b = c["best"]
            lines.append(f"accuracy optimum on {d['name']} (oracle): {100 * b['accuracy']:.2f}% for k in "
                         f"({fmt_k(b['k_range'][0])}, {fmt_k(b['k_range'][1])}); improvement domain "
                         f"k > {fmt_k(c['domain']['k_min'])}; {c['n_thresholds']:,} exchange thresholds"
                         + ("" if c["exact"] else " (top-k certificate fails somewhere: certified counts)"))
        if self.sets:
            s = self.sets
            lines.append(f"at k = {fmt_k(s['k'])}: {s['flips_wrong_to_right']} images fixed, "
                         f"{s['flips_right_to_wrong']} broken; S1 (large wrong, small right) "
                         f"{s['S1_llm_wrong_slm_right']['size']}, S2 (large right, small wrong) "
                         f"{s['S2_llm_right_slm_wrong']['size']}, S3 (agree) {s['S3_agree']['size']}")
        if self.bootstrap:
            bs = self.bootstrap
            lines.append(f"fused minus large: {100 * bs['delta']:+.2f} pp, {100 * bs['level']:.0f}% paired bootstrap "
                         f"interval [{100 * bs['ci_low']:+.2f}, {100 * bs['ci_high']:+.2f}] pp")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _k(w: float) -> float:
    return math.inf if w >= 1.0 else w / (1.0 - w)


def _w(k: float) -> float:
    return 1.0 if math.isinf(k) else k / (1.0 + k)


# ---- evaluation -------------------------------------------------------------------------
def score_family(specs: list[str], data: str, *, device: str = "cpu", batch_size: int = 256,
                 use_cache: bool = True, progress: bool = True):
    """Load each image model and score ``data`` with it (cached): (models, dataset, records)."""
    from arfuse.adapters.vision import load_vision_model
    from arfuse.scoring.classify import score_images
    from arfuse.data.images import load_image_dataset

    models = [load_vision_model(s, device=device) for s in specs]
    for m in models[1:]:
        if tuple(m.classes) != tuple(models[0].classes):
            raise ArfuseError(f"{m.info.name} and {models[0].info.name} predict different classes: fusion needs the "
                              "same classes in the same order")
    names = [m.info.name for m in models]
    if len(set(names)) != len(names):
        raise ArfuseError(f"the same model is given twice ({', '.join(names)}): fuse different models")
    ds = load_image_dataset(data, classes=models[0].classes)
    recs = [score_images(m, ds, batch_size=batch_size, use_cache=use_cache, progress=progress) for m in models]
    return models, ds, recs


def _row(name, kind, lp_true, pred, target, base_acc, w=None) -> ClassRow:
    right = int((pred == target).sum())
    acc = right / len(target)
    return ClassRow(name, kind, acc, right, -float(np.mean(lp_true)),
                    100.0 * (acc - base_acc) if base_acc is not None else 0.0, w)


def evaluate_classification(large: str, smalls: list[str] | str, data: str, *, valid: str | None = None,
                            weight: float | None = None, weights: list[float] | None = None,
                            search: str | None = None, device: str = "cpu", batch_size: int = 256,
                            use_cache: bool = True, progress: bool = True, bootstrap: int = 10000
                            ) -> ClassificationReport:
    """Top-1 of ``large``, each small model, their uniform average and their AR fusion.

    The weight: ``weight`` (the large model's w, two models) or ``weights`` (one per model)
    when given; else found by ``search`` on ``valid`` (or on ``data`` when no ``valid``):
    ``"accuracy"`` (two models, the default: the exact accuracy optimum over all k, the
    segment of largest k among ties) or ``"nll"`` (the exact NLL optimum; EM for K models).
    """
    from arfuse.fusion import check_weights, linear, uniform, w_to_k
    from arfuse.search import optimal_weight, optimal_weights_em

    smalls = [smalls] if isinstance(smalls, str) else list(smalls)
    if not smalls:
        raise ArfuseError("no small model given: fuse the large model with at least one small one")
    if weight is not None:
        if weights is not None:
            raise ArfuseError("give weight (the large model's w) or weights (one per model), not both")
        if len(smalls) != 1:
            raise ArfuseError(f"weight is for two models but {1 + len(smalls)} were given: give weights=[w1, w2, ...]")
        weights = [weight, 1.0 - weight]
    if weights is not None:
        weights = check_weights(weights, 1 + len(smalls))
        if search is not None:
            raise ArfuseError(f"search={search!r} and given weights contradict: give one or the other")
    if search is None:
        search = "accuracy" if len(smalls) == 1 else "nll"
    if search not in SEARCHES:
        raise ArfuseError(f"unknown search {search!r}: use one of {', '.join(SEARCHES)}")
    if search == "accuracy" and len(smalls) != 1:
        raise ArfuseError(f"the exact accuracy search is for two models, but {1 + len(smalls)} were given: "
                          "use search='nll' (EM on the simplex) for K models")
    specs = [large, *smalls]
    models, ds, recs = score_family(specs, data, device=device, batch_size=batch_size, use_cache=use_cache,
                                    progress=progress)
    names = [m.info.name for m in models]
    vrecs = vds = None
    if valid:
        _, vds, vrecs = score_family(specs, valid, device=device, batch_size=batch_size, use_cache=use_cache,
                                     progress=progress)
        overlap = set(zip(ds.files, ds.blobs)) & set(zip(vds.files, vds.blobs)) if ds.source == vds.source else set()
        if overlap:
            raise ArfuseError(f"{len(overlap)} image(s) are in both {data!r} and the validation data {valid!r} "
                              f"(e.g. {next(iter(overlap))[0]}): choose the weight on disjoint data, e.g. "
                              "cifar10-test[:50%] and cifar10-test[50%:]")
    fit = vrecs or recs
    fit_name = vds.name if vds else ds.name
    where = f"the validation data ({fit_name})" if vds else f"the reported data itself ({fit_name})"
    notes: list[str] = []
    if weights is None and vds is None:
        notes.append("no validation data given: the weight was chosen on the reported data, so the fused gain is "
                     "optimistic (give valid=, e.g. cifar10-test[:50%] with data cifar10-test[50%:])")
    if weights is not None:
        source = "given"
    elif search == "nll" and len(models) == 2:
        o = optimal_weight(fit[0].logp, fit[1].logp)
        weights = [o.w, 1.0 - o.w]
        source = f"NLL-optimal on {where}"
    elif search == "nll":
        ws, iters, conv = optimal_weights_em([r.logp for r in fit])
        weights = ws.tolist()
        source = f"NLL-optimal (EM on the simplex, {iters} iterations) on {where}"
        if not conv:
            notes.append("EM did not reach its tolerance: the weights are approximate")
    else:
        from arfuse.search.accuracy import curve_from_intervals, intervals_from_records

        best = curve_from_intervals(intervals_from_records(fit[0], fit[1])).best()
        weights = [_w(best.k), 1.0 - _w(best.k)]
        source = (f"accuracy-optimal on {where}: {100 * best.accuracy:.2f}% there for k in "
                  f"({fmt_k(best.k_range[0])}, {fmt_k(best.k_range[1])}), the segment of largest k among "
                  f"{best.n_best_segments} tied; k = {fmt_k(best.k)} inside it")
        if math.isinf(best.k):
            notes.append(f"{names[1]} cannot raise {names[0]}'s top-1 on {fit_name}: the best k is inf (the large model alone)")
    target = recs[0].target.astype(np.int64)
    lps_true = [r.logp.astype(np.float64) for r in recs]
    full = [full_logprobs(r) for r in recs]
    preds = [f.argmax(axis=1) for f in full]
    base_acc = float(np.mean(preds[0] == target))
    rows = [_row(names[0], "large", lps_true[0], preds[0], target, None)]
    rows += [_row(n, "small", lp, p, target, base_acc) for n, lp, p in zip(names[1:], lps_true[1:], preds[1:])]
    u = [1.0 / len(models)] * len(models)
    rows.append(_row("uniform average", "uniform", uniform(lps_true), np.asarray(uniform(full)).argmax(1), target,
                     base_acc, u))
    fused_pred = np.asarray(linear(full, weights)).argmax(1)
    rows.append(_row("AR fused", "fused", linear(lps_true, weights), fused_pred, target, base_acc, list(weights)))
    report = ClassificationReport(
        models=[{"name": m.info.name, "spec": s, "kind": m.info.kind, "num_parameters": m.num_parameters,
                 "classes": len(m.classes), "identity": m.info.identity} for m, s in zip(models, specs)],
        data={**ds.summary(), "resized": recs[0].meta.get("resized", 0)}, valid=vds.summary() if vds else None,
        search="given" if source == "given" else search, weights=list(weights),
        k=w_to_k(weights[0]) if len(weights) == 2 else None, weight_source=source,
        param_ratio=[models[0].num_parameters / m.num_parameters for m in models[1:]], rows=rows, notes=notes)
    if ds.skipped:
        notes.append(f"{len(ds.skipped)} image(s) of {data!r} do not decode and were skipped (listed in data.skipped_files)")
    if report.data["resized"]:
        notes.append(f"{report.data['resized']} image(s) were resized (bilinear) to the models' input size")
    if len(models) == 2:
        from arfuse.search.accuracy import curve_from_intervals, intervals_from_records, paired_bootstrap, three_sets

        o = optimal_weight(recs[0].logp, recs[1].logp)
        iv = intervals_from_records(recs[0], recs[1])
        curve = curve_from_intervals(iv)
        report.nll_optimum = {"w": o.w, "k": o.k, "nll": o.nll / len(target),
                              "accuracy": float(np.mean(np.asarray(linear(full, [o.w, 1 - o.w])).argmax(1) == target)),
                              "at_boundary": o.at_boundary}
        report.accuracy_curve = curve.to_dict(max_points=0)
        edges, gain = curve.gain_curve()
        report.curve = {"edges": edges.tolist(), "gain_pp": gain.tolist(), "data": ds.name}
        k_used = report.k
        report.sets = three_sets(iv, k_used)
        if bootstrap:
            report.bootstrap = paired_bootstrap(fused_pred == target, preds[0] == target, n_boot=bootstrap)
        direct = int((fused_pred == target).sum())
        if 0 < k_used < math.inf and curve.right_at(k_used)[0] != direct:
            notes.append(f"the exact accuracy curve gives {curve.right_at(k_used)[0]} right at k = {fmt_k(k_used)} but "
                         f"the direct fused argmax {direct}: k lies within rounding of an exchange threshold")
    return report


def law_members(specs: list[str], data: str, *, device: str = "cpu", batch_size: int = 256, use_cache: bool = True,
                progress: bool = True, num_parameters: dict | None = None):
    """The family's members and data info for ``arfuse.search.law.analyse_family`` (as
    ``law.family_members`` gives them for causal LMs): one record per image, all classes."""
    from arfuse.search.law import Member

    if len(specs) < 2:
        raise ArfuseError(f"--family needs at least 2 models (comma-separated), got {len(specs)}: {specs}")
    models, ds, recs = score_family(specs, data, device=device, batch_size=batch_size, use_cache=use_cache,
                                    progress=progress)
    members = [Member(m.info.name, (num_parameters or {}).get(m.info.name, m.num_parameters), r, s)
               for s, m, r in zip(specs, models, recs)]
    info = {"name": ds.name, "source": ds.source, "sha256": ds.content_hash,
            "windowing": f"one record per image, all {len(ds.classes)} classes kept ({len(ds.skipped)} undecodable skipped)",
            "tokens": len(ds), "topk": len(ds.classes), "unit": "image", "skipped": len(ds.skipped)}
    return members, info
