"""The AR law over a model family, from cached records only.

For every pair (LLM = the member with more parameters, SLM = the other) of a family scored
on the same data with one tokenizer:
- perplexity: the NLL-optimal k* (exact), the improvement domain (k_min, inf), the gain at k*;
- next-token accuracy: the exact curve over all k (exchange thresholds), its best k, the
  paper's three sets and the flips each way there;
- the mainstay-deviation statistic (Theorem A.2.2) on the most frequent target classes;
then the law itself: log k* against log r (r = N_LLM / N_SLM), least squares, with residuals.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.formatting import fmt_k, json_safe
from arfuse.search.accuracy import curve_from_intervals, intervals_from_records, three_sets
from arfuse.search.weights import gain_curve, improvement_domain, mixture_nll, optimal_weight


@dataclass
class Member:
    name: str
    num_parameters: int
    records: object            # TokenRecords of this model on the family's data
    spec: str = ""


# ---- mainstay deviation -------------------------------------------------------------------
def mainstay_deviation(pred_large, pred_small, target, top: int = 10) -> dict:
    """For the ``top`` most frequent target classes: how often each model predicts the class
    (n_L, n_S), with what precision, and how many of those predictions are right.

    Theorem A.2.2: where the SLM predicts a class more often (n_S > n_L) and the LLM's
    precision edge is small (P_L / P_S < n_S / n_L), the SLM gets more of it right.
    """
    pl, ps, t = (np.asarray(x) for x in (pred_large, pred_small, target))
    classes, counts = np.unique(t, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    rows = []
    for c, cnt in zip(classes[order], counts[order]):
        n_l, n_s = int((pl == c).sum()), int((ps == c).sum())
        r_l, r_s = int(((pl == c) & (t == c)).sum()), int(((ps == c) & (t == c)).sum())
        p_l = r_l / n_l if n_l else math.nan
        p_s = r_s / n_s if n_s else math.nan
        rows.append({"class": int(c), "target_count": int(cnt), "n_llm": n_l, "n_slm": n_s,
                     "precision_llm": p_l, "precision_slm": p_s, "right_llm": r_l, "right_slm": r_s,
                     "slm_predicts_more": n_s > n_l, "slm_more_right": r_s > r_l,
                     "assumption_holds": bool(n_s > n_l and p_s > 0 and (p_l / p_s) < (n_s / max(n_l, 1)))})
    more = [r for r in rows if r["slm_predicts_more"]]
    return {"top": len(rows), "classes": rows,
            "slm_predicts_more": len(more), "slm_more_right": sum(r["slm_more_right"] for r in rows),
            "assumption_holds": sum(r["assumption_holds"] for r in rows),
            "theorem_checks": all(r["slm_more_right"] for r in rows if r["assumption_holds"]),  # implied by the algebra
            "note": "assumption_holds = n_S > n_L and P_L / P_S < n_S / n_L, which implies right_S > right_L"}


# ---- one pair -----------------------------------------------------------------------------
def analyse_pair(large: Member, small: Member, *, curve_points: int = 120, mainstay_top: int = 10) -> dict:
    """Everything the law needs about one (LLM, SLM) pair, from their records."""
    a, b = large.records, small.records
    if len(a) != len(b) or not np.array_equal(a.target, b.target):
        raise ArfuseError(f"{large.name} and {small.name} score different tokens ({len(a):,} vs {len(b):,}): a family "
                          "must share one tokenizer and be scored with the same windowing and BOS policy")
    lpl, lps = a.logp.astype(np.float64), b.logp.astype(np.float64)
    n = len(lpl)
    opt = optimal_weight(lpl, lps)
    dom = improvement_domain(lpl, lps, opt)
    base = mixture_nll(lpl, lps, 1.0)
    gain = 100.0 * (1.0 - math.exp((opt.nll - base) / n))
    k_min = (dom[0] / (1 - dom[0]) if dom[0] < 1 else math.inf) if dom else math.inf
    iv = intervals_from_records(a, b)
    curve = curve_from_intervals(iv)
    best = curve.best()
    acc_dom = curve.domain()
    # the gain curve around the domain, for plots
    if math.isfinite(opt.k) and dom:
        lo = max(min(k_min, opt.k) / 10, 1e-4)
        hi = max(opt.k * 100, lo * 1e3)
    else:
        lo, hi = 1e-2, 1e4
    ks = np.geomspace(lo, hi, curve_points)
    ppl_gain = gain_curve(lpl, lps, ks)
    acc_gain = np.array([100.0 * (curve.right_at(k)[0] - curve.llm_right) / curve.n for k in ks])
    return {
        "llm": large.name, "slm": small.name, "n_llm": large.num_parameters, "n_slm": small.num_parameters,
        "r": large.num_parameters / small.num_parameters, "tokens": n,
        "ppl": {"k_star": opt.k, "w_star": opt.w, "k_min": k_min, "domain_w": list(dom) if dom else None,
                "gain_pct_at_k_star": gain, "ppl_llm": math.exp(base / n), "ppl_slm": math.exp(mixture_nll(lpl, lps, 0.0) / n),
                "ppl_fused": math.exp(opt.nll / n), "at_boundary": opt.at_boundary},
        "acc": {"acc_llm": curve.acc_llm, "acc_slm": curve.acc_slm, "k_star": best.k, "k_range": list(best.k_range),
                "acc_fused": best.accuracy, "gain_pt": 100 * best.gain, "exact": curve.exact,
                "n_thresholds": int(len(curve.thresholds)), "k_min": acc_dom["k_min"],
                "worse_somewhere": acc_dom["worse_anywhere"], "better_segments": len(acc_dom["better_segments"]),
                "three_sets": three_sets(iv, best.k),
                "undetermined_max": int((curve.right_hi - curve.right_lo).max())},
        "mainstay": mainstay_deviation(a.topk_ids[:, 0], b.topk_ids[:, 0], a.target, mainstay_top),
        "curve": {"k": ks.tolist(), "ppl_gain_pct": ppl_gain.tolist(), "acc_gain_pt": acc_gain.tolist()},
        "gain_negative_inside_domain": bool(np.any(ppl_gain[ks > k_min] < -1e-9)) if dom else None,
        "gain_falls_past_k_star": bool(np.all(np.diff(ppl_gain[ks >= opt.k]) <= 1e-9)) if math.isfinite(opt.k) else None,
    }


# ---- the law fit ----------------------------------------------------------------------------
def fit_law(r, k_star) -> dict:
    """Least squares of log10 k* on log10 r over the pairs with a finite, positive k*."""
    r, k = np.asarray(r, np.float64), np.asarray(k_star, np.float64)
    use = np.isfinite(k) & (k > 0) & (r > 0)
    x, y = np.log10(r[use]), np.log10(k[use])
    out = {"n_pairs": int(use.sum()), "excluded": int((~use).sum()), "used": use.tolist()}
    if use.sum() < 2 or np.ptp(x) == 0:
        return {**out, "slope": None, "intercept": None, "r2": None, "residuals": [],
                "note": "fewer than two pairs with finite k* and distinct r: no fit"}
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    res = np.full(len(r), np.nan)
    res[use] = y - pred
    rho = float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and np.ptp(y) > 0 else None
    return {**out, "slope": float(slope), "intercept": float(intercept),
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None, "pearson_log": rho,
            "residuals": [None if math.isnan(v) else float(v) for v in res],
            "law": f"log10 k* = {slope:.3f} log10 r + {intercept:.3f}"}


@dataclass
class LawReport:
    family: list[dict]
    data: dict
    pairs: list[dict]
    fit: dict
    fits_per_llm: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe({"family": self.family, "data": self.data, "pairs": self.pairs, "fit": self.fit,
                          "fits_per_llm": self.fits_per_llm, "notes": self.notes})


def analyse_family(members: list[Member], data: dict | None = None, **kw) -> LawReport:
    """Every pair of the family (the member with more parameters as the LLM), then the law fit."""
    if len(members) < 2:
        raise ArfuseError(f"a family needs at least 2 models, got {len(members)}: give --family A,B[,C...]")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ArfuseError(f"family members must have distinct names, got {names}")
    pairs = []
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            a, b = members[i], members[j]
            large, small = (a, b) if a.num_parameters >= b.num_parameters else (b, a)
            pairs.append(analyse_pair(large, small, **kw))
    fit = fit_law([p["r"] for p in pairs], [p["ppl"]["k_star"] for p in pairs])
    per_llm = {}
    for llm in dict.fromkeys(p["llm"] for p in pairs):
        sub = [p for p in pairs if p["llm"] == llm]
        if len(sub) >= 2:
            per_llm[llm] = fit_law([p["r"] for p in sub], [p["ppl"]["k_star"] for p in sub])
    notes = []
    if fit["excluded"]:
        notes.append(f"{fit['excluded']} pair(s) with k* = inf (the SLM never helps) are left out of the fit")
    return LawReport([{"name": m.name, "spec": m.spec, "num_parameters": m.num_parameters} for m in members],
                     data or {}, pairs, fit, per_llm, notes)


# ---- tables ------------------------------------------------------------------------------------
COLUMNS = ["llm", "slm", "r", "k_star", "k_min", "gain_pct", "ppl_llm", "ppl_fused", "acc_llm", "acc_slm",
           "acc_k_star", "acc_gain_pt", "S1", "S2", "fixed", "broken", "mainstay_slm_more_right", "residual"]


def table_rows(rep: LawReport) -> list[dict]:
    rows = []
    for p, res in zip(rep.pairs, rep.fit.get("residuals") or [None] * len(rep.pairs)):
        ts = p["acc"]["three_sets"]
        rows.append({"llm": p["llm"], "slm": p["slm"], "r": p["r"], "k_star": p["ppl"]["k_star"],
                     "k_min": p["ppl"]["k_min"], "gain_pct": p["ppl"]["gain_pct_at_k_star"],
                     "ppl_llm": p["ppl"]["ppl_llm"], "ppl_fused": p["ppl"]["ppl_fused"],
                     "acc_llm": p["acc"]["acc_llm"], "acc_slm": p["acc"]["acc_slm"], "acc_k_star": p["acc"]["k_star"],
                     "acc_gain_pt": p["acc"]["gain_pt"], "S1": ts["S1_llm_wrong_slm_right"]["size"],
                     "S2": ts["S2_llm_right_slm_wrong"]["size"], "fixed": ts["flips_wrong_to_right"],
                     "broken": ts["flips_right_to_wrong"],
                     "mainstay_slm_more_right": f"{p['mainstay']['slm_more_right']}/{p['mainstay']['top']}",
                     "residual": res})
    return rows


def _fmt(v) -> str:
    """A table cell: numbers as the one k formatter writes them, None as "-", anything else as text."""
    return fmt_k(v) if v is None or isinstance(v, float) else str(v)


def to_markdown(rep: LawReport) -> str:
    head = ["LLM", "SLM", "r", "k* (PPL)", "k_min", "PPL gain %", "PPL LLM", "PPL fused", "acc LLM", "acc SLM",
            "k* (acc)", "acc gain pt", "|S1|", "|S2|", "fixed", "broken", "mainstay SLM>LLM", "log10 resid."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(rep):
        lines.append("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    f = rep.fit
    lines.append("")
    if f.get("slope") is not None:
        lines.append(f"Law fit over {f['n_pairs']} pairs: {f['law']} (R² = {_fmt(f['r2'])}).")
    else:
        lines.append(f"Law fit: {f.get('note')}.")
    for llm, ff in rep.fits_per_llm.items():
        if ff.get("slope") is not None:
            lines.append(f"- LLM {llm} alone ({ff['n_pairs']} SLMs): {ff['law']}.")
    for n in rep.notes:
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


def to_csv(rep: LawReport) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in table_rows(rep):
        w.writerow({k: _fmt(v) if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()


def write_tables(rep: LawReport, out: str | Path, stem: str = "law") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json"]
    paths[0].write_text(to_markdown(rep))
    paths[1].write_text(to_csv(rep))
    paths[2].write_text(json.dumps(rep.to_dict(), indent=1))
    return paths


# ---- plots -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gains(rep: LawReport, path: str | Path) -> Path:
    """Perplexity gain (and exact accuracy gain) against k for each pair, the domain shaded."""
    plt = _plt()
    n = len(rep.pairs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, p in zip(axes.flat, rep.pairs):
        c = p["curve"]
        ks = np.asarray(c["k"])
        ax.plot(ks, c["ppl_gain_pct"], color="C0", lw=2, label="PPL gain %")
        ax2 = ax.twinx()
        ax2.step(ks, c["acc_gain_pt"], where="post", color="C1", lw=1, alpha=0.8, label="acc gain pt (exact)")
        ax2.set_ylabel("acc gain (pt)", color="C1", fontsize=8)
        k_min, k_star = p["ppl"]["k_min"], p["ppl"]["k_star"]
        if math.isfinite(k_min):
            ax.axvspan(max(k_min, ks[0]), ks[-1], color="C2", alpha=0.12, label=f"domain k > {k_min:.3g}")
        if math.isfinite(k_star):
            ax.axvline(k_star, color="C3", ls="--", lw=1, label=f"k* = {k_star:.3g}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("k = w / (1 - w)")
        ax.set_ylabel("PPL gain (%)")
        ax.set_title(f"{p['llm']} + {p['slm']} (r = {p['r']:.3g})", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"gain against k on {rep.data.get('name', '')}", fontsize=10)
    # fixed margins: tight_layout over a grid of twin log axes took most of the page's time
    fig.subplots_adjust(left=0.7 / (4.6 * cols), right=1 - 0.75 / (4.6 * cols), bottom=0.55 / (3.4 * rows),
                        top=1 - 0.95 / (3.4 * rows), wspace=0.55, hspace=0.6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_heatmap(rep: LawReport, path: str | Path) -> Path:
    """Perplexity gain at k* over all pairs: rows are LLMs, columns SLMs; k* in each cell."""
    plt = _plt()
    order = [m["name"] for m in sorted(rep.family, key=lambda m: -m["num_parameters"])]
    idx = {n: i for i, n in enumerate(order)}
    g = np.full((len(order), len(order)), np.nan)
    kk = np.full_like(g, np.nan)
    for p in rep.pairs:
        g[idx[p["llm"]], idx[p["slm"]]] = p["ppl"]["gain_pct_at_k_star"]
        kk[idx[p["llm"]], idx[p["slm"]]] = p["ppl"]["k_star"]
    fig, ax = plt.subplots(figsize=(1.3 * len(order) + 2.5, 1.1 * len(order) + 1.8))
    im = ax.imshow(g, cmap="viridis")
    lo_g = float(np.nanmin(g)) if np.isfinite(g).any() else 0.0
    span = (float(np.nanmax(g)) - lo_g) if np.isfinite(g).any() else 1.0
    for i in range(len(order)):
        for j in range(len(order)):
            if not np.isnan(g[i, j]):
                ax.text(j, i, f"{g[i, j]:.2f}%\nk*={kk[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="w" if (g[i, j] - lo_g) < 0.5 * span else "k")
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.set_xlabel("SLM")
    ax.set_ylabel("LLM")
    fig.colorbar(im, ax=ax, label="PPL gain at k* (%)")
    ax.set_title(f"AR gain over all pairs on {rep.data.get('name', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_law(rep: LawReport, path: str | Path) -> Path:
    """k* against r on log-log axes with the least-squares line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    r = np.array([p["r"] for p in rep.pairs])
    k = np.array([p["ppl"]["k_star"] for p in rep.pairs])
    fin = np.isfinite(k) & (k > 0)
    llms = list(dict.fromkeys(p["llm"] for p in rep.pairs))
    for i, llm in enumerate(llms):
        m = np.array([p["llm"] == llm for p in rep.pairs]) & fin
        ax.scatter(r[m], k[m], color=f"C{i}", label=f"LLM {llm}", zorder=3)
    for p, ri, ki in zip(rep.pairs, r, k):
        if np.isfinite(ki) and ki > 0:
            ax.annotate(p["slm"], (ri, ki), fontsize=6, xytext=(3, 3), textcoords="offset points")
    f = rep.fit
    if f.get("slope") is not None:
        xs = np.geomspace(r[fin].min(), r[fin].max(), 50)
        ax.plot(xs, 10 ** (f["slope"] * np.log10(xs) + f["intercept"]), "k--", lw=1,
                label=f"fit: slope {f['slope']:.2f}, R² {_fmt(f['r2'])}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameter ratio r = N_LLM / N_SLM")
    ax.set_ylabel("NLL-optimal k*")
    ax.set_title(f"AR law on {rep.data.get('name', '')}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_plots(rep: LawReport, out: str | Path, stem: str = "law") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_gains(rep, out / f"{stem}_gain.png"), plot_heatmap(rep, out / f"{stem}_heatmap.png"),
            plot_law(rep, out / f"{stem}_fit.png")]
