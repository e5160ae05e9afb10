"""The image-classifier head: top-1 accuracy of a large classifier fused with smaller ones, on cached records.

Each model scores the images once (cached); everything else runs on the per-image
records: each model's top-1, the fused model's top-1 at a given weight, the exact
NLL-optimal weight, and the exact accuracy curve over every k = w / (1 - w) (from the
exchange thresholds, ``arfuse.search.accuracy``) with its optimum, improvement domain, the
paper's three sets and the flips. The weight is chosen on ``valid`` and reported on
``data``; without ``valid`` it is chosen on ``data`` itself and the report says so.
"""
from __future__ import annotations

import math

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.formatting import fmt_k
from arfuse.fusion import k_to_w, linear, uniform, w_to_k
from arfuse.scoring.records import TokenRecords
from arfuse.search.accuracy import curve_from_intervals, intervals_from_records, paired_bootstrap, three_sets
from arfuse.tasks.choose import nll_weights
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.heads import refuse_rule
from arfuse.tasks.report import EvalReport, Row, gain_cell, note_lines, table, weight_cells

MIN_BATCH = 64  # images are small: at least this many per forward pass (results do not depend on it)

KIND = "image classifiers"


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


def fused_predictions(rec_large: TokenRecords, rec_small: TokenRecords, w: float) -> np.ndarray:
    """argmax of log(w p_L + (1 - w) p_S) per example, computed directly (ties: lowest index)."""
    return np.asarray(linear([full_logprobs(rec_large), full_logprobs(rec_small)], [w, 1.0 - w])).argmax(axis=1)


def score_family(specs: list[str], data: str, *, device: str = "cpu", batch_size: int = 256,
                 use_cache: bool = True, progress: bool = True):
    """Load each image model and score ``data`` with it (cached): (models, dataset, records)."""
    from arfuse.adapters import load_any
    from arfuse.data.images import load_image_dataset
    from arfuse.scoring.classify import score_images

    models = [load_any(s, device=device) for s in specs]
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


def _check_disjoint(ds, vds, data: str, valid: str) -> None:
    overlap = set(zip(ds.files, ds.blobs)) & set(zip(vds.files, vds.blobs)) if ds.source == vds.source else set()
    if overlap:
        raise ArfuseError(f"{len(overlap)} image(s) are in both {data!r} and the validation data {valid!r} "
                          f"(e.g. {next(iter(overlap))[0]}): choose the weight on disjoint data, e.g. "
                          "cifar10-test[:50%] and cifar10-test[50%:]")


def _choose(cfg: EvalConfig, fit: list[TokenRecords], names: list[str], where: str, fit_name: str,
            notes: list[str]) -> tuple[list[float], str, str]:
    """(weights, where they came from, the search: "given", "nll" or "accuracy")."""
    if cfg.weights is not None:
        return list(cfg.weights), "given", "given"
    search = cfg.objective or ("accuracy" if len(fit) == 2 else "nll")
    if search == "nll":
        ch = nll_weights([r.logp for r in fit])
        if ch.optimum is not None:
            return ch.weights, f"NLL-optimal on {where}", search
        if not ch.converged:
            notes.append("EM did not reach its tolerance: the weights are approximate")
        return ch.weights, f"NLL-optimal (EM on the simplex, {ch.iterations} iterations) on {where}", search
    best = curve_from_intervals(intervals_from_records(fit[0], fit[1])).best()
    source = (f"accuracy-optimal on {where}: {100 * best.accuracy:.2f}% there for k in "
              f"({fmt_k(best.k_range[0])}, {fmt_k(best.k_range[1])}), the segment of largest k among "
              f"{best.n_best_segments} tied; k = {fmt_k(best.k)} inside it")
    if math.isinf(best.k):
        notes.append(f"{names[1]} cannot raise {names[0]}'s top-1 on {fit_name}: the best k is inf (the large model alone)")
    return [k_to_w(best.k), 1.0 - k_to_w(best.k)], source, search


def _rows(names: list[str], recs: list[TokenRecords], weights: list[float]):
    """(rows, full log-probs, each model's predictions, the fused predictions, targets)."""
    target = recs[0].target.astype(np.int64)
    lps_true = [r.logp.astype(np.float64) for r in recs]
    full = [full_logprobs(r) for r in recs]
    preds = [f.argmax(axis=1) for f in full]
    base_acc = float(np.mean(preds[0] == target))

    def row(name, kind, lp_true, pred, w=None):
        right = int((pred == target).sum())
        acc = right / len(target)
        return Row(name, kind, {"accuracy": acc, "right": right, "nll": -float(np.mean(lp_true))}, None, w,
                   gain_pp=100.0 * (acc - base_acc) if kind != "large" else 0.0)

    fused_pred = np.asarray(linear(full, weights)).argmax(1)
    rows = [row(names[0], "large", lps_true[0], preds[0])]
    rows += [row(n, "small", lp, p) for n, lp, p in zip(names[1:], lps_true[1:], preds[1:])]
    rows.append(row("uniform average", "uniform", uniform(lps_true), np.asarray(uniform(full)).argmax(1),
                    [1.0 / len(recs)] * len(recs)))
    rows.append(row("AR fused", "fused", linear(lps_true, weights), fused_pred, list(weights)))
    return rows, full, preds, fused_pred, target


def _add_two_model_analysis(report: EvalReport, recs, full, preds, fused_pred, target, n_boot: int) -> None:
    """The NLL optimum, the exact accuracy curve, the three sets and the bootstrap on the reported data."""
    from arfuse.search import optimal_weight

    o = optimal_weight(recs[0].logp, recs[1].logp)
    iv = intervals_from_records(recs[0], recs[1])
    curve = curve_from_intervals(iv)
    report.nll_optimum = {"w": o.w, "k": o.k, "nll": o.nll / len(target),
                          "accuracy": float(np.mean(np.asarray(linear(full, [o.w, 1 - o.w])).argmax(1) == target)),
                          "at_boundary": o.at_boundary}
    report.accuracy_curve = curve.to_dict(max_points=0)
    edges, gain = curve.gain_curve()
    report.curve = {"edges": edges.tolist(), "gain_pp": gain.tolist(), "data": report.data["name"]}
    k_used = report.k
    report.sets = three_sets(iv, k_used)
    if n_boot:
        report.bootstrap = paired_bootstrap(fused_pred == target, preds[0] == target, n_boot=n_boot)
    direct = int((fused_pred == target).sum())
    if 0 < k_used < math.inf and curve.right_at(k_used)[0] != direct:
        report.notes.append(f"the exact accuracy curve gives {curve.right_at(k_used)[0]} right at k = {fmt_k(k_used)} "
                            f"but the direct fused argmax {direct}: k lies within rounding of an exchange threshold")


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> EvalReport:
    """Top-1 of ``cfg.large``, each small model, their uniform average and their AR fusion.

    The weights: ``cfg.weights`` when given; else found by ``cfg.objective`` on ``cfg.valid``
    (or on ``cfg.data``): "accuracy" (two models, the default: the exact accuracy optimum over
    all k, the segment of largest k among ties) or "nll" (the exact NLL optimum; EM for K models).
    """
    refuse_rule(cfg, "image")
    specs = [cfg.large, *cfg.smalls]
    kw = dict(device=cfg.device, batch_size=max(cfg.batch_size, MIN_BATCH), use_cache=cfg.use_cache, progress=progress)
    models, ds, recs = score_family(specs, cfg.data, **kw)
    names = [m.info.name for m in models]
    vrecs = vds = None
    if cfg.valid:
        _, vds, vrecs = score_family(specs, cfg.valid, **kw)
        _check_disjoint(ds, vds, cfg.data, cfg.valid)
    fit_name = vds.name if vds else ds.name
    where = f"the validation data ({fit_name})" if vds else f"the reported data itself ({fit_name})"
    notes: list[str] = []
    if cfg.weights is None and vds is None:
        notes.append("no validation data given: the weight was chosen on the reported data, so the fused gain is "
                     "optimistic (give valid=, e.g. cifar10-test[:50%] with data cifar10-test[50%:])")
    weights, source, search = _choose(cfg, vrecs or recs, names, where, fit_name, notes)
    rows, full, preds, fused_pred, target = _rows(names, recs, weights)
    report = EvalReport(
        head="image", config=cfg.to_dict(),
        models=[{"name": m.info.name, "spec": s, "kind": m.info.kind, "num_parameters": m.num_parameters,
                 "classes": len(m.classes), "identity": m.info.identity} for m, s in zip(models, specs)],
        data={**ds.summary(), "resized": recs[0].meta.get("resized", 0)}, valid=vds.summary() if vds else None,
        windowing=f"one record per image, all {len(ds.classes)} classes kept", search=search, weights=list(weights),
        k=w_to_k(weights[0]) if len(weights) == 2 else None, weight_source=source,
        param_ratio=[models[0].num_parameters / m.num_parameters for m in models[1:]], rows=rows,
        gain_of="top-1 accuracy", notes=notes)
    if ds.skipped:
        notes.append(f"{len(ds.skipped)} image(s) of {cfg.data!r} do not decode and were skipped (listed in "
                     "data.skipped_files)")
    if report.data["resized"]:
        notes.append(f"{report.data['resized']} image(s) were resized (bilinear) to the models' input size")
    if len(models) == 2:
        _add_two_model_analysis(report, recs, full, preds, fused_pred, target, cfg.bootstrap)
    return report


def describe(report: EvalReport) -> str:
    """The classifier report as text."""
    d = report.data
    lines = [f"{d['name']}: {d['images']:,} images, {d['classes']} classes ({d['source']})"]
    if d.get("skipped"):
        lines.append(f"skipped {d['skipped']} image(s) that do not decode: {', '.join(d['skipped_files'][:5])}")

    def cells(r: Row, n_params: int | None) -> list[str]:
        m = r.metrics
        return ["" if n_params is None else f"{n_params / 1e6:.3f}M", f"{100 * m['accuracy']:.2f}", f"{m['right']:,}",
                f"{m['nll']:.4f}", gain_cell(r, "+.2f"), *weight_cells(r.weights)]

    lines.append(table(report, ["model", "params", "top-1 %", "right", "NLL", "gain pp", "w", "k"], cells))
    lines.append(f"weight source: {report.weight_source}")
    if report.param_ratio:
        lines.append("parameter ratio r = " + ", ".join(f"{x:.2f}" for x in report.param_ratio))
    if report.nll_optimum:
        o = report.nll_optimum
        lines.append(f"NLL optimum on {d['name']}: k* = {fmt_k(o['k'])} (w = {o['w']:.6f}), "
                     f"top-1 there {100 * o['accuracy']:.2f}%")
    if report.accuracy_curve:
        c = report.accuracy_curve
        b = c["best"]
        lines.append(f"accuracy optimum on {d['name']} (oracle): {100 * b['accuracy']:.2f}% for k in "
                     f"({fmt_k(b['k_range'][0])}, {fmt_k(b['k_range'][1])}); improvement domain "
                     f"k > {fmt_k(c['domain']['k_min'])}; {c['n_thresholds']:,} exchange thresholds"
                     + ("" if c["exact"] else " (top-k certificate fails somewhere: certified counts)"))
    if report.sets:
        s = report.sets
        lines.append(f"at k = {fmt_k(s['k'])}: {s['flips_wrong_to_right']} images fixed, "
                     f"{s['flips_right_to_wrong']} broken; S1 (large wrong, small right) "
                     f"{s['S1_llm_wrong_slm_right']['size']}, S2 (large right, small wrong) "
                     f"{s['S2_llm_right_slm_wrong']['size']}, S3 (agree) {s['S3_agree']['size']}")
    if report.bootstrap:
        bs = report.bootstrap
        lines.append(f"fused minus large: {100 * bs['delta']:+.2f} pp, {100 * bs['level']:.0f}% paired bootstrap "
                     f"interval [{100 * bs['ci_low']:+.2f}, {100 * bs['ci_high']:+.2f}] pp")
    return "\n".join(lines + note_lines(report))


def family_members(specs, data_spec, *, device, batch_size, use_cache, progress, **_):
    """The AR law's members (``arfuse.tasks.law``): one record per image, all classes kept."""
    from arfuse.search.law import Member

    models, ds, recs = score_family(specs, data_spec, device=device, batch_size=max(batch_size, MIN_BATCH),
                                    use_cache=use_cache, progress=progress)
    members = [Member(m.info.name, m.num_parameters, r, s) for s, m, r in zip(specs, models, recs)]
    info = {"name": ds.name, "source": ds.source, "sha256": ds.content_hash,
            "windowing": f"one record per image, all {len(ds.classes)} classes kept ({len(ds.skipped)} undecodable skipped)",
            "tokens": len(ds), "topk": len(ds.classes), "unit": "image", "skipped": len(ds.skipped)}
    return members, info
