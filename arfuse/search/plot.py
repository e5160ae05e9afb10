"""Plots of the gain against the weight ratio k."""
from __future__ import annotations

import math


def plot_gain_curve(report, path: str) -> str:
    """Gain (%) against k on a log axis, the improvement domain shaded, k* and the used k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.curve is None:
        from arfuse.errors import ArfuseError

        raise ArfuseError("no gain curve to plot: the improvement domain is empty (the SLM never helps) "
                          "or more than one small model was fused")
    ks, gains = report.curve["k"], report.curve["gain_pct"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ks, gains, color="C0", lw=2, label="fused vs LLM (token perplexity)")
    if report.domain_k:
        ax.axvspan(max(report.domain_k[0], ks[0]), ks[-1], color="C2", alpha=0.12,
                   label=f"improvement domain k > {report.domain_k[0]:.3g}")
    if report.k_star and math.isfinite(report.k_star):
        ax.axvline(report.k_star, color="C3", ls="--", lw=1, label=f"k* = {report.k_star:.3g} (test optimum)")
    if report.k is not None and math.isfinite(report.k):
        fused = next(r for r in report.rows if r.kind == "fused")
        ax.plot([report.k], [fused.gain_pct], "o", color="C1", label=f"used k = {report.k:.3g} ({fused.gain_pct:+.2f}%)")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("weight ratio k = w / (1 - w)")
    ax.set_ylabel("perplexity gain over the LLM (%)")
    names = [m["name"] for m in report.models]
    ax.set_title(f"{names[0]} + {names[1]} on {report.data['name']}\n{report.windowing}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
